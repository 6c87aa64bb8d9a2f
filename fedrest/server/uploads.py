"""Update uploads in progress: how many may be received at once, and the files their parts stream into.

An upload's file parts are written to disk as they arrive (:class:`StreamingRequest`): a 4.8 MB update costs a
few 64 KiB buffers in memory while it is received, then its own decoded size while it is checked, not the bytes
copied several times. The uploads in progress are capped (:class:`UploadSlots`, MAX_UPLOADS): each holds a
request thread and, while it is checked, its decoded state_dict; one over the cap is answered 503 ``busy`` with a
jittered Retry-After before its body is read, and the worker sends it again then (its retry policy: 5xx).
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import threading
import time
from pathlib import Path

from flask import Request, current_app

from fedrest.server.http_errors import ApiError

log = logging.getLogger("fl.federation")

RETRY_AFTER_S = (1.0, 4.0)  # a refused upload is told to come back after a uniform draw from this range, seconds
WARN_EVERY_S = 30.0  # at most one warning per this many seconds while the cap refuses uploads


def upload_cap(cfg) -> int:
    """The uploads received at once: MAX_UPLOADS, at most half the request threads (the others answer
    heartbeats, polls and status requests meanwhile)."""
    cap = min(cfg.max_uploads, max(1, cfg.server_threads // 2))
    if cap < cfg.max_uploads:
        log.info("receiving at most %d update uploads at once (half of --server-threads %d; --max-uploads %d)",
                 cap, cfg.server_threads, cfg.max_uploads)
    return cap


class UploadSlots:
    """At most ``limit`` uploads received at once (thread-safe). ``clock``: monotonic seconds."""

    def __init__(self, limit: int, clock=time.monotonic) -> None:
        self.limit = limit
        self.in_progress = 0
        self.refused_total = 0  # uploads answered 503 busy since the start
        self._lock = threading.Lock()
        self._clock = clock
        self._warned_at: float | None = None

    def try_acquire(self) -> bool:
        """Take a slot for one upload (give it back with :meth:`release`); False when all are taken (then
        answer :meth:`busy`). A warning is logged, at most every WARN_EVERY_S, while the cap refuses uploads."""
        with self._lock:
            if self.in_progress < self.limit:
                self.in_progress += 1
                return True
            self.refused_total += 1
            now = self._clock()
            warn = self._warned_at is None or now - self._warned_at >= WARN_EVERY_S
            if warn:
                self._warned_at = now
        if warn:
            log.warning("%d update uploads in progress, the cap (--max-uploads): further uploads are answered 503 "
                        "and sent again by their workers (%d refused so far)", self.limit, self.refused_total)
        return False

    def busy(self) -> ApiError:
        """The answer to an upload over the cap: 503 ``busy``, to be sent again after a jittered wait
        (``Retry-After`` in whole seconds, ``retry_after_s`` exact; drawn from RETRY_AFTER_S)."""
        wait = random.uniform(*RETRY_AFTER_S)
        return ApiError(503, "busy", f"{self.limit} update uploads are being received; send this one again in "
                                     f"{wait:.1f}s", headers={"Retry-After": str(math.ceil(wait))},
                        retry_after_s=round(wait, 3))

    def release(self) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        with self._lock:
            self.in_progress -= 1


class StreamingRequest(Request):
    """Flask's request, with every uploaded file part written straight to a file of the update spool's
    ``incoming`` folder (mode 0600) instead of memory or the system's temporary folder (often RAM, tmpfs).
    The views read the parts' files by name (:func:`part_path`); a file no view moved away is removed when the
    request ends."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        folder = current_app.extensions["federation"].spool.incoming
        folder.mkdir(parents=True, exist_ok=True)
        stream = tempfile.NamedTemporaryFile(prefix=".upload-", suffix=".tmp", dir=folder, delete=False)
        self.__dict__.setdefault("fl_part_files", []).append(Path(stream.name))
        return stream

    def close(self) -> None:
        super().close()
        for path in self.__dict__.get("fl_part_files", ()):
            path.unlink(missing_ok=True)


def part_path(upload) -> Path:
    """The file an uploaded part (a werkzeug FileStorage of a :class:`StreamingRequest`) was written to, flushed
    and closed; its size is the part's."""
    upload.stream.flush()
    name = Path(upload.stream.name)
    upload.stream.close()
    return name
