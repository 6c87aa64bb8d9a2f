"""The coordinator's Flask app: ``create_app(config)`` builds one around one federation.

The federation (:class:`fedrest.server.federation.Federation`), the credentials, the rate limiters and the
metrics registry hang on ``app.extensions``; nothing lives in module globals, so every test gets a fresh
coordinator. The views are the blueprints of :mod:`fedrest.server.views`; every error becomes one JSON shape
(:mod:`fedrest.server.http_errors`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Collection

from flask import Flask, Response, current_app, request

import config as config_module
from config import Config
from fedrest.server import metrics
from fedrest.server.auth import rate_limit
from fedrest.server.credentials import Credentials
from fedrest.server.evaluation import Evaluator, make_evaluator
from fedrest.server.federation import Federation
from fedrest.server.http_errors import (JSON_BODY_LIMIT, METADATA_LIMIT, MULTIPART_SLACK, UPLOAD_ENDPOINT,
                                        register_error_handlers)
from fedrest.server.ratelimit import RateLimiter
from fedrest.server.state_dir import prepare_start
from fedrest.server.views import admin, monitoring, nodes, rounds
from utils import set_cpu_threads

log = logging.getLogger("fl.coordinator")

BURST = 5.0  # a rate limit of r requests/s allows bursts of BURST * r


def create_app(cfg: Config, *, start_driver: bool = True, evaluator: Evaluator | None = None,
               clock: Callable[[], float] = time.monotonic, explicit: Collection[str] | None = None,
               resume_finished: bool = True) -> Flask:
    """Build a coordinator app for ``cfg``.

    Parameters
    ----------
    start_driver : start the thread that runs the rounds (tests may call ``federation.tick()`` instead).
    evaluator : (state_dict) -> (test loss, test accuracy). None: build one from ``cfg.dataset`` unless
        ``cfg.no_eval``.
    clock : the federation's monotonic clock, seconds (tests may pass a fake one).
    explicit, resume_finished : see :func:`state_dir.prepare_start` (the settings the user gave; whether a
        finished run may be resumed).

    Raises
    ------
    fedrest.data.DatasetUnavailable
        When evaluation is on and the test split cannot be loaded.
    fedrest.server.store.StoreError
        When TEMP_DIR holds a run that cannot be resumed.
    fedrest.server.state_dir.StartRefused
        When ``--fresh`` or the settings do not fit the stored run (the message says what to do).
    """
    import torch

    from model import build_model

    config_module.ensure_dirs(cfg, ("models_dir", "logs_dir", "temp_dir"))
    cfg = prepare_start(cfg, explicit, resume_finished)
    set_cpu_threads(cfg.cpu_threads)
    if evaluator is None and not cfg.no_eval:
        evaluator = make_evaluator(cfg)
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model).state_dict()
    federation = Federation(cfg, initial, evaluator, clock)

    app = Flask(__name__, static_folder=str(monitoring.STATIC_DIR), static_url_path="/static")
    app.config["FL_NO_AUTH"] = cfg.no_auth
    app.extensions["credentials"] = Credentials(cfg.temp_dir, {"join": cfg.token, "monitor": cfg.monitor_token,
                                                               "admin": cfg.admin_token})
    app.extensions["credential_limiter"] = _limiter(cfg.rate_limit)
    app.extensions["address_limiter"] = _limiter(cfg.address_rate_limit)
    app.extensions["federation"] = federation
    app.extensions["metrics_registry"] = metrics.make_registry(federation)
    for blueprint in (nodes.bp, rounds.bp, admin.bp, monitoring.bp):
        app.register_blueprint(blueprint)
    app.after_request(_security_headers)
    app.before_request(_before_request)
    register_error_handlers(app)
    if start_driver:
        federation.start()
    return app


def _limiter(rate: float) -> RateLimiter | None:
    return RateLimiter(rate, BURST * rate) if rate > 0 else None


def _before_request() -> None:
    rate_limit(request.remote_addr or "unknown", "address_limiter", "address")
    if request.endpoint == UPLOAD_ENDPOINT:
        limit = current_app.extensions["federation"].config.max_update_bytes
        request.max_content_length = limit + MULTIPART_SLACK
        request.max_form_memory_size = METADATA_LIMIT
    else:
        request.max_content_length = JSON_BODY_LIMIT


def _security_headers(response: Response) -> Response:
    # Everything the dashboard needs ships with the project: no other origin, no inline script.
    response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                           "frame-ancestors 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response
