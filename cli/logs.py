"""One log format for tierq's own processes."""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per probe request would drown what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
