from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tierq.config import ConfigError, load_config, parse_config

GOOD = """
tiers:
  - name: gpu
    backends: [{name: a, protocol: openai, url: "http://127.0.0.1:1", model: m}]
  - name: cpu
    backends: [{name: b, protocol: ollama, url: "http://127.0.0.1:2", model: m}]
"""


def test_default_config_loads_with_a_version() -> None:
    config = load_config()
    assert config.tier_names == ["gpu", "cpu", "hosted"]
    assert len(config.version) == 12
    assert config.next_tier("gpu") == "cpu" and config.next_tier("hosted") is None


def test_version_changes_with_the_file() -> None:
    assert parse_config(GOOD).version != parse_config(GOOD + "\non_exhausted: fail\n").version


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (GOOD.replace("protocol: ollama", "protocol: grpc"), "tiers.1.backends.0.protocol"),
        (GOOD.replace('url: "http://127.0.0.1:2"', "url: ftp://x"), "tiers.1.backends.0.url"),
        (GOOD + "\nretries: 3\n", "retries"),
        (GOOD.replace("name: cpu", "name: gpu"), "tiers.1.name"),
        (GOOD.replace("name: cpu", "name: emergency"), "tiers.1.name"),
        (GOOD.replace("name: b,", "name: a,"), "backend name 'a'"),
        ("tiers: []", "tiers"),
        ("- just a list", "expected a mapping"),
        ("tiers: [", "not valid YAML"),
        (
            GOOD.replace("model: m}", "model: m, larger_context: a}", 1),
            "tiers.0.backends.0.larger_context: a → a is a cycle",
        ),
        (
            GOOD.replace("model: m}", "model: m, larger_context: b}", 1).replace(
                "model: m}", "model: m, larger_context: a}"
            ),
            "tiers.0.backends.0.larger_context: a → b → a is a cycle",
        ),
        (
            GOOD.replace(
                "  - name: cpu", "    retry: {base_delay: 5, max_delay: 1}\n  - name: cpu"
            ),
            "tiers.0.retry.max_delay: 1 is less than base_delay 5",
        ),
        (
            GOOD + "minimal: {rules: 'tests.no_such_module:answer'}\n",
            "minimal.rules: cannot import 'tests.no_such_module'",
        ),
        (
            GOOD + "minimal: {rules: 'tests.rules_responder:no_such_rule'}\n",
            "minimal.rules: 'tests.rules_responder' has no callable 'no_such_rule'",
        ),
    ],
)
def test_bad_config_names_the_key(text: str, names: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text)
    assert names in str(error.value)


def test_config_check_command(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(GOOD.replace("model: m}", "modle: m}", 1))
    ok = subprocess.run(
        [sys.executable, "-m", "cli", "config", "check", str(good)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "gpu → cpu" in ok.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "cli", "config", "check", str(bad)], capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "tiers.0.backends.0.modle" in failed.stderr


def test_larger_context_chain_without_a_cycle_is_accepted() -> None:
    text = GOOD.replace("model: m}", "model: m, larger_context: b}", 1)
    assert parse_config(text).backends["a"].larger_context == "b"


def test_rules_callable_that_exists_is_accepted() -> None:
    text = GOOD + "minimal: {rules: 'tests.rules_responder:opening_hours'}\n"
    assert parse_config(text).minimal.rules == "tests.rules_responder:opening_hours"


def test_equal_base_and_max_delay_is_accepted() -> None:
    text = GOOD.replace("  - name: cpu", "    retry: {base_delay: 2, max_delay: 2}\n  - name: cpu")
    assert parse_config(text).tiers[0].retry.max_delay == 2
