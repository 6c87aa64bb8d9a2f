"""Serve the coordinator's WSGI app over HTTP or HTTPS: uvicorn's asyncio server, with the Flask app in a pool of
request threads (:mod:`.wsgi_bridge`) behind :class:`~fedrest.server.long_polls.LongPollFront`.

Why this design (the README's "How a round works" says it for users): a worker waits for its next task in a long
poll of up to 60 s. A thread-per-request server (cheroot, used before) held one request thread per waiting worker,
so 64 idle workers froze health checks, heartbeats and uploads, and its single accept thread performed TLS
handshakes one at a time (one silent connection froze HTTPS for 30 s). Here every connection is a coroutine of one
event loop: handshakes interleave (a silent or slow one delays nobody), idle keep-alive connections cost no thread,
and a waiting worker is parked as a future, not a thread (:mod:`.long_polls`); the request threads only run the
Flask views. uvicorn is pure Python over asyncio (Linux, macOS, Windows); httptools parses HTTP; uvloop, where it
is installed (not on Windows), runs the event loop at about twice the requests per core of asyncio's own.

Size limits are left to the app (it checks Content-Length before reading a body and answers 413 as JSON); the
server bounds the request line plus headers (431) and cuts a connection silent for ``client_timeout`` seconds.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fedrest.server.long_polls import LongPollFront

log = logging.getLogger("fl.serving")

FULL_COLLECTION_EVERY_S = 600.0  # seconds between full garbage collections (tune_garbage_collector)
NEVER = 2**31 - 1  # a generation-2 threshold the collector never reaches by itself
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # not "Started server process" at every start

MAX_HEADER_BYTES = 64 * 1024  # request line plus headers; larger ones get 431
SPARE_CONNECTIONS = 256  # connections beyond two per node (a node's poll and heartbeat sessions), monitors


class TLSConfigError(ValueError):
    """The certificate or key file cannot be used (missing, unreadable, not PEM, key does not match)."""


class PendingApp:
    """A WSGI app that answers 503 (retry in 1 s) until ``app`` is set: the port is bound before the coordinator
    builds its state, so that a start that cannot listen changes nothing."""

    def __init__(self) -> None:
        self.app = None

    def __call__(self, environ, start_response):
        app = self.app
        if app is None:
            start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1")])
            return [b'{"error": "starting", "message": "the coordinator is starting; retry in a second"}']
        return app(environ, start_response)


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, plus: a new connection that sends nothing is closed after the keep-alive
    timeout (uvicorn only times out connections that have completed a request), and a request line plus headers
    above MAX_HEADER_BYTES is answered 431."""

    def connection_made(self, transport) -> None:  # noqa: D102 - asyncio's hook
        super().connection_made(transport)
        self._header_bytes = 0
        self._headers_too_large = False
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def on_message_begin(self) -> None:  # noqa: D102 - httptools' callback
        super().on_message_begin()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:  # noqa: D102
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:  # noqa: D102
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            self._headers_too_large = True
            raise ValueError("request headers too large")  # ends feed_data as an HttpParserError

    def send_400_response(self, msg: str) -> None:  # noqa: D102 - uvicorn's answer to an unparsable request
        if self._headers_too_large:
            status = b"431 Request Header Fields Too Large"
            answer = {"error": "headers_too_large",
                      "message": f"the request line and headers exceed {MAX_HEADER_BYTES} bytes"}
        else:  # a garbled request line or header, a bad Content-Length: the same JSON shape as every error
            status = b"400 Bad Request"
            answer = {"error": "bad_request", "message": f"not a valid HTTP/1.1 request ({msg.rstrip('.')})"}
        body = json.dumps(answer).encode()
        self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (status, len(body), body))
        self.transport.close()


class Server:
    """An HTTP(S) server bound at construction (so that an address in use is an error at start-up); ``serve``
    runs its event loop in the calling thread until ``stop``."""

    def __init__(self, front: LongPollFront, sock: socket.socket, config: uvicorn.Config) -> None:
        self.front = front
        self.sock = sock
        self._server = uvicorn.Server(config)
        self._running = threading.Event()
        self._served = threading.Event()

    @property
    def bind_addr(self) -> tuple:
        """The (host, port, ...) the server listens on."""
        return self.sock.getsockname()

    def serve(self) -> None:
        """Serve until :meth:`stop` (blocks; run it in a thread)."""
        self._running.set()
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self._served.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish the requests in progress (up to ``timeout`` seconds), close the socket."""
        self._server.should_exit = True
        if self._running.is_set():
            self._served.wait(timeout)
        self.front.close()
        self.sock.close()


def tune_garbage_collector(every_s: float = FULL_COLLECTION_EVERY_S) -> None:
    """Keep the cyclic garbage collector's full collections out of the way of requests; call it once the app is
    built, before serving.

    A full collection walks every tracked object while it holds the GIL, and every request waits meanwhile.
    Measured on this repository's 2-core machine: 170 ms before a single node registered (torch and Flask are
    about 350,000 objects), 0.4-0.9 s with 10,000 waiting nodes (about 65 objects per open connection), and
    CPython started one every few seconds, because its trigger counts the objects that outlive two young
    collections and a long poll's objects do (they then die by reference counting, not by the collector).
    So: what start-up built is collected once and frozen (``gc.freeze``: it lives as long as the process), the
    young generations are collected as usual (they catch almost every reference cycle), and the full collection
    runs every ``every_s`` seconds from a thread of its own instead of whenever the counts say so.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, NEVER)
    threading.Thread(target=_collect_fully, args=(every_s,), name="full-gc", daemon=True).start()


def _collect_fully(every_s: float) -> None:
    while True:
        time.sleep(every_s)
        t0 = time.perf_counter()
        found = gc.collect()
        log.debug("full garbage collection: %d unreachable objects, %.0f ms", found, 1000 * (time.perf_counter() - t0))


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server context for the pair (TLS 1.2 or newer), loaded now so that a bad file is reported at start-up,
    not at the first handshake.

    Raises
    ------
    TLSConfigError
        Naming the file and the reason.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise TLSConfigError(f"no such file: {exc.filename}") from None
    except PermissionError as exc:
        raise TLSConfigError(f"cannot read {exc.filename}: permission denied") from None
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{certfile} / {keyfile}: not a PEM certificate and matching private key "
                             f"({exc.reason or exc})") from None
    return context


def check_tls_files(certfile: str, keyfile: str) -> None:
    """Raises :class:`TLSConfigError` when the pair cannot be loaded (see :func:`tls_context`)."""
    tls_context(certfile, keyfile)


def connection_budget(max_nodes: int) -> int:
    """Connections served at once: two per node (its long poll and its heartbeats) plus SPARE_CONNECTIONS; more
    are answered 503. Also the listen backlog (the kernel may cap it: net.core.somaxconn on Linux)."""
    return 2 * max_nodes + SPARE_CONNECTIONS


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft limit of open files towards ``wanted`` (each connection is one); returns the
    limit in force (``wanted`` where the platform has no such limit: Windows)."""
    try:
        import resource
    except ImportError:  # Windows: no per-process descriptor limit of this kind
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # pragma: no cover - a platform that refuses within the hard limit
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def make_server(app, host: str, port: int, *, threads: int, client_timeout: float, max_nodes: int = 1000,
                certfile: str | None = None, keyfile: str | None = None) -> Server:
    """A server for the WSGI ``app``, bound (``port`` 0 picks a free one: see ``server.bind_addr``).

    Parameters
    ----------
    threads : request threads that run the Flask views (a long poll holds none while it waits).
    client_timeout : seconds a connection may stay silent (before its first request, between requests, or while
        it sends a request body) before it is closed.
    max_nodes : MAX_NODES; sizes the connection budget and the listen backlog (:func:`connection_budget`).
    certfile, keyfile : PEM files; both given -> HTTPS (TLS 1.2 or newer), neither -> plain HTTP.

    Raises
    ------
    TLSConfigError
        For an unusable certificate or key.
    OSError
        If the address cannot be bound.
    """
    context = tls_context(certfile, keyfile) if certfile else None
    budget = connection_budget(max_nodes)
    files = raise_open_file_limit(budget + threads + 256)
    if files < budget + 64:
        budget = max(64, files - 64)
        log.warning("the open-file limit (%d) allows %d connections, fewer than MAX_NODES=%d need; raise it "
                    "(ulimit -n) for more nodes", files, budget, max_nodes)
    sock = _bind(host, port, budget)
    front = LongPollFront(app, threads=threads, client_timeout=client_timeout)
    config = uvicorn.Config(front, http=_Protocol, lifespan="off", loop="auto", log_config=None,
                            access_log=False, server_header=False, limit_concurrency=budget, backlog=budget,
                            timeout_keep_alive=int(max(1, client_timeout)), timeout_graceful_shutdown=5,
                            ssl_context_factory=(lambda _config, _default: context) if context else None)
    return Server(front, sock, config)


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, backlog=backlog,
                                reuse_port=False, dualstack_ipv6=False)
    sock.set_inheritable(True)
    return sock


def bound_port(server: Server) -> int:
    """The TCP port ``server`` listens on (after :func:`make_server`)."""
    return server.bind_addr[1]
