"""The coordinator: a Flask REST service that runs the rounds of federated training.

    python coordinator.py [--host 0.0.0.0] [--port 5000] [--rounds 5] [--min-nodes 2] [--certfile C --keyfile K]

Builds the app with :func:`fedrest.server.app.create_app` and serves it with uvicorn over HTTP or HTTPS, long
polls parked without a thread (:mod:`fedrest.server.serving`; ``--debug``: Flask's development server) until the
run is done or SIGINT/SIGTERM.
The wire contract is docs/openapi.json (served at /api/v1/openapi.json) and docs/API.md.

Exit status: 0 done or stopped; 2 bad arguments, port in use, bad TLS files, no test data, an unreadable run.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import config as config_module
from config import COORDINATOR_FIELDS
from fedrest.server.app import create_app
from fedrest.server.credentials import Credentials, token_path
from fedrest.server.federation import Federation
from fedrest.server.serving import (PendingApp, TLSConfigError, bound_port, tune_garbage_collector, is_loopback,
                                    make_server)
from fedrest.server.state_dir import RunFinished, StartRefused, StateDirLock
from fedrest.server.tracking import TrackingError
from fedrest.server.store import StoreBusy, StoreError
from utils import program_command, run_program, setup_logging, url_host

log = logging.getLogger("fl.coordinator")

__all__ = ["create_app", "main"]


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
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Federated-learning coordinator (FedAvg over REST).")
    config_module.add_arguments(parser, COORDINATOR_FIELDS)
    return parser


def main(argv=None) -> int:
    """Run the coordinator until the run is done (or SIGINT/SIGTERM); returns the exit status."""
    return run_program(_main, argv)


class StartError(Exception):
    """The coordinator cannot start (the message says why); exit status 2."""


def _main(argv) -> int:
    parser = build_parser()
    cfg, args = config_module.parse_config(parser, COORDINATOR_FIELDS, argv)
    try:
        config_module.ensure_dirs(cfg)
        setup_logging(Path(cfg.logs_dir) / "coordinator.log")
    except OSError as exc:
        print(f"error: cannot create the run-time directories: {exc}", file=sys.stderr)
        return 2
    explicit = config_module.given_fields(args, COORDINATOR_FIELDS)
    argv = sys.argv[1:] if argv is None else list(argv)
    pending = PendingApp()
    lock = StateDirLock(cfg.temp_dir)
    try:
        lock.acquire(f"pid {os.getpid()} on {socket.gethostname()}, starting")  # one coordinator per TEMP_DIR
        server = _bind(pending, cfg)  # then the port: a start that cannot listen changes no state
        try:
            app = _build_app(cfg, explicit, argv)
        except StartError:
            if server is not None:
                server.stop()
            raise
    except (StartError, StartRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pending.app = app
    tune_garbage_collector()
    federation: Federation = app.extensions["federation"]
    cfg = federation.config  # a resumed run keeps its stored settings
    port = bound_port(server) if server is not None else cfg.port
    lock.describe(f"pid {os.getpid()} on {socket.gethostname()}, port {port}, run {federation.run_id}")
    _log_start(app, cfg, port)
    _serve_until_done(app, cfg, server)
    return 0


def _fresh_command(argv: list[str], run_id: str) -> str:
    """The command line ``argv`` of this coordinator with ``--fresh=run_id`` in place of any --fresh it had."""
    kept, skip = [], False
    for word in argv:
        if skip and not word.startswith("-"):  # the value of a "--fresh VALUE" written with a space
            skip = False
            continue
        skip = word == "--fresh"
        if not (skip or word.startswith("--fresh=")):
            kept.append(word)
    return " ".join([program_command("coordinator.py"), *map(shlex.quote, kept), f"--fresh={run_id}"])


def _build_app(cfg, explicit, argv: list[str]):
    from fedrest.tasks import TaskError

    try:
        return create_app(cfg, start_driver=False, explicit=explicit, resume_finished=cfg.keep_serving)
    except TaskError as exc:
        about_test_data = "test" in str(exc).lower() and "--no-eval" not in str(exc)  # evaluation's data
        fix = "\nOr start the coordinator with --no-eval." if about_test_data and not cfg.no_eval else ""
        raise StartError(f"{exc}{fix}") from None
    except RunFinished as exc:  # not resumed by accident: say how to start a new one, or serve it
        raise StartError(f"{exc} (its model is in {Path(cfg.models_dir) / 'global_model.pt'}). To start a new "
                         f"run:\n  {_fresh_command(argv, exc.stored.run_id)}\nor add --keep-serving to serve its "
                         "status to monitors") from None
    except (StoreError, StoreBusy, StartRefused, TrackingError) as exc:
        raise StartError(str(exc)) from None
    except OSError as exc:  # a full or read-only disk under TEMP_DIR or MODELS_DIR
        raise StartError(f"cannot write the run's state: {exc}") from None


def _bind(app, cfg):
    """The server listening on HOST:PORT (None with --debug, after checking that the port is free)."""
    try:
        if cfg.debug:
            socket.create_server((cfg.host, cfg.port)).close()  # fail here, not in the debug server's thread
            return None
        return make_server(app, cfg.host, cfg.port, threads=cfg.server_threads, client_timeout=cfg.client_timeout,
                           max_nodes=cfg.max_nodes, certfile=cfg.certfile, keyfile=cfg.keyfile)
    except TLSConfigError as exc:
        raise StartError(f"--certfile/--keyfile: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE or "Address already in use" in str(exc):
            raise StartError(f"cannot listen on {url_host(cfg.host)}:{cfg.port}: the address is in use (another "
                             "coordinator? stop it, or give this one its own --port and --temp-dir)") from None
        raise StartError(f"cannot listen on {url_host(cfg.host)}:{cfg.port}: {exc}") from None
    except ValueError as exc:  # a malformed host
        raise StartError(f"cannot listen on {cfg.host}:{cfg.port}: {exc}") from None


def _log_start(app, cfg, port: int) -> None:
    """Log where the coordinator listens and the commands that start a worker and a monitor (they paste back)."""
    federation: Federation = app.extensions["federation"]
    credentials: Credentials = app.extensions["credentials"]
    scheme = "https" if cfg.certfile else "http"
    address = f"{scheme}://{url_host(_reachable_address(cfg.host))}:{port}"
    log.info("coordinator listening on %s://%s:%s (%s); run %s: %d rounds, %d nodes to start, model %s, "
             "task %s, %s", scheme, url_host(cfg.host), port,
             "Flask debug server" if cfg.debug else f"uvicorn, {cfg.server_threads} request threads",
             federation.run_id, cfg.communication_rounds, cfg.min_nodes_to_start, federation.task.model_name,
             federation.task.name, ", ".join(f"{k} {v}" for k, v in federation.strategy.describe().items()))
    if scheme == "http" and not is_loopback(cfg.host):
        log.warning("serving plain HTTP on %s: tokens and model weights cross the network unencrypted and can be "
                    "read or changed on the way. Use --certfile/--keyfile (python make_cert.py makes a pair) or "
                    "--host 127.0.0.1", cfg.host)
    for kind in credentials.generated:
        log.info("generated a new %s token into %s (mode 0600; it is never logged)", kind,
                 token_path(cfg.temp_dir, kind))
    ca_flag = f" --ca-cert {shlex.quote(cfg.certfile)}" if cfg.certfile else ""
    if cfg.no_auth:
        log.warning("authentication is off (--no-auth): anyone who reaches this port can join and read the status")
        log.info("start a worker with: %s --coordinator-address %s%s --cpu", program_command("worker.py"), address,
                 ca_flag)
        log.info("dashboard: %s/", address)
        return
    join = "<your --token>" if cfg.token else f'"$(cat {shlex.quote(str(token_path(cfg.temp_dir, "join")))})"'
    monitor_file = token_path(cfg.temp_dir, "monitor")
    monitor = "<your --monitor-token>" if cfg.monitor_token else f'"$(cat {shlex.quote(str(monitor_file))})"'
    log.info("start a worker with: %s --coordinator-address %s%s --token=%s --cpu", program_command("worker.py"),
             address, ca_flag, join)
    log.info("watch with: %s --coordinator-address %s%s --token=%s", program_command("text_monitor.py"), address,
             ca_flag, monitor)
    log.info("dashboard: open %s/ and enter the monitor token%s", address,
             "" if cfg.monitor_token else f" (the file {monitor_file})")
    temp_flag = "" if cfg.temp_dir == "temp" else f" --temp-dir {shlex.quote(cfg.temp_dir)}"
    log.info("operator commands (admin token%s): %s --coordinator-address %s%s%s rotate join|monitor|admin, "
             "ban NODE, unban NODE", "" if cfg.admin_token else f" read from {token_path(cfg.temp_dir, 'admin')}",
             program_command("admin.py"), address, ca_flag, temp_flag)


def _serve_until_done(app, cfg, server) -> None:
    """Serve and drive the rounds until the run is done (and workers told) or SIGINT/SIGTERM."""
    federation: Federation = app.extensions["federation"]
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # SIGHUP: the terminal or SSH session closed
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    if server is not None:
        threading.Thread(target=_serve, args=(server,), name="http-server", daemon=True).start()
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
    if app.extensions.get("tracking") is not None:
        app.extensions["tracking"].close()  # the last round's numbers, then TensorBoard's and MLflow's files
    if federation.finished and federation.state.history:
        last = federation.state.history[-1]
        log.info("run finished: %d rounds, final test accuracy %s; model in %s", last.round,
                 "n/a" if last.test_accuracy is None else f"{last.test_accuracy:.4f}",
                 Path(cfg.models_dir) / "global_model.pt" if cfg.save_model else "(not saved)")
    elif not federation.finished:
        log.info("stopped run %s with %d of %d rounds done; to resume it, start the coordinator again with the "
                 "same command (workers reconnect by themselves)", federation.run_id, federation.model_version,
                 cfg.communication_rounds)


if __name__ == "__main__":
    sys.exit(main())
