"""Where a simulation's client hosts run: the local process pool (the default: ``python -m fedrest.simulation``
processes, which ``simulate.py`` starts as launch.py starts workers) or a Ray cluster (``--backend ray``).

With Ray each host is one Ray task (:func:`fedrest.simulation.hosting.run_host`) that asks for the CPUs of its
torch threads; Ray places the tasks on the cluster's nodes, this module schedules nothing. Every host of a run must
run at once (the coordinator waits for all N clients to register), so a run that asks for more hosts than the
cluster has CPUs for is refused before it starts. The hosts talk to the coordinator over its REST API, so every
node of the cluster must reach the coordinator's address, and find the data (DATA_DIR, at the same path, or a
torchvision download). The code reaches the cluster's nodes as Ray's runtime environment ``working_dir`` (this
checkout without its data, runs and virtual environment), unless the cluster is this machine's.

:class:`RayHost` has the part of :class:`subprocess.Popen`'s interface that ``launch.py`` uses (``poll``,
``returncode``, ``send_signal``, ``wait``, ``kill``), so a Ray task is followed and stopped like a process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from config import Config

log = logging.getLogger("fl.simulation")

PROJECT = Path(__file__).resolve().parents[2]
# what a cluster's nodes need not receive: data, runs, environments (Ray's runtime_env "excludes", gitignore syntax)
UPLOAD_EXCLUDES = [".venv/", "data/", "models/", "logs/", "temp/", "runs/", "mlruns/", ".git/", "**/__pycache__/",
                   "node_modules/", "*.pt", "*.sqlite3", "*.db", "*.png"]
RAY_CONNECT_TIMEOUT_S = 5.0  # an address that does not answer: Ray itself would retry for minutes


class RayUnavailable(Exception):
    """Ray is not installed, the cluster cannot be reached, or it is too small for the run (the message says)."""


def pool_host_args(host: int, num_hosts: int, num_clients: int) -> list:
    """The arguments after ``python`` of host ``host``'s process in the local pool."""
    return ["-m", "fedrest.simulation", "--host", host, "--hosts", num_hosts, "--clients", num_clients]


def absolute_dirs(cfg: Config) -> Config:
    """``cfg`` with its data, logs and run folders as absolute paths (a Ray task runs in another directory)."""
    return dataclasses.replace(cfg, **{name: os.path.abspath(getattr(cfg, name))
                                       for name in ("data_dir", "logs_dir", "temp_dir", "models_dir")})


class RayHost:
    """One Ray task running a host, seen as a process (see the module's text)."""

    def __init__(self, ray, ref) -> None:
        self.ray, self.ref = ray, ref
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _ = self.ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    self.returncode = int(self.ray.get(self.ref))
                except self.ray.exceptions.RayError as exc:  # the task failed or was cancelled
                    log.error("a Ray host failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
                    self.returncode = 1
        return self.returncode

    def send_signal(self, _signum) -> None:
        self.kill()

    def kill(self) -> None:
        if self.poll() is None:
            self.ray.cancel(self.ref, force=True)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("ray task", timeout)
            time.sleep(0.1)
        return self.returncode


def start_ray_hosts(cfg: Config, num_hosts: int | None, num_clients: int, cpus_per_host: int,
                    address: str | None) -> dict[str, RayHost]:
    """Connect to the Ray cluster at ``address`` (None: start a local one) and start the hosts as Ray tasks
    (``num_hosts``; None: as many as the cluster's CPUs allow). Returns them by name (host0, host1, ...).

    Raises
    ------
    RayUnavailable
        When Ray is not installed, the cluster cannot be reached, or it has CPUs for fewer hosts than asked.
    """
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--backend ray needs Ray: pip install 'ray>=2.9'") from None
    from fedrest.simulation.hosting import run_host

    local = address is None
    if not local:
        _check_reachable(address)
    runtime_env = ({"env_vars": {"PYTHONPATH": str(PROJECT)}} if local else
                   {"working_dir": str(PROJECT), "excludes": UPLOAD_EXCLUDES})
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env,
                 configure_logging=False, **({"num_cpus": os.cpu_count() or 1} if local else {}))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    cpus = int(ray.cluster_resources().get("CPU", 0))
    fits = max(1, cpus // cpus_per_host)
    num_hosts = num_hosts or min(fits, num_clients)
    if num_hosts > fits:
        raise RayUnavailable(f"the Ray cluster has {cpus} CPUs: room for {fits} hosts of {cpus_per_host} CPU "
                             f"thread{'s' if cpus_per_host > 1 else ''} each, not {num_hosts}; ask for fewer "
                             "--processes or fewer --cpu-threads")
    remote = ray.remote(num_cpus=cpus_per_host, max_retries=0)(run_host)
    cfg = absolute_dirs(cfg)
    log.info("Ray cluster %s: %d CPUs; %d hosts of %d CPUs", address or "(local)", cpus, num_hosts, cpus_per_host)
    return {f"host{i}": RayHost(ray, remote.remote(cfg, i, num_hosts, num_clients)) for i in range(num_hosts)}


def _check_reachable(address: str) -> None:
    """Raise :class:`RayUnavailable` when ``address`` (HOST:PORT of a Ray head's GCS) takes no TCP connection within
    RAY_CONNECT_TIMEOUT_S ("auto" and ray:// addresses are left to Ray)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--ray-address must be HOST:PORT of the Ray head (ray start --head --port 6379), "
                             f"'auto' or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayUnavailable(f"cannot connect to the Ray cluster at {address}: {exc}; is its head running "
                             "(ray start --head) and reachable from here?") from None


def stop_ray() -> None:
    """Disconnect from Ray (and stop the local cluster this process started)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
