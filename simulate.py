"""Simulate N virtual clients against a real coordinator, on this machine's cores or on a Ray cluster.

    python simulate.py --clients 1000 --rounds 30 --client-fraction 0.02 --partition dirichlet --alpha 0.3 --cpu
    python simulate.py --clients 1000 --backend ray [--ray-address HOST:6379 --host THIS_HOST_ADDRESS]

Starts a coordinator (``coordinator.py``, as launch.py does) and client hosts: ``--processes`` processes of the local
pool (default: one per core), or Ray tasks with ``--backend ray``. Each host serves every H-th virtual client
(``client-0000``, ``client-0001``, ...), each with its own part of the data (IID or Dirichlet(alpha), as a worker with
``--partition-id k --num-partitions N``) and its own node identity, over the same REST API as a worker
(:mod:`fedrest.simulation`). The coordinator waits for all N (MIN_NODES_TO_START=N), then samples
max(1, C * N) of them each round. Run state, checkpoints and logs: temp/simulation, models/simulation and
logs/simulation (unless --temp-dir, --models-dir, --logs-dir say otherwise); each run sets the previous one aside.
Ctrl-C stops every process. Exit status: 0 when the run completed, 1 when it failed, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import config as config_module
from config import Config
from fedrest.simulation.backends import RayUnavailable, pool_host_args, start_ray_hosts, stop_ray
from fedrest.simulation.plan import default_hosts
from launch import HERE, LAUNCH_FIELDS, Launch, add_run_arguments, child_env, free_port, plural, run

MAX_CLIENTS = 100_000
SIMULATION_DIRS = {"temp_dir": os.path.join("temp", "simulation"), "models_dir": os.path.join("models", "simulation"),
                   "logs_dir": os.path.join("logs", "simulation")}
SIMULATION_FIELDS = (*LAUNCH_FIELDS, "give_up_after")
HOST_FIELDS = [f for f in SIMULATION_FIELDS if f in config_module.WORKER_FIELDS
               and f not in ("name", "partition_id", "num_partitions")]


class Simulation(Launch):
    """A coordinator and the client hosts of ``num_clients`` virtual clients (``num_hosts`` of them; None with
    Ray: as many as the cluster has CPUs for)."""

    noun = "virtual clients"

    def __init__(self, cfg: Config, num_clients: int, num_hosts: int | None, port: int, backend: str = "pool",
                 ray_address: str | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(cfg, num_clients, port)
        self.num_hosts, self.backend, self.ray_address, self.host = num_hosts, backend, ray_address, host
        self.address = f"{host}:{port}"

    def coordinator_settings(self) -> dict:
        settings = super().coordinator_settings()
        sample = max(1, math.ceil(self.cfg.client_fraction * self.num_workers))
        settings.update(host=self.host, min_nodes_to_start=self.num_workers, min_sample=sample,
                        max_nodes=self.num_workers, address_rate_limit=0)  # every client comes from the hosts' IPs
        return settings

    def start(self) -> bool:
        try:
            return super().start()
        except RayUnavailable as exc:
            print(f"error: {exc}")
            return False

    def start_workers(self) -> None:
        """Start the client hosts: processes of the pool, or Ray tasks (raises :class:`RayUnavailable`)."""
        extra = {"coordinator_address": self.address, "token": self.token, "quiet": True}
        if self.backend == "ray":
            cfg = dataclasses.replace(self.cfg, **extra)
            self.procs.update(start_ray_hosts(cfg, self.num_hosts, self.num_workers, max(1, cfg.cpu_threads),
                                              self.ray_address))
            self.num_hosts = len(self.procs) - 1
            return
        env = child_env(self.cfg, HOST_FIELDS, extra)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)  # -m from any folder
        for i in range(self.num_hosts):
            self._spawn(f"host{i}", pool_host_args(i, self.num_hosts, self.num_workers), env)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self.backend == "ray":
            stop_ray()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Simulate N virtual clients against a real coordinator on this machine.")
    parser.add_argument("--clients", type=int, default=100, help="number of virtual clients N (default: 100)")
    parser.add_argument("--processes", type=int, default=0,
                        help="client hosts: processes of the pool, or Ray tasks (default: one per core; with Ray, "
                             "as many as the cluster's CPUs allow)")
    parser.add_argument("--backend", choices=("pool", "ray"), default="pool",
                        help="pool: processes on this machine (default); ray: tasks on a Ray cluster")
    parser.add_argument("--ray-address", default=None,
                        help="an existing Ray cluster (HOST:PORT of its head, or 'auto'); default: start a local one")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the coordinator listens on and the client hosts use (on a cluster of several "
                             "machines: this machine's address that the others reach; default 127.0.0.1)")
    add_run_arguments(parser, SIMULATION_FIELDS, "virtual clients")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    cfg, args = config_module.parse_config(parser, SIMULATION_FIELDS, argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be in 1..{MAX_CLIENTS}")
    if args.processes < 0 or args.processes > args.clients:
        parser.error("--processes must be in 1..--clients (0: the default)")
    if args.ray_address is not None and args.backend != "ray":
        parser.error("--ray-address needs --backend ray")
    cores = os.cpu_count() or 1
    hosts = args.processes or (None if args.backend == "ray" else default_hosts(args.clients, cores))
    given = config_module.given_fields(args, SIMULATION_FIELDS)
    cfg = dataclasses.replace(cfg, node_timeout=30.0, heartbeat_interval=2.0,
                              **{k: v for k, v in SIMULATION_DIRS.items() if k not in given})
    if cfg.cpu_threads == 0 and cfg.device != "gpu":  # the hosts share the cores
        cfg = dataclasses.replace(cfg, cpu_threads=max(1, cores // hosts) if hosts else 1)
    sim = Simulation(cfg, args.clients, hosts, args.port or free_port(), args.backend, args.ray_address, args.host)
    sim.keep_serving = args.keep_serving
    placed = plural(hosts, "process", "processes") if args.backend == "pool" else (
        f"Ray tasks on {args.ray_address or 'a local Ray cluster'}")
    print(f"starting a coordinator on {sim.address} and {args.clients} virtual clients on {placed} ({cfg.device}, "
          f"{cfg.task or cfg.dataset}, {cfg.partition or 'iid'} split, C={cfg.client_fraction:g}, {cfg.strategy}, "
          f"{plural(cfg.communication_rounds, 'round')}); logs in {sim.logs}")
    return run(sim)


if __name__ == "__main__":
    sys.exit(main())
