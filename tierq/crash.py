"""Named crash points: a test sets ``TIERQ_CRASH_AT`` and the process dies hard there.

This is how durability tests hit the exact window between two steps (after the commit,
before the publish) that a random ``kill`` would almost never land in. ``NAME@MARK`` crashes
only when the point's subject (for a job, its last message) contains MARK: a poison job.
"""

from __future__ import annotations

import os


def crash_point(name: str, subject: str = "") -> None:
    """Exit at once, with no cleanup, if ``TIERQ_CRASH_AT`` names this point."""
    for item in os.environ.get("TIERQ_CRASH_AT", "").split(","):
        point, _, mark = item.partition("@")
        if point == name and (not mark or mark in subject):
            os._exit(137)
