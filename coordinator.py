"""The coordinator: a Flask REST service that runs the rounds of federated training.

``create_app(config)`` builds the app around one :class:`federation.Federation` (kept in
``app.extensions["federation"]``), so every test gets a fresh coordinator. ``python coordinator.py``
serves it with cheroot over HTTP or HTTPS (serving.py; ``--debug``: Flask's development server). The wire
contract is docs/openapi.json (served at /api/v1/openapi.json) and docs/API.md.

Access: workers register with the join token and then use their own node token; monitors and the dashboard
read with the monitor token; the operator rotates tokens and bans nodes with the admin token (admin.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Mapping

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import config as config_module
import metrics
from aggregation import UpdateNormTooLarge
from config import COORDINATOR_FIELDS, Config
from credentials import KINDS, Credentials, token_path
from federation import (Conflict, Federation, Forbidden, Node, UnknownNode, archive_run, resume_config,
                        stored_run_config)
from ratelimit import RateLimiter, retry_after_header
from store import StoreError
from serving import TLSConfigError, bound_port, is_loopback, make_server
from utils import UpdateRejected, run_program, set_cpu_threads, setup_logging

log = logging.getLogger("fl.coordinator")

API = "/api/v1"
STATIC_DIR = Path(__file__).resolve().parent / "static"
JSON_BODY_LIMIT = 64 * 1024  # bytes, every endpoint but update uploads
METADATA_LIMIT = 256 * 1024  # bytes of a non-file form field (werkzeug also applies it per read chunk of 64 KiB)
MULTIPART_SLACK = 64 * 1024  # bytes of multipart framing and metadata allowed above MAX_UPDATE_BYTES
MAX_NAME_LENGTH = 128
MAX_DEVICE_LENGTH = 64
MAX_SYSTEM_INFO_BYTES = 4096
MAX_LONG_POLL = 60.0  # seconds
MAX_NUM_SAMPLES = 10**9
MAX_TOKEN_LENGTH = 512  # characters of a Bearer token; longer ones are refused unread
BURST = 5.0  # a rate limit of r requests/s allows bursts of BURST * r
NODE_ID = re.compile(r"[0-9a-f]{16}")
OPENAPI_PATH = Path(__file__).resolve().parent / "docs" / "openapi.json"


class ApiError(HTTPException):
    """An HTTP error answered as JSON ``{"error": ..., "message": ...}`` plus optional details."""

    def __init__(self, code: int, error: str, message: str, headers: Mapping[str, str] | None = None,
                 **details) -> None:
        super().__init__(message)
        self.code, self.error, self.message, self.details = code, error, message, details
        self.extra_headers = dict(headers or {})


def _json_error(code: int, error: str, message: str, headers=None, **details) -> Response:
    response = jsonify({"error": error, "message": message, **details})
    response.status_code = code
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _error_name(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


# ----------------------------------------------------------------------------- request helpers


def _federation() -> Federation:
    return current_app.extensions["federation"]


def _credentials() -> Credentials:
    return current_app.extensions["credentials"]


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip() or len(value) > MAX_TOKEN_LENGTH:
        return None
    return value.strip()


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def _rate_limit(key: str, limiter_name: str = "credential_limiter", per: str = "credential") -> None:
    """Count one request against ``key``'s bucket of that limiter; 429 with Retry-After when it is empty."""
    limiter = current_app.extensions[limiter_name]
    if limiter is None:
        return
    wait = limiter.acquire(key)
    if wait > 0:
        _federation().count_refusal("too_many_requests")
        raise ApiError(429, "too_many_requests", f"rate limit of {limiter.rate:g} requests/s per {per} "
                       f"exceeded; retry in {wait:.1f}s", headers={"Retry-After": retry_after_header(wait)},
                       retry_after_s=round(wait, 3))


def _require_token(*kinds: str) -> str:
    """Check the Bearer token against the shared tokens of ``kinds`` (join, monitor, admin); returns the kind.

    With --no-auth, join and monitor access need no token (admin access always does).
    """
    if current_app.config["FL_NO_AUTH"] and kinds != ("admin",):
        return kinds[0]
    token = _bearer()
    names = " or ".join(f"{k} token" for k in kinds)
    if token is None:
        raise _unauthorized(f"expected the header Authorization: Bearer <{names}>")
    for kind in kinds:
        if _credentials().verify(kind, token):
            if kind != "join":
                _rate_limit(kind)
            return kind
    raise _unauthorized(f"wrong {names}")


def _require_node() -> Node:
    token = _bearer()
    if token is None:
        raise _unauthorized("expected the header Authorization: Bearer <node token>")
    node = _federation().authenticate(token)
    if node is None:
        raise _unauthorized("unknown, revoked or expired node token; register again")
    _rate_limit("node:" + node.node_id)
    return node


def _json_object() -> dict:
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send a JSON object with Content-Type: application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nesting deeper than the parser's recursion limit
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _finite_number(value, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, "bad_request", f"{name} must be a finite number")
    try:
        value = float(value)  # an int beyond float range raises OverflowError
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ApiError(400, "bad_request", f"{name} must be a finite number")
    if not lo <= value <= hi:
        raise ApiError(400, "bad_request", f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _positive_int(value, name: str, hi: int = MAX_NUM_SAMPLES) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise ApiError(400, "bad_request", f"{name} must be an integer in [1, {hi}], got {value!r}")
    return value


def _short_text(value, name: str, max_length: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise ApiError(400, "bad_request", f"{name} must be a non-empty string of at most {max_length} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ApiError(400, "bad_request", f"{name} must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800": not text, cannot be logged or shown
        raise ApiError(400, "bad_request", f"{name} must be valid unicode text") from None
    return value


def parse_update_metadata(raw: str | None, node: Node) -> dict:
    """Validate the ``metadata`` form field of an update upload.

    Returns a dict with ``num_samples`` (int in [1, the node's registered num_samples]) and the optional
    floats ``train_loss`` (>= 0), ``train_accuracy`` (in [0, 1]) and ``train_seconds`` (>= 0).

    Raises
    ------
    ApiError
        400 naming the bad field.
    """
    if raw is None:
        raise ApiError(400, "bad_request", "missing form field 'metadata' (JSON)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_request", "form field 'metadata' is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ApiError(400, "bad_request", "form field 'metadata' must be a JSON object")
    result = {"num_samples": _positive_int(meta.get("num_samples"), "metadata.num_samples",
                                           hi=max(1, node.num_samples))}
    for key, hi in (("train_loss", 1e12), ("train_accuracy", 1.0), ("train_seconds", 1e9)):
        if meta.get(key) is not None:
            result[key] = _finite_number(meta[key], f"metadata.{key}", 0.0, hi)
    return result


# ----------------------------------------------------------------------------- views

api = Blueprint("api_v1", __name__, url_prefix=API)


@api.get("/health")
def health():
    fed = _federation()
    return jsonify({"status": "ok", "api_version": 1, "state": fed.phase.value, "round": fed.round})


@api.post("/nodes")
def register():
    _require_token("join")
    body = _json_object()
    name = _short_text(body.get("name"), "name", MAX_NAME_LENGTH)
    device = _short_text(body.get("device"), "device", MAX_DEVICE_LENGTH)
    num_samples = _positive_int(body.get("num_samples"), "num_samples")
    system_info = body.get("system_info", {})
    try:
        encoded = json.dumps(system_info, allow_nan=False, ensure_ascii=False)
        encoded.encode("utf-8")  # lone surrogates cannot be logged or shown
    except ValueError:  # NaN/Infinity would make /status invalid JSON; UnicodeEncodeError is a ValueError
        raise ApiError(400, "bad_request", "system_info must not hold NaN, Infinity or invalid unicode") from None
    if not isinstance(system_info, dict) or len(encoded) > MAX_SYSTEM_INFO_BYTES:
        raise ApiError(400, "bad_request", f"system_info must be a JSON object of at most "
                                           f"{MAX_SYSTEM_INFO_BYTES} bytes")
    instance_id = body.get("instance_id")
    if instance_id is not None:
        instance_id = _short_text(instance_id, "instance_id", 64)
    fed = _federation()
    try:
        node, token, created = fed.register(name, device, num_samples, system_info, instance_id)
    except Conflict as exc:
        raise ApiError(409, exc.error, exc.message, **exc.details) from None
    except Forbidden as exc:
        raise ApiError(403, exc.error, exc.message) from None
    return jsonify({"node_id": node.node_id, "node_token": token, "name": node.name,
                    "heartbeat_interval": fed.config.heartbeat_interval,
                    "node_timeout": fed.config.node_timeout, "run_id": fed.run_id,
                    "model": fed.config.model, "dataset": fed.config.dataset}), (201 if created else 200)


def _own_node(node_id: str) -> Node:
    fed = _federation()
    try:
        if not NODE_ID.fullmatch(node_id):
            raise UnknownNode(node_id)
        fed.get_node(node_id)
    except UnknownNode:
        raise ApiError(404, "unknown_node", f"no node {node_id!r}; register again") from None
    node = _require_node()
    if node.node_id != node_id:
        raise ApiError(403, "forbidden", "a node may only act as itself")
    return node


@api.post("/nodes/<node_id>/heartbeat")
def heartbeat(node_id: str):
    node = _own_node(node_id)
    fed = _federation()
    return jsonify({"node_id": node.node_id, "round": fed.round, "state": fed.phase.value,
                    "model_version": fed.model_version, "node_status": fed.node_status(node),
                    "heartbeat_interval": fed.config.heartbeat_interval})


@api.delete("/nodes/<node_id>")
def leave(node_id: str):
    node = _own_node(node_id)
    _federation().leave(node)
    return jsonify({"node_id": node.node_id, "status": "offline"})


@api.get("/task")
def task():
    node = _require_node()
    raw_wait = request.args.get("wait", "0")
    try:
        wait = float(raw_wait)
    except ValueError:
        raise ApiError(400, "bad_request", f"wait must be a number of seconds, got {raw_wait!r}") from None
    if not 0 <= wait <= MAX_LONG_POLL:
        raise ApiError(400, "bad_request", f"wait must be in [0, {MAX_LONG_POLL:g}] seconds, got {raw_wait!r}")
    return jsonify(_federation().wait_for_task(node, wait))


@api.get("/model")
def model():
    _require_node()
    fed = _federation()
    version, data = fed.model_bytes()
    return Response(data, mimetype="application/octet-stream",
                    headers={"X-Model-Version": str(version), "X-Model-Name": fed.config.model,
                             "Cache-Control": "no-store"})


@api.post("/rounds/<int:round_number>/updates")
def submit_update(round_number: int):
    fed = _federation()
    node = _require_node()
    fed.count_received(request.content_length or 0)
    try:
        accepted = _accept_update(fed, node, round_number)
    except ApiError as exc:
        if exc.code in (400, 413):  # the node's answer for this round was refused: log and count it
            fed.record_rejection(node, round_number, exc.error, exc.message)
        raise
    return jsonify({"accepted": True, "round": round_number, "node_id": node.node_id,
                    "num_samples": accepted.num_samples}), 202


def _accept_update(fed: Federation, node: Node, round_number: int):
    limit = fed.config.max_update_bytes
    if request.content_length is not None and request.content_length > limit + MULTIPART_SLACK:
        raise _too_large(limit)
    if not request.mimetype == "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with fields "
                                                      "'metadata' (JSON) and 'state_dict' (file)")
    metadata = parse_update_metadata(request.form.get("metadata"), node)
    upload = request.files.get("state_dict")
    if upload is None:
        raise ApiError(400, "bad_request", "missing file part 'state_dict'")
    data = upload.stream.read(limit + 1)
    if len(data) > limit:
        raise _too_large(limit)
    try:
        return fed.submit_update(node, round_number, metadata, data)
    except Conflict as exc:
        raise ApiError(409, exc.error, exc.message, **exc.details) from None
    except UpdateNormTooLarge as exc:
        raise ApiError(400, "update_norm_too_large", str(exc)) from None
    except UpdateRejected as exc:
        raise ApiError(400, "invalid_update", str(exc)) from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"update larger than MAX_UPDATE_BYTES={limit} bytes "
                                              f"({limit / 2**20:.1f} MiB)", limit_bytes=limit)


@api.get("/status")
def status():
    _require_token("monitor", "admin")
    return jsonify(_federation().status())


@api.get("/openapi.json")
def openapi():
    """The OpenAPI 3 description of this API (docs/openapi.json); no token needed."""
    return current_app.response_class(OPENAPI_PATH.read_bytes(), mimetype="application/json")


# ----------------------------------------------------------------------------- operator (admin token)


@api.post("/admin/tokens/<kind>")
def rotate_token(kind: str):
    """Replace the join or monitor token (or the admin token itself) now; answers the new one once."""
    _require_token("admin")
    if kind not in KINDS:
        raise ApiError(404, "not_found", f"no token kind {kind!r}; one of {', '.join(KINDS)}")
    token = _credentials().rotate(kind)
    return jsonify({"kind": kind, "token": token,
                    "note": "the old token no longer works; registered nodes keep their node tokens"})


@api.post("/admin/nodes/<key>/ban")
def ban(key: str):
    """Ban a node by id or name: its token stops working, it cannot register, its open update is dropped."""
    _require_token("admin")
    reason = ""
    if request.content_length:
        reason = _json_object().get("reason", "")
        if reason != "":
            reason = _short_text(reason, "reason", MAX_NAME_LENGTH)
    node = _node_action(_federation().ban, key, reason)
    return jsonify({"node_id": node.node_id, "name": node.name, "status": "banned"})


@api.delete("/admin/nodes/<key>/ban")
def unban(key: str):
    """Lift a ban (the node may register again with the join token)."""
    _require_token("admin")
    node = _node_action(_federation().unban, key)
    return jsonify({"node_id": node.node_id, "name": node.name, "status": "offline"})


def _node_action(action, key: str, *args) -> Node:
    if len(key) > MAX_NAME_LENGTH:
        raise ApiError(404, "unknown_node", f"no node with id or name {key[:MAX_NAME_LENGTH]!r}...")
    try:
        return action(key, *args)
    except UnknownNode:
        raise ApiError(404, "unknown_node", f"no node with id or name {key!r}") from None


def dashboard():
    """``GET /``: the live web dashboard (static page; it reads /api/v1/status with the token it is given)."""
    return current_app.response_class((STATIC_DIR / "dashboard.html").read_bytes(), mimetype="text/html",
                                      headers={"Cache-Control": "no-cache"})


def _security_headers(response: Response) -> Response:
    # Everything the dashboard needs ships with the project: no other origin, no inline script.
    response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                           "frame-ancestors 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def prometheus_metrics():
    """``GET /metrics``: Prometheus text format (monitor or admin token as Bearer, unless --no-auth)."""
    _require_token("monitor", "admin")
    return Response(metrics.render(current_app.extensions["metrics_registry"]), mimetype=CONTENT_TYPE_LATEST)


# ----------------------------------------------------------------------------- app factory


def _handle_http_error(exc: HTTPException):
    if isinstance(exc, ApiError):
        return _json_error(exc.code, exc.error, exc.message, exc.extra_headers, **exc.details)
    if isinstance(exc, RequestEntityTooLarge):
        if request.endpoint != "api_v1.submit_update":
            return _json_error(413, "payload_too_large", f"request bodies here are limited to {JSON_BODY_LIMIT} bytes")
        limit = current_app.extensions["federation"].config.max_update_bytes
        if request.content_length is not None and request.content_length <= limit + MULTIPART_SLACK:
            return _json_error(413, "payload_too_large",
                               f"form field 'metadata' (or another part that is not a file) is larger than "
                               f"{METADATA_LIMIT} bytes, or the multipart boundary does not match the "
                               "Content-Type header")
        return _handle_http_error(_too_large(limit))
    valid = getattr(exc, "valid_methods", None)
    return _json_error(exc.code or 500, _error_name(exc), exc.description or exc.name,
                       headers={"Allow": ", ".join(valid)} if valid else None)


def _handle_unexpected(exc: Exception):
    log.exception("internal error on %s %s", request.method, request.path)
    return _json_error(500, "internal_error", "the coordinator failed to handle this request; see its log")


def _before_request():
    _rate_limit(request.remote_addr or "unknown", "address_limiter", "address")
    if request.endpoint == "api_v1.submit_update":
        limit = current_app.extensions["federation"].config.max_update_bytes
        request.max_content_length = limit + MULTIPART_SLACK
        request.max_form_memory_size = METADATA_LIMIT
    else:
        request.max_content_length = JSON_BODY_LIMIT


def create_app(cfg: Config, *, start_driver: bool = True, evaluator=None) -> Flask:
    """Build a coordinator app for ``cfg``.

    Parameters
    ----------
    start_driver : start the thread that runs the rounds (tests may call ``federation.tick()`` instead).
    evaluator : (state_dict) -> (test loss, test accuracy). None: build one from ``cfg.dataset`` unless
        ``cfg.no_eval``.

    Raises
    ------
    datasets.DatasetUnavailable
        When evaluation is on and the test split cannot be loaded.
    store.StoreError
        When TEMP_DIR holds a run that cannot be resumed.
    """
    import torch

    from model import build_model

    config_module.ensure_dirs(cfg, ("models_dir", "logs_dir", "temp_dir"))
    if cfg.fresh:
        archived = archive_run(cfg.temp_dir, cfg.models_dir)
        if archived is not None:
            log.warning("--fresh: the stored run was moved to %s; starting a new run", archived)
    else:
        cfg = resume_config(cfg, stored_run_config(cfg.temp_dir))
    set_cpu_threads(cfg.cpu_workers)
    if evaluator is None and not cfg.no_eval:
        evaluator = make_evaluator(cfg)
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model).state_dict()
    federation = Federation(cfg, initial, evaluator)

    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.config["FL_NO_AUTH"] = cfg.no_auth
    app.extensions["credentials"] = Credentials(cfg.temp_dir, {"join": cfg.token, "monitor": cfg.monitor_token,
                                                               "admin": cfg.admin_token})
    app.extensions["credential_limiter"] = (RateLimiter(cfg.rate_limit, BURST * cfg.rate_limit)
                                            if cfg.rate_limit > 0 else None)
    app.extensions["address_limiter"] = (RateLimiter(cfg.address_rate_limit, BURST * cfg.address_rate_limit)
                                         if cfg.address_rate_limit > 0 else None)
    app.extensions["federation"] = federation
    app.extensions["metrics_registry"] = metrics.make_registry(federation)
    app.register_blueprint(api)
    app.add_url_rule("/metrics", "metrics", prometheus_metrics)
    app.add_url_rule("/", "dashboard", dashboard)
    app.after_request(_security_headers)
    app.before_request(_before_request)
    app.register_error_handler(HTTPException, _handle_http_error)
    app.register_error_handler(Exception, _handle_unexpected)
    if start_driver:
        federation.start()
    return app


def make_evaluator(cfg: Config):
    """An evaluator on the dataset's test split, run on the CPU.

    Raises
    ------
    datasets.DatasetUnavailable
        If the test split cannot be loaded from any source.
    """
    from datasets import load_dataset
    from model import build_model, test

    data = load_dataset(cfg.dataset, cfg.data_dir, train=False)
    net = build_model(cfg.model)

    def evaluate(state_dict):
        net.load_state_dict(state_dict, strict=True)
        return test(net, data.images, data.labels, cfg.test_batch_size)

    return evaluate


# ----------------------------------------------------------------------------- command line


def _reachable_address(host: str) -> str:
    if host not in ("0.0.0.0", "::", ""):
        return host
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET address: picks the outgoing interface, sends nothing
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


def _serve(server) -> None:
    try:
        server.serve()
    except OSError:  # the listening socket was closed under the loop at shutdown
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Federated-learning coordinator (FedAvg over REST).")
    config_module.add_arguments(parser, COORDINATOR_FIELDS)
    return parser


def main(argv=None) -> int:
    """Run the coordinator until the run is done (or SIGINT/SIGTERM); returns the exit status."""
    return run_program(_main, argv)


def _main(argv) -> int:
    parser = build_parser()
    cfg, _ = config_module.parse_config(parser, COORDINATOR_FIELDS, argv)
    try:
        config_module.ensure_dirs(cfg)
        setup_logging(Path(cfg.logs_dir) / "coordinator.log")
    except OSError as exc:
        print(f"error: cannot create the run-time directories: {exc}", file=sys.stderr)
        return 2
    from datasets import DatasetUnavailable
    from model import MODELS

    if cfg.model not in MODELS:
        parser.error(f"model (--model / FL_MODEL): unknown model {cfg.model!r}; known: {', '.join(sorted(MODELS))}")
    try:
        app = create_app(cfg, start_driver=False)
    except DatasetUnavailable as exc:
        print(f"error: cannot evaluate: {exc}\nOr start the coordinator with --no-eval.", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    federation: Federation = app.extensions["federation"]
    cfg = federation.config  # a resumed run keeps its stored settings
    credentials: Credentials = app.extensions["credentials"]
    scheme = "https" if cfg.certfile else "http"
    try:
        if cfg.debug:
            server = None
            socket.create_server((cfg.host, cfg.port)).close()  # fail here, not in the debug server's thread
        else:
            server = make_server(app, cfg.host, cfg.port, threads=cfg.server_threads,
                                 client_timeout=cfg.client_timeout, certfile=cfg.certfile, keyfile=cfg.keyfile)
    except TLSConfigError as exc:
        print(f"error: --certfile/--keyfile: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # ValueError: a malformed host
        print(f"error: cannot listen on {cfg.host}:{cfg.port}: {exc}", file=sys.stderr)
        return 2
    port = bound_port(server) if server is not None else cfg.port
    address = f"{scheme}://{_reachable_address(cfg.host)}:{port}"
    log.info("coordinator listening on %s://%s:%s (%s); run %s: %d rounds, %d nodes to start, model %s, "
             "dataset %s, aggregation %s", scheme, cfg.host, port,
             "Flask debug server" if cfg.debug else f"cheroot, {cfg.server_threads} threads",
             federation.run_id, cfg.communication_rounds, cfg.min_nodes_to_start, cfg.model, cfg.dataset,
             cfg.aggregation)
    if scheme == "http" and not is_loopback(cfg.host):
        log.warning("serving plain HTTP on %s: tokens and model weights cross the network unencrypted and can be "
                    "read or changed on the way. Use --certfile/--keyfile (python make_cert.py makes a pair) or "
                    "--host 127.0.0.1", cfg.host)
    for kind in credentials.generated:
        log.info("generated a new %s token into %s (mode 0600; it is never logged)", kind,
                 token_path(cfg.temp_dir, kind))
    ca_flag = f" --ca-cert {cfg.certfile}" if cfg.certfile else ""
    if cfg.no_auth:
        log.warning("authentication is off (--no-auth): anyone who reaches this port can join and read the status")
        log.info("start a worker with: python worker.py --coordinator-address %s%s --cpu", address, ca_flag)
    else:
        join = "<your --token>" if cfg.token else f'"$(cat {token_path(cfg.temp_dir, "join")})"'
        monitor = ("<your --monitor-token>" if cfg.monitor_token else
                   f'"$(cat {token_path(cfg.temp_dir, "monitor")})"')
        log.info("start a worker with: python worker.py --coordinator-address %s%s --token %s --cpu",
                 address, ca_flag, join)
        log.info("watch with: python text_monitor.py --coordinator-address %s%s --token %s", address, ca_flag,
                 monitor)

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if server is not None:
        threading.Thread(target=_serve, args=(server,), name="cheroot", daemon=True).start()
    else:
        ssl_context = (cfg.certfile, cfg.keyfile) if cfg.certfile else None
        threading.Thread(target=lambda: app.run(cfg.host, cfg.port, threaded=True, use_reloader=False,
                                                ssl_context=ssl_context), name="flask-debug", daemon=True).start()
    federation.start()
    finished_at = None
    while not stop.wait(0.2):
        if federation.finished and not cfg.keep_serving:
            finished_at = finished_at or time.monotonic()
            grace = min(cfg.node_timeout, 60.0)
            if federation.all_told_to_stop() or time.monotonic() - finished_at > grace:
                time.sleep(0.5)  # let the last answers leave
                break
    federation.stop()  # waits for an aggregation or checkpoint write in progress; wakes long polls
    if server is not None:
        server.stop()
    if federation.finished and federation.history:
        last = federation.history[-1]
        log.info("run finished: %d rounds, final test accuracy %s; model in %s", last.round,
                 "n/a" if last.test_accuracy is None else f"{last.test_accuracy:.4f}",
                 Path(cfg.models_dir) / "global_model.pt" if cfg.save_model else "(not saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
