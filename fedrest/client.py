"""HTTP client of the coordinator's API v1, for workers, monitors and the launcher.

Every call has a connect and a read timeout (seconds). Connection failures, read timeouts and the
answers 429/502/503/504 are retried by urllib3's ``Retry`` with exponential backoff and jitter; a
caller that wants to outlast a longer outage catches :class:`CoordinatorUnreachable` and tries again
later. Error answers become :class:`CoordinatorError` carrying the JSON ``error``/``message``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import logging
import socket
import ssl
from typing import Any, Mapping
from urllib.parse import quote

import requests
import truststore
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

log = logging.getLogger("fl.client")

API = "/api/v1"
CONNECT_TIMEOUT = 5.0  # seconds
READ_TIMEOUT = 30.0  # seconds, beyond any long-poll wait
UPLOAD_READ_TIMEOUT = 120.0  # seconds: the coordinator validates and fsyncs before answering


class CoordinatorError(Exception):
    """The coordinator answered with an error status.

    Attributes: ``status`` (HTTP code), ``error`` (machine-readable name), ``message``, ``body`` (dict).
    """

    def __init__(self, status: int, error: str, message: str, body: Mapping | None = None) -> None:
        super().__init__(f"HTTP {status} {error}: {message}")
        self.status, self.error, self.message, self.body = status, error, message, dict(body or {})


class CoordinatorUnreachable(Exception):
    """No answer from the coordinator after the retries (refused, reset, timed out, DNS)."""


class CoordinatorUntrusted(Exception):
    """The coordinator's TLS certificate could not be verified (not retried: it will not fix itself)."""


def tls_context(ca_cert: str | None) -> ssl.SSLContext:
    """The client TLS context: trust ``ca_cert`` (PEM file) only, or else the operating system's trust store.

    Certificates and host names are always verified (TLS 1.2 or newer).

    Raises
    ------
    OSError, ssl.SSLError
        If ``ca_cert`` cannot be read or holds no PEM certificate.
    """
    if ca_cert:
        context = ssl.create_default_context(cafile=ca_cert)
    else:  # the system store (Windows, macOS keychain, Linux bundles) rather than certifi's copy
        context = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _TLSAdapter(HTTPAdapter):
    def __init__(self, context: ssl.SSLContext, **kwargs) -> None:
        self._context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._context
        return super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn, url, verify, cert):
        # The context already holds the trust anchors; requests would add certifi's bundle to it.
        super().cert_verify(conn, url, False if verify is True else verify, cert)
        if url.lower().startswith("https") and verify is not False:
            conn.cert_reqs = "CERT_REQUIRED"


def base_url(address: str) -> str:
    """``HOST:PORT``, ``http://HOST:PORT`` or ``https://...`` -> URL without trailing slash. An IPv6 host is
    written in brackets: ``[::1]:5000``.

    Raises
    ------
    ValueError
        If the address has no port, an unknown scheme, a path, or an IPv6 host without brackets.
    """
    given = address.strip()
    address = given.rstrip("/")
    if "://" not in address:
        address = "http://" + address
    scheme, _, rest = address.partition("://")
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported scheme {scheme!r} in {given!r}; use http or https")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host or "@" in host:
        raise ValueError(f"coordinator address must look like HOST:PORT, got {given!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:
        raise ValueError(f"an IPv6 address needs brackets: {scheme}://[{host}]:{port}, got {given!r}")
    if bracketed and not _is_ipv6(host[1:-1]):
        raise ValueError(f"{host} is not an IPv6 address, in {given!r}")
    return address


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def make_session(total_retries: int = 6, backoff_factor: float = 0.5, backoff_max: float = 10.0,
                 ca_cert: str | None = None) -> requests.Session:
    """A requests Session whose calls are retried with exponential backoff and jitter.

    Sleeps between tries: backoff_factor * 2**(n-1) seconds plus up to 0.5 s jitter, at most
    ``backoff_max``. Every method is retried (uploads too: a repeated upload is answered 409
    duplicate_update, which the worker counts as accepted). A 429 answer is retried after its
    ``Retry-After``. https:// is verified against ``ca_cert`` or the system trust store (:func:`tls_context`).
    """
    retry = Retry(total=total_retries, connect=total_retries, read=2, status=3, other=0,
                  backoff_factor=backoff_factor, backoff_max=backoff_max, backoff_jitter=0.5,
                  status_forcelist=(429, 502, 503, 504), allowed_methods=None,
                  raise_on_status=False, respect_retry_after_header=True)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", _TLSAdapter(tls_context(ca_cert), max_retries=retry))
    return session


class CoordinatorClient:
    """Typed calls of the API v1.

    Parameters
    ----------
    address : ``HOST:PORT`` or a URL.
    token : Bearer token (join token before registration, the node token after).
    session : a Session from :func:`make_session` (one per thread: Sessions are not thread-safe).
    ca_cert : PEM file to trust for https:// (used when no ``session`` is given).
    """

    def __init__(self, address: str, token: str | None = None, session: requests.Session | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, ca_cert: str | None = None) -> None:
        self.url = base_url(address)
        self.token = token
        self.session = session or make_session(ca_cert=ca_cert)
        self.connect_timeout = connect_timeout

    def _request(self, method: str, path: str, *, expected=(200,), read_timeout: float = READ_TIMEOUT,
                 token: str | None = None, **kwargs) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        bearer = token if token is not None else self.token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            response = self.session.request(method, self.url + API + path, headers=headers,
                                            timeout=(self.connect_timeout, read_timeout), **kwargs)
        except requests.exceptions.SSLError as exc:
            raise CoordinatorUntrusted(_tls_message(self.url, exc)) from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as exc:  # refused, reset, timed out, cut mid-body
            if _looks_cut(exc) and self.url.startswith("http://") and _speaks_tls(self.url):
                host_port = self.url.partition("://")[2]
                raise CoordinatorUntrusted(f"{self.url} speaks TLS (HTTPS), not plain HTTP: use "
                                           f"--coordinator-address https://{host_port} with --ca-cert and the "
                                           "coordinator's certificate") from None
            raise CoordinatorUnreachable(f"{method} {self.url}{API}{path}: {_short(exc)}") from None
        if response.status_code not in expected:
            raise _error_from(response)
        return response

    def _json(self, method: str, path: str, **kwargs) -> dict:
        response = self._request(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            raise CoordinatorError(response.status_code, "bad_response", "answer is not JSON") from None
        if not isinstance(body, dict):
            raise CoordinatorError(response.status_code, "bad_response", "answer is not a JSON object")
        return body

    def health(self) -> dict:
        return self._json("GET", "/health", read_timeout=10.0)

    def register(self, name: str, device: str, num_samples: int, system_info: Mapping[str, Any],
                 join_token: str | None, instance_id: str | None = None,
                 task: Mapping[str, Any] | None = None, eval_samples: int = 0) -> tuple[dict, bool]:
        """Register; returns (answer with node_id/node_token/heartbeat_interval, created). ``task``: the task's
        fingerprint (:mod:`fedrest.tasks.fingerprint`), checked by the coordinator (409 task_mismatch);
        ``eval_samples``: examples held out for federated evaluation."""
        body = {"name": name, "device": device, "num_samples": num_samples, "system_info": dict(system_info)}
        if instance_id is not None:
            body["instance_id"] = instance_id
        if task is not None:
            body["task"] = dict(task)
        if eval_samples:
            body["eval_samples"] = eval_samples
        response = self._request("POST", "/nodes", expected=(200, 201), token=join_token or "", json=body)
        return response.json(), response.status_code == 201

    def heartbeat(self, node_id: str) -> dict:
        return self._json("POST", f"/nodes/{node_id}/heartbeat", read_timeout=10.0)

    def leave(self, node_id: str) -> dict:
        return self._json("DELETE", f"/nodes/{node_id}", read_timeout=5.0)

    def task(self, wait: float = 0.0) -> dict:
        """The node's task; with ``wait`` > 0 the coordinator holds the request up to that many seconds."""
        return self._json("GET", "/task", params={"wait": f"{wait:g}"}, read_timeout=wait + READ_TIMEOUT)

    def model(self) -> tuple[int, bytes]:
        """(model version, serialised global state_dict)."""
        response = self._request("GET", "/model", read_timeout=60.0)
        return int(response.headers.get("X-Model-Version", "-1")), response.content

    def submit_evaluation(self, round_number: int, num_samples: int, metrics: Mapping[str, float]) -> dict:
        """Send the metrics of global model ``round_number`` on ``num_samples`` held-out examples; the 202 answer."""
        return self._json("POST", f"/rounds/{round_number}/evaluation", expected=(202,),
                          json={"num_samples": num_samples, "metrics": dict(metrics)})

    def control_variate(self) -> tuple[int, bytes]:
        """(model version, serialised global control variate of SCAFFOLD)."""
        response = self._request("GET", "/control-variate", read_timeout=60.0)
        return int(response.headers.get("X-Model-Version", "-1")), response.content

    def submit_update(self, round_number: int, metadata: Mapping[str, Any], data: bytes,
                      control: bytes | None = None) -> dict:
        """Upload one update as multipart/form-data (with SCAFFOLD's control-variate change as the file part
        ``control_variate``); returns the 202 answer."""
        files = {"metadata": (None, json.dumps(dict(metadata)), "application/json"),
                 "state_dict": ("state_dict.pt", data, "application/octet-stream")}
        if control is not None:
            files["control_variate"] = ("control_variate.pt", control, "application/octet-stream")
        return self._json("POST", f"/rounds/{round_number}/updates", files=files, expected=(202,),
                          read_timeout=UPLOAD_READ_TIMEOUT)

    def status(self) -> dict:
        return self._json("GET", "/status", read_timeout=10.0)

    # operator calls (the admin token as ``token``)

    def rotate_token(self, kind: str) -> dict:
        """Replace the ``kind`` token (join, monitor, admin); the answer holds the new one."""
        return self._json("POST", f"/admin/tokens/{quote(kind, safe='')}")

    def ban(self, node: str, reason: str = "") -> dict:
        """Ban a node by id or name."""
        return self._json("POST", f"/admin/nodes/{quote(node, safe='')}/ban",
                          json={"reason": reason} if reason else None)

    def unban(self, node: str) -> dict:
        """Lift the ban of a node (by id or name)."""
        return self._json("DELETE", f"/admin/nodes/{quote(node, safe='')}/ban")


def _error_from(response: requests.Response) -> CoordinatorError:
    return error_from_answer(response.status_code, response.content, response.reason or "")


def error_from_answer(status: int, content: bytes, reason: str = "") -> CoordinatorError:
    """The :class:`CoordinatorError` of an error answer: its JSON ``error`` and ``message``, or its first 200
    characters (``reason``, the HTTP reason phrase, when it has none)."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        return CoordinatorError(status, str(body["error"]), str(body.get("message", "")), body)
    return CoordinatorError(status, "http_error", content[:200].decode("utf-8", "replace").strip() or reason)


def _looks_cut(exc: Exception) -> bool:
    """A connection the server closed or reset on the first request (what a TLS server does to plain HTTP)."""
    text = str(exc).lower()
    return any(word in text for word in ("reset", "aborted", "remotedisconnected"))


def _speaks_tls(url: str, timeout: float = 3.0) -> bool:
    """Whether the server at ``url`` (HOST:PORT of an http:// URL) completes a TLS handshake: a plain-HTTP
    request to an HTTPS coordinator ends in a connection reset, which is otherwise read as an outage."""
    host_port = url.partition("://")[2]
    host, _, port = host_port.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asking whether it speaks TLS; nothing is sent
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host.strip("[]")):
                return True
    except (OSError, ssl.SSLError, ValueError):
        return False


def _tls_message(url: str, exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"certificate verify failed: ([^(')\"]*)", text)
    if match:
        return (f"cannot verify the TLS certificate of {url}: {match.group(1).strip()}. Pass --ca-cert with the "
                "coordinator's certificate (the file given to its --certfile, or the CA that signed it), or add "
                "it to this machine's trust store")
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return f"{url} does not speak TLS; use http:// for a coordinator started without --certfile"
    return f"TLS handshake with {url} failed: {_short(exc)}"


def _short(exc: Exception) -> str:
    """The root cause of a requests error in a few words ("[Errno 111] Connection refused", "read timed out")."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if match:
        return match.group(0).strip()
    if "timed out" in text:
        return "timed out"
    return text if len(text) <= 200 else text[:200] + "..."
