"""``python -m simulator gpu-vllm:9101 cpu-ollama:9102 --faults '{"latency_ms": 50}'``.

Initial faults, weakest first: ``TIERQ_SIM_FAULTS``, ``TIERQ_SIM_FAULTS__<NAME>``, then
``--faults JSON`` and the shortcut flags (every instance), then ``--faults NAME=JSON``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pydantic import ValidationError

from simulator.faults import FaultSettings, Mode, faults_from_env
from simulator.server import serve_forever


def _spec(text: str) -> tuple[str, int]:
    # NAME:PORT, or NAME=PORT as `tierq simulate --backend` spells it.
    name, _, port = text.replace("=", ":").rpartition(":")
    if not name or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME:PORT, got {text!r}")
    return name, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulator", description="Fault-injectable simulated LLM backends."
    )
    parser.add_argument("specs", nargs="+", type=_spec, metavar="NAME:PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--faults",
        action="append",
        default=[],
        metavar="[NAME=]JSON",
        help="initial fault settings, for every instance or for the one named",
    )
    parser.add_argument("--mode", choices=[m.value for m in Mode])
    parser.add_argument("--latency-ms", type=float)
    parser.add_argument("--tokens-per-second", type=float)
    parser.add_argument("--max-context-words", type=int)
    return parser


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def initial_faults(args: argparse.Namespace) -> dict[str, FaultSettings]:
    """Each instance's starting faults from the environment and the command line."""
    common: dict[str, Any] = {}
    named: dict[str, dict[str, Any]] = {}
    for item in args.faults:
        name, sep, text = item.partition("=")
        if sep and not item.lstrip().startswith("{"):
            named.setdefault(name, {}).update(_json_object(text))
        else:
            common.update(_json_object(item))
    shortcuts = ("mode", "latency_ms", "tokens_per_second", "max_context_words")
    common.update({k: getattr(args, k) for k in shortcuts if getattr(args, k) is not None})
    result = {}
    for name, _ in args.specs:
        base = faults_from_env(name).model_dump(exclude_unset=True)
        result[name] = FaultSettings.model_validate(base | common | named.get(name, {}))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        faults = initial_faults(args)
    except (ValueError, ValidationError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("simulator").setLevel(logging.INFO)
    try:
        serve_forever(args.specs, args.host, faults=faults)
    except OSError as exc:
        print(f"simulator: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0
