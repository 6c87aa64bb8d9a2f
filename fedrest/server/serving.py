"""Serve the coordinator's WSGI app over HTTP or HTTPS with cheroot (pure Python: Linux, macOS, Windows).

waitress, used before, has no TLS; cheroot (CherryPy's server) has the standard library's ``ssl`` built in,
a fixed pool of request threads, and a per-connection socket timeout that ends slow clients.

Size limits are left to the app (coordinator.py checks Content-Length before reading a body and answers
413 as JSON); the server only bounds the request line and headers.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

log = logging.getLogger("fl.serving")

MAX_HEADER_BYTES = 64 * 1024  # request line plus headers; larger ones get the server's own 413


class TLSConfigError(ValueError):
    """The certificate or key file cannot be used (missing, unreadable, not PEM, key does not match)."""


class _Server(wsgi.Server):
    def error_log(self, msg="", level=logging.INFO, traceback=False):  # noqa: D102 - cheroot's hook
        # Failed TLS handshakes and dropped sockets are the client's problem: keep them out of stderr.
        log.log(logging.DEBUG if level < logging.ERROR else logging.WARNING, "%s", str(msg).strip(),
                exc_info=traceback)


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


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_tls_files(certfile: str, keyfile: str) -> None:
    """Load the pair once so that a bad file is reported at start-up, not at the first handshake.

    Raises
    ------
    TLSConfigError
        Naming the file and the reason.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise TLSConfigError(f"no such file: {exc.filename}") from None
    except PermissionError as exc:
        raise TLSConfigError(f"cannot read {exc.filename}: permission denied") from None
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{certfile} / {keyfile}: not a PEM certificate and matching private key "
                             f"({exc.reason or exc})") from None


def make_server(app, host: str, port: int, *, threads: int, client_timeout: float,
                certfile: str | None = None, keyfile: str | None = None) -> wsgi.Server:
    """A cheroot server for ``app``, bound (``port`` 0 picks a free one: see ``server.bind_addr``).

    Parameters
    ----------
    threads : request threads (a long poll holds one while it waits).
    client_timeout : seconds a connection may stay silent while sending a request (slow clients are cut).
    certfile, keyfile : PEM files; both given -> HTTPS (TLS 1.2 or newer), neither -> plain HTTP.

    Raises
    ------
    TLSConfigError
        For an unusable certificate or key.
    OSError
        If the address cannot be bound.
    """
    server = _Server((host, port), app, numthreads=threads, max=threads, request_queue_size=128,
                     timeout=client_timeout, shutdown_timeout=5, server_name="fl-coordinator")
    server.max_request_header_size = MAX_HEADER_BYTES
    server.max_request_body_size = 0  # the app checks it, per endpoint, and answers JSON
    if certfile:
        check_tls_files(certfile, keyfile)
        adapter = BuiltinSSLAdapter(certfile, keyfile)
        adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2
        server.ssl_adapter = adapter
    server.prepare()  # binds now, so that an address in use is an error at start-up
    return server


def bound_port(server: wsgi.Server) -> int:
    """The TCP port ``server`` listens on (after :func:`make_server`)."""
    return server.bind_addr[1]
