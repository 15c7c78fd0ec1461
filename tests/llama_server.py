"""A real llama.cpp server for the tests: llama-cpp-python's OpenAI-compatible server
(``python -m llama_cpp.server``) serving a tiny model written here with the ``gguf`` package.

    from tests.llama_server import llama   # the session's server (a pytest fixture)

    def test_x(llama: LlamaServer) -> None:
        httpx.post(f"{llama.url}/v1/chat/completions", json={"model": MODEL_NAME, ...})
        llama.kill()             # SIGKILL: dead until start()
        llama.restart()          # SIGKILL, then start again on the same port

    with running_llama(endless=True, options={"interrupt_requests": False}) as server:
        ...                      # a server of its own, other settings

It serves the model as MODEL_NAME, with a context of N_CTX (512) tokens, one generation at
a time, and the ChatML chat format it guesses from the model's template.

The model is a llama-architecture GGUF of ~280 tokens (SentencePiece with byte fallback,
ChatML control tokens, the ChatML chat template) whose weights are set, not trained, so its
answers are known in advance: every layer's output projections are zero, so the last hidden
state is the current token's embedding and the model is a bigram table. After the
generation prompt's newline it says ANSWER (ANSWER_TOKENS tokens) and ends its turn
(``finish_reason: "stop"``); asked for more (llama.cpp's ``min_tokens``), or ``endless``,
it starts over, up to ``max_tokens`` or the context. Under a grammar (a named tool, JSON
mode) it writes the shortest JSON it may. Prompts are tokenized byte by byte (no merges),
so a prompt's size in tokens is about its size in bytes.

llama-cpp-python must be installed (``./dev test`` installs the ``llama`` extra): without
it the fixture fails, it never skips.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".pytest_cache" / "llama"
LOGS = CACHE / "logs"  # the servers' output, one file per port, kept a day
MODEL_NAME = "tiny-llama"  # the alias /v1/models lists and answers carry
N_CTX = 512
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("Hello", "from", "the", "tiny", "test", "llama", "one", "two", "three", "four", "five")
CHAIN = (*(f"\u2581{w}" for w in WORDS), ".")
ANSWER = " " + " ".join(WORDS) + "."
ANSWER_TOKENS = len(CHAIN)
N_EMBD, N_LAYER, N_HEAD, N_FF = 64, 2, 4, 128
RMS_EPS = 1e-5
# The successor's logit in the answer; every other logit is at most 8 * 0.71 (a bias
# scaled by the RMS norm), so even at temperature 0.8 the answer never strays.
VOTE = 30.0
AGAIN = 20.0  # the first word's logit after the last: second to the end of turn
# Under a grammar (tools, JSON mode) the model writes the shortest JSON it may: `{}`,
# `[]`, `""`, `1`, no optional space, and it ends its turn as soon as the grammar lets it,
# even at the server's default temperature (0.8): arguments are short and always the same.
JSON_CLOSERS = {"{": "}", "[": "]", '"': '"'}  # an opener votes for its closer
JSON_BIAS = {"}": 8.0, "]": 8.0, ",": 7.0, ":": 7.0, '"': 6.0, "1": 5.0}
END_OF_TURN = 6.0


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]

    def id(self, token: str) -> int:
        return self.tokens.index(token)


def _vocab() -> Vocab:
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [TokenType.CONTROL] * 2
    words = ["\u2581", *CHAIN, "\u2581and", "\u2581or", "\u2581x"]
    tokens += words
    types += [TokenType.NORMAL] * len(words)
    return Vocab(tokens, [int(t) for t in types])


def _bigram(vocab: Vocab, endless: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Token embeddings and output matrix such that the logits are a table of
    (current token → next token): the model is a bigram table.

    Every embedding has 1 in dimension 0; after the final RMS norm that is a constant
    input, so the output matrix's column 0 is a bias per token. A token with a say about
    its successor (the answer's words, and JSON's openers) also has 1 in a dimension of
    its own, through which it votes: the last word, more weakly, for the first, so the
    answer starts over when the end of turn is forbidden."""
    import numpy as np

    n_vocab = len(vocab.tokens)
    bias = np.zeros(n_vocab, dtype=np.float32)
    for token in ("<unk>", "<s>", "</s>", "<|im_start|>"):
        bias[vocab.id(token)] = -10.0
    bias[vocab.id("<|im_end|>")] = END_OF_TURN
    for byte in [*range(0x00, 0x20), *range(0x7F, 0x100)]:
        bias[vocab.id(f"<0x{byte:02X}>")] = -10.0  # no control bytes, no broken UTF-8
    for char, weight in JSON_BIAS.items():
        bias[vocab.id(_byte(char))] = weight
    plain, voter = _norms()
    embd = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    embd[:, 0] = 1.0
    out = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    out[:, 0] = bias / plain  # a token without a vote of its own: logits = bias
    for dim, (source, votes) in enumerate(_votes(endless).items(), start=1):
        embd[vocab.id(source), dim] = 1.0
        for target, logit in votes.items():
            # The target's logit is exactly ``logit``, whatever its bias.
            out[vocab.id(target), dim] = (logit - bias[vocab.id(target)] * voter / plain) / voter
    return embd, out


def _votes(endless: bool) -> dict[str, dict[str, float]]:
    """{source: {successor: logit}}: the answer's chain, and JSON's shortest values."""
    chain = ["<0x0A>", *CHAIN, CHAIN[0] if endless else "<|im_end|>"]
    votes = {source: {target: VOTE} for source, target in itertools.pairwise(chain)}
    votes[CHAIN[-1]].setdefault(CHAIN[0], AGAIN)
    for opener, closer in JSON_CLOSERS.items():
        votes[_byte(opener)] = {_byte(closer): VOTE}
    return votes


def _byte(char: str) -> str:
    return f"<0x{ord(char):02X}>"


def _norms() -> tuple[float, float]:
    """Dimension 0 after RMS norm: for a plain embedding, and for one with a vote."""
    return math.sqrt(N_EMBD), math.sqrt(N_EMBD / 2)


def _logits(embd: np.ndarray, out: np.ndarray, token: int) -> np.ndarray:
    """What the model computes after ``token`` (the layers add nothing): for the check."""
    import numpy as np

    x = embd[token]
    h = x / np.sqrt(np.mean(x * x) + RMS_EPS)
    return out @ h


def write_model(path: Path, endless: bool = False) -> None:
    """Write the tiny model to ``path`` (a GGUF file of about 500 KB). An ``endless``
    model never ends its turn: it says ANSWER over and over, up to max_tokens or n_ctx."""
    import gguf
    import numpy as np

    vocab = _vocab()
    embd, out = _bigram(vocab, endless)
    _check(vocab, embd, out, endless)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(MODEL_NAME)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores([0.0] * len(vocab.tokens))  # no merges: bytes only
    writer.add_token_types(vocab.types)
    writer.add_unk_token_id(vocab.id("<unk>"))
    writer.add_bos_token_id(vocab.id("<s>"))
    writer.add_eos_token_id(vocab.id("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", out)
    for i in range(N_LAYER):
        _add_layer(writer, i, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_layer(writer: object, i: int, rng: np.random.Generator) -> None:
    """One transformer block that computes (random attention, a random MLP) and adds
    nothing: its output projections are zero, so the bigram table is all that speaks."""
    import numpy as np

    def random(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.02, size=shape).astype(np.float32)

    zeros = np.zeros
    tensors = {
        "attn_norm": np.ones(N_EMBD, dtype=np.float32),
        "attn_q": random(N_EMBD, N_EMBD),
        "attn_k": random(N_EMBD, N_EMBD),
        "attn_v": random(N_EMBD, N_EMBD),
        "attn_output": zeros((N_EMBD, N_EMBD), dtype=np.float32),
        "ffn_norm": np.ones(N_EMBD, dtype=np.float32),
        "ffn_gate": random(N_FF, N_EMBD),
        "ffn_up": random(N_FF, N_EMBD),
        "ffn_down": zeros((N_EMBD, N_FF), dtype=np.float32),
    }
    for name, tensor in tensors.items():
        writer.add_tensor(f"blk.{i}.{name}.weight", tensor)  # type: ignore[attr-defined]


def _check(vocab: Vocab, embd: np.ndarray, out: np.ndarray, endless: bool) -> None:
    """The table says what the docstring promises, or the model is not written."""
    import numpy as np

    current = vocab.id("<0x0A>")
    said = []
    for _ in range(ANSWER_TOKENS + 1):
        logits = _logits(embd, out, current)
        current = int(np.argmax(logits))
        said.append(vocab.tokens[current])
    assert said == [*CHAIN, CHAIN[0] if endless else "<|im_end|>"], said
    logits = _logits(embd, out, vocab.id(CHAIN[-1]))
    logits[vocab.id("<|im_end|>")] = -np.inf
    assert vocab.tokens[int(np.argmax(logits))] == CHAIN[0]


def model_path(endless: bool = False) -> Path:
    """The model file, kept under .pytest_cache; written again when this module changes
    (its source is the model's recipe)."""
    recipe = Path(__file__).read_bytes() + json.dumps(endless).encode()
    key = hashlib.sha256(recipe).hexdigest()[:12]
    path = CACHE / f"{MODEL_NAME}{'-endless' if endless else ''}-{key}.gguf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.part")
        write_model(partial, endless)
        partial.replace(path)  # atomic: a concurrent run never reads half a model
        stem = path.name.rsplit("-", 1)[0]
        _prune(CACHE.glob(f"{stem}-{'?' * len(key)}.gguf"), keep=path, days=0)
    return path


# -- the server -------------------------------------------------------------------------
START_TIMEOUT = 60.0


@dataclass
class LlamaServer:
    """``python -m llama_cpp.server`` on a loopback port, as a child process.

    ``options`` are more of its command-line settings (``{"interrupt_requests": False}``,
    ``{"chat_format": "chatml-function-calling"}``); its log is ``log``.
    """

    endless: bool = False
    n_ctx: int = N_CTX
    options: dict[str, object] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log: Path = LOGS / "server.log"

    @property
    def url(self) -> str:
        """The base URL, without /v1."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        settings: dict[str, object] = {
            "model": model_path(self.endless),
            "model_alias": MODEL_NAME,
            "host": "127.0.0.1",
            "port": self.port,
            "n_ctx": self.n_ctx,
            "n_threads": 1,  # two cores on the test machine: leave one to the tests
            "n_threads_batch": 1,
            "seed": 0,
        } | self.options
        args = [sys.executable, "-m", "llama_cpp.server"]
        for key, value in settings.items():
            args += [f"--{key}", str(value)]
        return args

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it (on a free port the first time) and wait until it answers."""
        import llama_cpp  # noqa: F401  (missing: fail here, loudly, never skip)

        first = not self.port
        self.port = self.port or _free_port()
        self.log = LOGS / f"server-{self.port}.log"
        LOGS.mkdir(parents=True, exist_ok=True)
        if first:
            _prune(LOGS.glob("server-*.log"), keep=None, days=1)
        with self.log.open("ab" if not first else "wb") as log:  # a restart appends
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self._wait_until_answering(timeout)

    def _wait_until_answering(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"llama_cpp.server silent for {timeout}s: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the server dies mid-answer, as on a crash or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """SIGKILL, then start again on the same port."""
        self.kill()
        self.start(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def _prune(paths: Iterator[Path], keep: Path | None, days: float) -> None:
    """Remove older models (another recipe) and old logs: the cache stays small."""
    limit = time.time() - days * 86400
    for path in paths:
        if path != keep and path.stat().st_mtime <= limit:
            path.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_llama(**settings: object) -> Iterator[LlamaServer]:
    """A server of its own, for a test that needs other settings or kills it."""
    server = LlamaServer(**settings)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


_shared: LlamaServer | None = None


@pytest.fixture(scope="session")
def llama() -> Iterator[LlamaServer]:
    """The session's server: default settings, the model that ends its answer.

    Import it into a test module (``from tests.llama_server import llama``). Every module
    that does shares one server; a test may ``restart()`` it."""
    global _shared
    if _shared is None:
        _shared = LlamaServer()
        _shared.start()
    yield _shared
    _shared.stop()
