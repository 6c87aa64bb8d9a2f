"""Failpoints: named places where a test can make the coordinator pause, to kill it there on purpose.

``FL_FAILPOINTS="aggregate.before_commit=30,atomic_write.before_replace=30@3"`` makes :func:`hit` log
``failpoint <name> reached`` and sleep that many seconds at those places; ``@N`` pauses only at the N-th
pass. Unset (always, outside the fault-injection tests), :func:`hit` does nothing. Names in use:
``aggregate.before_checkpoint``, ``checkpoint.between_files``, ``aggregate.before_commit``,
``atomic_write.before_replace``, and after a round's commit (:meth:`RoundDriver._follow_up`)
``round.after_commit``, ``follow_up.before_checkpoint``, ``follow_up.before_store``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("fl.failpoints")


def _parse(text: str) -> dict[str, tuple[float, int | None]]:
    points = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, spec = item.partition("=")
        seconds, _, nth = spec.partition("@")
        try:
            points[name.strip()] = (float(seconds), int(nth) if nth else None)
        except ValueError:
            log.warning("ignoring malformed failpoint %r (expected name=seconds or name=seconds@N)", item)
    return points


_POINTS = _parse(os.environ.get("FL_FAILPOINTS", ""))
_PASSES: dict[str, int] = {}
_LOCK = threading.Lock()


def hit(name: str) -> None:
    """Pause here if the failpoint ``name`` is set (and this is its chosen pass)."""
    point = _POINTS.get(name)
    if point is None:
        return
    seconds, nth = point
    with _LOCK:
        _PASSES[name] = _PASSES.get(name, 0) + 1
        current = _PASSES[name]
    if nth is None or nth == current:
        log.warning("failpoint %s reached (pass %d); sleeping %.1fs", name, current, seconds)
        time.sleep(seconds)
