"""What both monitors share: reading the coordinator's status with a timeout and backing off while it is down."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import config as config_module
from config import MONITOR_FIELDS
from fedrest.client import (CoordinatorClient, CoordinatorError, CoordinatorUnreachable, CoordinatorUntrusted,
                            make_session)


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    """The monitors' flags: the coordinator's address, its CA and the monitor token (config.MONITOR_FIELDS, also
    read from FL_* variables; ``--token`` is the monitor token), the refresh interval and ``--once``."""
    config_module.add_arguments(parser, MONITOR_FIELDS, extra_flags={"monitor_token": ["--token"]})
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default: 2)")
    parser.add_argument("--once", action="store_true", help="show one snapshot and exit")


def parse_monitor_args(parser: argparse.ArgumentParser, argv=None) -> "tuple[argparse.Namespace, StatusPoller]":
    """Parse the monitor's flags (bad values end the program with status 2) and build its poller."""
    cfg, args = config_module.parse_config(parser, MONITOR_FIELDS, argv)
    if not 0 < args.interval <= 3600:
        parser.error("--interval must be a number of seconds in (0, 3600]")
    try:
        poller = StatusPoller(cfg.coordinator_address, cfg.monitor_token, args.interval, cfg.ca_cert)
    except (ValueError, OSError) as exc:  # OSError, ssl.SSLError: an unreadable --ca-cert
        parser.error(f"{exc}")
    return args, poller


@dataclass
class Poll:
    """The outcome of one status read: the status, or why it failed and since when."""

    status: dict | None
    error: str | None = None
    unreachable_since: float | None = None  # wall clock
    refused: bool = False  # the coordinator answered, but refused the token


class StatusPoller:
    """Reads ``GET /api/v1/status``; after failures, waits longer (1, 2, 4 ... up to 30 s) before the next read."""

    def __init__(self, address: str, token: str | None, interval: float, ca_cert: str | None = None) -> None:
        self.client = CoordinatorClient(address, token=token, session=make_session(total_retries=0, ca_cert=ca_cert),
                                        connect_timeout=3.0)
        self.interval = max(0.2, interval)
        self.failures = 0
        self.unreachable_since: float | None = None
        self.last_status: dict | None = None

    def poll(self) -> Poll:
        try:
            status = self.client.status()
        except (CoordinatorUnreachable, CoordinatorError, CoordinatorUntrusted) as exc:
            self.failures += 1
            if self.unreachable_since is None:
                self.unreachable_since = time.time()
            if isinstance(exc, CoordinatorError) and exc.status == 401:
                message = (f"the coordinator refused the token ({exc.message}); pass the monitor token with --token "
                           "or FL_MONITOR_TOKEN")
                return Poll(None, message, self.unreachable_since, refused=True)
            if isinstance(exc, CoordinatorUntrusted):
                return Poll(None, str(exc), self.unreachable_since, refused=True)
            return Poll(None, str(exc), self.unreachable_since)
        self.failures, self.unreachable_since, self.last_status = 0, None, status
        return Poll(status)

    def next_delay(self) -> float:
        """Seconds to sleep before the next poll (backoff while failing)."""
        if self.failures == 0:
            return self.interval
        return min(30.0, max(self.interval, 2.0 ** (self.failures - 1)))


def round_metrics(record: dict) -> dict[str, float]:
    """The metrics of one round of the status history, by name: the coordinator's evaluation ("accuracy",
    "loss", and whatever the task reports: "f1", "auc"...), then the workers' federated evaluation as
    "federated <name>". Records of earlier versions have only ``test_accuracy`` and ``test_loss``."""
    metrics = dict(record.get("test_metrics") or {})
    for key, name in (("test_accuracy", "accuracy"), ("test_loss", "loss")):
        if name not in metrics and record.get(key) is not None:
            metrics[name] = record[key]
    for name, value in (record.get("federated_metrics") or {}).items():
        metrics[f"federated {name}"] = value
    return metrics


def node_counts(status: dict) -> dict[str, int]:
    """Nodes by status ("total", "online", "training", "offline", "banned") of a ``/status`` answer: its
    ``node_counts`` (a coordinator that lists only the featured nodes of many), else counted from ``nodes``."""
    counts = status.get("node_counts")
    if isinstance(counts, dict):
        return {k: int(counts.get(k, 0)) for k in ("total", "online", "training", "offline", "banned")}
    nodes = status.get("nodes") or []
    return {"total": len(nodes), **{k: sum(1 for n in nodes if n.get("status") == k)
                                    for k in ("online", "training", "offline", "banned")}}


def privacy_text(status: dict) -> str | None:
    """The privacy spent, for the monitors' headers: "ε 1.23 at δ 1e-05 (budget 8, 30 rounds)"; None without
    differential privacy."""
    privacy = status.get("privacy")
    if not privacy:
        return None
    budget = (f" (budget {privacy['epsilon_budget']:g}, {privacy['rounds_allowed']} rounds)"
              if privacy.get("epsilon_budget") else "")
    return f"ε {privacy['epsilon']:.2f} at δ {privacy['delta']:g}{budget}"


def metric_names(history: list[dict]) -> list[str]:
    """Every metric name of ``history`` (:func:`round_metrics`), accuracy and loss first, the others in the
    order they first appear."""
    names: list[str] = []
    for record in history:
        names += [n for n in round_metrics(record) if n not in names]
    first = [n for n in ("accuracy", "loss") if n in names]
    return first + [n for n in names if n not in first]


def is_loss(name: str) -> bool:
    """True for metrics where lower is better and that are drawn on their own axis (loss, MAE, MSE...)."""
    return any(word in name.lower() for word in ("loss", "mae", "mse", "rmse", "error"))
