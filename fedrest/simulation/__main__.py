"""One client host of a simulation: ``python -m fedrest.simulation --host i --hosts H --clients N`` and the
worker's settings (flags or FL_* variables: the coordinator's address, join token, data, partition scheme).

``simulate.py`` starts H of them (the local process pool); ``--backend ray`` runs :func:`run_host` in Ray tasks
instead. Exit status: as :mod:`fedrest.simulation.host` says; 2 also for bad arguments.
"""

from __future__ import annotations

import argparse
import sys

import config as config_module
from fedrest.simulation.hosting import run_host
from utils import run_program

HOST_FIELDS = tuple(f for f in config_module.WORKER_FIELDS if f not in ("name", "partition_id", "num_partitions"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="One client host of a simulation.")
    parser.add_argument("--host", type=int, required=True, help="this host's number, 0..H-1")
    parser.add_argument("--hosts", type=int, required=True, help="number of hosts H")
    parser.add_argument("--clients", type=int, required=True, help="number of virtual clients N")
    config_module.add_arguments(parser, HOST_FIELDS)
    return parser


def _main(argv) -> int:
    parser = build_parser()
    cfg, args = config_module.parse_config(parser, HOST_FIELDS, argv)
    if not 0 <= args.host < args.hosts <= args.clients:
        parser.error("need 0 <= --host < --hosts <= --clients")
    return run_host(cfg, args.host, args.hosts, args.clients)


if __name__ == "__main__":
    sys.exit(run_program(_main, sys.argv[1:]))
