"""The coordinator: a Flask REST service that runs the rounds of federated training.

``create_app(config)`` builds the app around one :class:`federation.Federation` (kept in
``app.extensions["federation"]``), so every test gets a fresh coordinator. ``python coordinator.py``
serves it with waitress (``--debug``: Flask's development server). The wire contract is in docs/API.md.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import os
import secrets
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
from config import COORDINATOR_FIELDS, Config
from federation import (Conflict, Federation, Node, UnknownNode, archive_run, hash_token, resume_config,
                        stored_run_config)
from store import StoreError
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


# ----------------------------------------------------------------------------- join token


def resolve_join_token(cfg: Config) -> str:
    """The join token: ``cfg.token`` if set, else the one stored in TEMP_DIR/join_token, else a new one.

    A generated token is stored with mode 0600 so that a restarted coordinator keeps it.
    """
    if cfg.token:
        return cfg.token
    path = Path(cfg.temp_dir) / "join_token"
    if path.exists():
        stored = path.read_text(encoding="utf-8").strip()
        if len(stored) >= 8:
            return stored
    token = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token


# ----------------------------------------------------------------------------- request helpers


def _federation() -> Federation:
    return current_app.extensions["federation"]


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _require_join_token() -> None:
    if current_app.config["FL_NO_AUTH"]:
        return
    token = _bearer()
    if token is None:
        raise ApiError(401, "unauthorized", "expected the header Authorization: Bearer <join token>",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(hash_token(token), current_app.config["FL_JOIN_TOKEN_HASH"]):
        raise ApiError(401, "unauthorized", "wrong join token", headers={"WWW-Authenticate": "Bearer"})


def _require_node() -> Node:
    token = _bearer()
    if token is None:
        raise ApiError(401, "unauthorized", "expected the header Authorization: Bearer <node token>",
                       headers={"WWW-Authenticate": "Bearer"})
    node = _federation().authenticate(token)
    if node is None:
        raise ApiError(401, "unauthorized", "unknown or expired node token; register again",
                       headers={"WWW-Authenticate": "Bearer"})
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
    _require_join_token()
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
    return jsonify({"node_id": node.node_id, "node_token": token, "name": node.name,
                    "heartbeat_interval": fed.config.heartbeat_interval,
                    "node_timeout": fed.config.node_timeout, "run_id": fed.run_id,
                    "model": fed.config.model, "dataset": fed.config.dataset}), (201 if created else 200)


def _own_node(node_id: str) -> Node:
    fed = _federation()
    try:
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
    except UpdateRejected as exc:
        raise ApiError(400, "invalid_update", str(exc)) from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"update larger than MAX_UPDATE_BYTES={limit} bytes "
                                              f"({limit / 2**20:.1f} MiB)", limit_bytes=limit)


@api.get("/status")
def status():
    _require_join_token()
    return jsonify(_federation().status())


def dashboard():
    """``GET /``: the live web dashboard (static page; it reads /api/v1/status with the token it is given)."""
    return current_app.send_static_file("dashboard.html")


def _security_headers(response: Response) -> Response:
    # Everything the dashboard needs ships with the project: no other origin, no inline script.
    response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                           "frame-ancestors 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def prometheus_metrics():
    """``GET /metrics``: Prometheus text format (join token as Bearer, unless --no-auth)."""
    _require_join_token()
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


def _limit_body():
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
    app.config["FL_JOIN_TOKEN_HASH"] = hash_token(resolve_join_token(cfg))
    app.extensions["federation"] = federation
    app.extensions["metrics_registry"] = metrics.make_registry(federation)
    app.register_blueprint(api)
    app.add_url_rule("/metrics", "metrics", prometheus_metrics)
    app.add_url_rule("/", "dashboard", dashboard)
    app.after_request(_security_headers)
    app.before_request(_limit_body)
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
        server.run()
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
    token = resolve_join_token(cfg)

    import waitress

    try:
        if cfg.debug:
            server = None
            socket.create_server((cfg.host, cfg.port)).close()  # fail here, not in the debug server's thread
        else:
            server = waitress.create_server(app, host=cfg.host, port=cfg.port, threads=cfg.server_threads)
    except (OSError, ValueError) as exc:  # ValueError: waitress on a malformed host
        print(f"error: cannot listen on {cfg.host}:{cfg.port}: {exc}", file=sys.stderr)
        return 2
    port = server.effective_port if server is not None else cfg.port
    address = f"{_reachable_address(cfg.host)}:{port}"
    log.info("coordinator listening on %s:%s (%s); run %s: %d rounds, %d nodes to start, model %s, dataset %s",
             cfg.host, port, "Flask debug server" if cfg.debug else f"waitress, {cfg.server_threads} threads",
             federation.run_id, cfg.communication_rounds, cfg.min_nodes_to_start, cfg.model, cfg.dataset)
    if cfg.no_auth:
        log.warning("authentication is off (--no-auth): anyone who reaches this port can join")
        log.info("start a worker with: python worker.py --coordinator-address %s --cpu", address)
    else:
        log.info("join token: %s (%s)", token, "from --token / FL_TOKEN" if cfg.token else
                 f"generated once, kept in {Path(cfg.temp_dir) / 'join_token'}")
        log.info("start a worker with: python worker.py --coordinator-address %s --token %s --cpu", address, token)

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if server is not None:
        threading.Thread(target=_serve, args=(server,), name="waitress", daemon=True).start()
    else:
        threading.Thread(target=lambda: app.run(cfg.host, cfg.port, threaded=True, use_reloader=False),
                         name="flask-debug", daemon=True).start()
    federation.start()
    finished_at = None
    while not stop.wait(0.2):
        if federation.finished and not cfg.keep_serving:
            finished_at = finished_at or time.monotonic()
            grace = min(cfg.node_timeout, 60.0)
            if federation.all_told_to_stop() or time.monotonic() - finished_at > grace:
                time.sleep(0.5)  # let the last answers leave
                break
    federation.stop()  # waits for an aggregation or checkpoint write in progress; the process exit ends the rest
    if federation.finished and federation.history:
        last = federation.history[-1]
        log.info("run finished: %d rounds, final test accuracy %s; model in %s", last.round,
                 "n/a" if last.test_accuracy is None else f"{last.test_accuracy:.4f}",
                 Path(cfg.models_dir) / "global_model.pt" if cfg.save_model else "(not saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
