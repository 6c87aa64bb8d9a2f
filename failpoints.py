"""Failpoints: named places where a test can make the coordinator pause, to kill it there on purpose.

``FL_FAILPOINTS="aggregate.before_commit=5,checkpoint.between_files=5"`` makes :func:`hit` log
``failpoint <name> reached`` and sleep that many seconds at those places. Unset (always, outside the
fault-injection tests), :func:`hit` does nothing. Names in use: ``aggregate.before_checkpoint``,
``checkpoint.between_files``, ``aggregate.before_commit``, ``atomic_write.before_replace``.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("fl.failpoints")


def _parse(text: str) -> dict[str, float]:
    points = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, seconds = item.partition("=")
        try:
            points[name.strip()] = float(seconds)
        except ValueError:
            log.warning("ignoring malformed failpoint %r (expected name=seconds)", item)
    return points


_POINTS = _parse(os.environ.get("FL_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Pause here if the failpoint ``name`` is set."""
    seconds = _POINTS.get(name)
    if seconds is not None:
        log.warning("failpoint %s reached; sleeping %.1fs", name, seconds)
        time.sleep(seconds)
