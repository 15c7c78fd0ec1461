"""Named crash points: a test sets ``TIERQ_CRASH_AT`` and the process dies hard there.

This is how durability tests hit the exact window between two steps (after the commit,
before the publish) that a random ``kill`` would almost never land in.
"""

from __future__ import annotations

import os


def crash_point(name: str) -> None:
    """Exit at once, with no cleanup, if ``TIERQ_CRASH_AT`` names this point."""
    if name in os.environ.get("TIERQ_CRASH_AT", "").split(","):
        os._exit(137)
