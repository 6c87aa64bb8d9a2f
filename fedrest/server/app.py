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
from fedrest.aggregation import make_strategy
from fedrest.server import metrics
from fedrest.server.auth import rate_limit
from fedrest.server.credentials import Credentials
from fedrest.server.evaluation import Evaluator, make_evaluator
from fedrest.server.federation import Federation
from fedrest.server.http_errors import (JSON_BODY_LIMIT, METADATA_LIMIT, REGISTER_ENDPOINT,
                                        REGISTRATION_BODY_LIMIT, UPLOAD_ENDPOINT, register_error_handlers,
                                        upload_body_limit)
from fedrest.server.ratelimit import RateLimiter
from fedrest.server.state_dir import prepare_start
from fedrest.server.tracking import start_tracking
from fedrest.server.uploads import StreamingRequest, UploadSlots, upload_cap
from fedrest.server.views import admin, monitoring, nodes, rounds
from fedrest.tasks import TaskError, load_task
from fedrest.tasks.fingerprint import TaskIdentity
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
    evaluator : (state_dict) -> {metric: value} (or a (test loss, test accuracy) pair). None: evaluate with the
        task (``--task``, else ``--dataset``) on its test data unless ``cfg.no_eval``.
    clock : the federation's monotonic clock, seconds (tests may pass a fake one).
    explicit, resume_finished : see :func:`state_dir.prepare_start` (the settings the user gave; whether a
        finished run may be resumed).

    Raises
    ------
    fedrest.tasks.TaskError
        When the task cannot be loaded, or evaluation is on and its test data cannot be loaded.
    fedrest.server.store.StoreError
        When TEMP_DIR holds a run that cannot be resumed.
    fedrest.server.state_dir.StartRefused
        When ``--fresh`` or the settings do not fit the stored run (the message says what to do).
    fedrest.server.tracking.TrackingError
        When ``--tensorboard-dir`` or ``--mlflow-uri`` cannot be set up.
    """
    import torch

    config_module.ensure_dirs(cfg, ("models_dir", "logs_dir", "temp_dir"))
    cfg = prepare_start(cfg, explicit, resume_finished)
    set_cpu_threads(cfg.cpu_threads)
    task = load_task(cfg)
    if evaluator is None and not cfg.no_eval:
        evaluator = make_evaluator(task, cfg)  # loads the test data first: it names the classes of image folders
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    identity = TaskIdentity(task.name, task.model_name, task.fingerprint(model))
    parameter_keys = [name for name, _ in model.named_parameters()]
    strategy = task.make_strategy(cfg, parameter_keys) or make_strategy(cfg, parameter_keys)
    _check_strategy_fits(cfg, task, strategy)
    federation = Federation(cfg, model.state_dict(), evaluator, clock, identity, parameter_keys, strategy)

    app = Flask(__name__, static_folder=str(monitoring.STATIC_DIR), static_url_path="/static")
    app.request_class = StreamingRequest  # uploaded file parts stream into the update spool's incoming folder
    app.config["FL_NO_AUTH"] = cfg.no_auth
    app.extensions["credentials"] = Credentials(cfg.temp_dir, {"join": cfg.token, "monitor": cfg.monitor_token,
                                                               "admin": cfg.admin_token})
    app.extensions["credential_limiter"] = _limiter(cfg.rate_limit)
    app.extensions["address_limiter"] = _limiter(cfg.address_rate_limit)
    app.extensions["federation"] = federation
    app.extensions["upload_slots"] = UploadSlots(upload_cap(cfg))
    app.extensions["metrics_registry"] = metrics.make_registry(federation, app.extensions["upload_slots"])
    for blueprint in (nodes.bp, rounds.bp, admin.bp, monitoring.bp):
        app.register_blueprint(blueprint)
    app.after_request(_security_headers)
    app.before_request(_before_request)
    register_error_handlers(app)
    app.extensions["tracking"] = start_tracking(cfg, federation)  # TrackingError: before any round
    if start_driver:
        federation.start()
    return app


def _check_strategy_fits(cfg: Config, task, strategy) -> None:
    """Raises TaskError when the strategy cannot run with this task or these settings: control variates with a
    task's own train(), or differential privacy asked for (``--dp-noise-multiplier``) from a task's strategy
    that does not apply it (the privacy spent would be reported for noise that was never added)."""
    if strategy.uses_control_variates and task.has_own_train:
        raise TaskError(f"task {task.name} ({task.source}) has its own train(), which cannot apply the control "
                        f"variates of the strategy {strategy.name}; use the built-in training loop or another "
                        "strategy")
    if cfg.dp_noise_multiplier > 0 and strategy.private is None:
        raise TaskError(f"task {task.name} ({task.source}): its strategy {strategy.name} does not apply "
                        "differential privacy (its private is None) although --dp-noise-multiplier is given; give "
                        "it the mechanism of make_strategy(config, ...).private, or drop the flag")


def _limiter(rate: float) -> RateLimiter | None:
    return RateLimiter(rate, BURST * rate) if rate > 0 else None


def _before_request() -> None:
    rate_limit(request.remote_addr or "unknown", "address_limiter", "address")
    if request.endpoint == UPLOAD_ENDPOINT:
        request.max_content_length = upload_body_limit(current_app.extensions["federation"])
        request.max_form_memory_size = METADATA_LIMIT
    elif request.endpoint == REGISTER_ENDPOINT:  # carries the task's fingerprint (a model's state_dict schema)
        request.max_content_length = REGISTRATION_BODY_LIMIT
    else:
        request.max_content_length = JSON_BODY_LIMIT


def _security_headers(response: Response) -> Response:
    # Everything the dashboard needs ships with the project: no other origin, no inline script.
    response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                           "frame-ancestors 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response
