"""A federated-learning worker: registers, trains the global model on local data, sends its weights.

    python worker.py --coordinator-address HOST:PORT --token TOKEN [--gpu | --cpu] [--data-dir DIR]
                     [--name NAME] [--dataset mnist|fashion-mnist]
                     [--partition-id i --num-partitions n [--partition iid|dirichlet --alpha a --seed s]]

Life of a worker: load and partition its data onto the training device, register, heartbeat from a
background thread, long-poll ``GET /api/v1/task`` (a new round is seen within milliseconds), download
the global model when its version changed, train LOCAL_EPOCHS, upload the state_dict, repeat; exit 0
when told to stop. Only weights leave the machine, never data.

Exit status: 0 done or stopped by SIGINT/SIGTERM; 1 coordinator unreachable for GIVE_UP_AFTER seconds
or join token refused; 2 bad arguments, device or data unavailable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import torch

import config as config_module
from config import WORKER_FIELDS
from fedrest.client import CoordinatorClient
from fedrest.node_identity import default_name
from fedrest.tasks import TaskError, load_task
from fedrest.tasks.node_data import worker_data
from fedrest.worker_node import FatalError, RoundClosed, StopRequested, Worker  # noqa: F401 - re-exported
from utils import device_description, run_program, start_node

log = logging.getLogger("fl.worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Federated-learning worker: trains on local data, sends weights.")
    config_module.add_arguments(parser, WORKER_FIELDS)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gpu", dest="device", action="store_const", const="gpu",
                       help="train on CUDA; exit with status 2 if CUDA is not available")
    group.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="train on the CPU")
    return parser


def main(argv=None) -> int:
    """Run a worker; returns the exit status (see the module docstring)."""
    return run_program(_main, argv)


def _main(argv) -> int:
    parser = build_parser()
    cfg, _ = config_module.parse_config(parser, WORKER_FIELDS, argv)
    try:
        CoordinatorClient(cfg.coordinator_address, ca_cert=cfg.ca_cert)
    except ValueError as exc:  # the address
        parser.error(f"--coordinator-address: {exc}")
    except OSError as exc:  # OSError, ssl.SSLError: an unreadable --ca-cert
        parser.error(f"--ca-cert {cfg.ca_cert}: {exc}")
    name = cfg.name or default_name(cfg.partition_id)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    device = start_node(cfg, Path(cfg.logs_dir) / f"worker_{safe}.log")
    if device is None:
        return 2
    log.info("worker %s on %s, torch %s, %d CPU threads", name, device_description(device), torch.__version__,
             torch.get_num_threads())
    try:
        task = load_task(cfg)
        data, held_out = worker_data(task, cfg, device)
        worker = Worker(cfg, device, task, data, held_out)
        log.info("task %s (%s): model %s, %d training examples%s", task.name, task.source, task.model_name,
                 len(data), f", {len(held_out)} held out for federated evaluation" if held_out is not None else "")
    except TaskError as exc:
        log.debug("the task failed", exc_info=exc.__cause__ or exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        if worker.stop_event.is_set():
            return  # already stopping (e.g. telling the coordinator): a second Ctrl-C changes nothing
        worker.stop_event.set()
        raise StopRequested(signal.Signals(signum).name)

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # SIGHUP: the terminal or SSH session closed
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
