"""Running one client host (:class:`fedrest.simulation.host.ClientHost`) in whatever process a backend gives it:
a process of the local pool (``python -m fedrest.simulation``) or a Ray task."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from config import Config

log = logging.getLogger("fl.simulation")

HOST_NICE = 10  # a host's scheduling priority below the coordinator's (Unix nice increment)


def run_host(cfg: Config, host: int, num_hosts: int, num_clients: int) -> int:
    """Serve host ``host`` of ``num_hosts``'s virtual clients until the run ends; returns the exit status (0 done,
    1 the coordinator unreachable or refusing, 2 no device, or a task or data that cannot be loaded). Logs to
    LOGS_DIR/simulation_host<host>.log and stdout. Runs at HOST_NICE below the priority it was started with."""
    from fedrest.simulation.host import ClientHost
    from fedrest.tasks import TaskError
    from utils import start_node

    device = start_node(cfg, Path(cfg.logs_dir) / f"simulation_host{host}.log")
    if device is None:
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    if hasattr(os, "nice"):  # the coordinator's evaluation and aggregation are the run's critical path: they come
        os.nice(HOST_NICE)   # first on a shared CPU, the hosts train in the rest (8 rounds of 1,000 clients: -12%)
    try:
        client_host = ClientHost(cfg, host, num_hosts, num_clients, device)
    except TaskError as exc:
        log.debug("the task failed", exc_info=exc.__cause__ or exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return client_host.run()
