"""A fault-injectable simulated LLM backend speaking the OpenAI, Ollama and Anthropic APIs.

One instance serves all three protocols on its port and answers deterministically with
``[<name>] You said: <last user message>``; faults are switched at runtime under ``/_sim/``.
"""

from simulator.app import SimulatorApp, build_app
from simulator.faults import FaultSettings, Mode

__all__ = ["FaultSettings", "Mode", "SimulatorApp", "build_app"]
