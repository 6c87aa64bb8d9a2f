"""Run a WSGI app (the coordinator's Flask app) from an ASGI server, in a pool of request threads.

Each request costs one hop from the event loop to a request thread and one back: a body of at most PRELOAD_BYTES
is read in the loop before the thread starts, and the thread hands back the whole answer (status, headers,
body). Larger bodies (update uploads) stream into the thread chunk by chunk (a2wsgi's ``Body``). a2wsgi's own
middleware hands every message of a response from the thread to the loop and waits for it; measured here, that
halved the requests per second a core serves (heartbeats: 530/s), so only its environ builder and body reader
are used.

``inline=True`` runs the app in the loop's own thread instead: for the few views that only read memory under the
federation's lock (health, heartbeats, the first look of a long poll). The hop to a thread and back, and the
GIL handed between the two, cost about 40% of such a request (measured: 700 against 430 us of CPU per
heartbeat on a new connection); the caller decides (:class:`~fedrest.server.long_polls.LongPollFront`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from a2wsgi.wsgi import Body, build_environ

log = logging.getLogger("fl.serving")

PRELOAD_BYTES = 64 * 1024  # bodies up to this size are read before the view runs (registrations, evaluations)
DRAIN_BYTES = 256 * 1024 * 1024  # an unread body up to this size is read to its end before the answer is sent


class WSGIBridge:
    """ASGI app running the WSGI ``app`` in ``threads`` request threads (see the module docstring)."""

    def __init__(self, app, threads: int) -> None:
        self.app = app
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="request")

    async def __call__(self, scope, receive, send, inline: bool = False) -> None:
        loop = asyncio.get_running_loop()
        preloaded = await _preload(scope, receive)
        stream = Body(loop, receive) if preloaded is None else io.BytesIO(preloaded)
        environ = build_environ(scope, stream)
        if inline and preloaded is not None:
            status, headers, chunks = _run(self.app, environ)
        else:
            status, headers, chunks = await loop.run_in_executor(self.executor, _run, self.app, environ)
        if isinstance(stream, Body) and stream.has_more:
            await _drain(scope, receive, stream)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for chunk in chunks:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    def close(self) -> None:
        """Let the request threads end once their requests are done."""
        self.executor.shutdown(wait=False)


async def _preload(scope, receive) -> bytes | None:
    """The whole body when it is small (or absent); None when it must be streamed."""
    length = None
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            length = int(value) if value.isdigit() else None
        elif name == b"transfer-encoding":
            return None
    if length is None or length > PRELOAD_BYTES:
        return b"" if length is None and scope["method"] in ("GET", "HEAD", "DELETE") else None
    if length == 0:
        return b""
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return b"".join(parts)


async def _drain(scope, receive, stream: Body) -> None:
    """Read and drop the rest of a body the view answered without reading (a 401, a 409 or a 503 ``busy`` before
    an upload's body), when it is at most DRAIN_BYTES: a client that sends all of its body before it reads the
    answer (``Connection: close`` ones too) then gets the answer, not a connection reset. A longer or an unsized
    body is not read: the connection is closed after the answer, as before."""
    length = next((int(v) for k, v in scope.get("headers", ()) if k == b"content-length" and v.isdigit()), None)
    if length is None or length > DRAIN_BYTES:
        return
    stream.buffer.clear()
    while stream._has_more:
        message = await receive()
        stream._has_more = message["type"] == "http.request" and message.get("more_body", False)


def _run(app, environ) -> tuple[int, list, list]:
    """Call the WSGI app in this thread; returns (status, headers as ASGI byte pairs, body chunks)."""
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"] = int(status.split(" ", 1)[0])
        answer["headers"] = [(k.strip().lower().encode("latin1"), v.strip().encode("latin1")) for k, v in headers]
        return lambda chunk: chunks.append(chunk)

    chunks: list = []
    try:
        iterable = app(environ, start_response)
        try:
            chunks.extend(iterable)
        finally:
            getattr(iterable, "close", lambda: None)()
    except Exception:  # a bug in the app: Flask answers its own errors; this is what escaped it
        log.error("request %s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                  exc_info=sys.exc_info())
        return 500, [(b"content-type", b"application/json")], [b'{"error": "internal", "message": "internal error"}']
    return answer["status"], answer["headers"], chunks
