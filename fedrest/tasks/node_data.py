"""A node's data for its role: a worker's part of the training data (and its held-out part for federated
evaluation), the coordinator's test data."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from fedrest.partition import partition_indices
from fedrest.tasks.api import Task, TaskContext, TaskError
from fedrest.tasks.data import DatasetData, LocalData, TensorData

log = logging.getLogger("fl.data")


def context(cfg, role: str) -> TaskContext:
    return TaskContext(role, cfg.data_dir, cfg.seed, cfg)


def _label_counts(data: LocalData) -> str:
    labels = data.labels()
    if labels is None or len(labels) == 0:
        return ""
    minlength = len(data.classes) if data.classes else 10
    return f", labels {torch.bincount(labels, minlength=minlength).tolist()}"


def worker_data(task: Task, cfg, device: torch.device) -> tuple[LocalData, LocalData | None]:
    """(training data, held-out data or None) of this worker, tensors moved to ``device``.

    The task's training data is cut to partition ``cfg.partition_id`` of ``cfg.num_partitions`` (IID, or
    Dirichlet(``cfg.alpha``) label skew; seeded, so every worker computes the same split), then a seeded
    ``cfg.eval_fraction`` of this part is held out for federated evaluation.

    Raises
    ------
    TaskError
        When the task cannot load its data, or the split cannot be made (a Dirichlet split of data without class
        labels, more partitions than examples, a held-out part of no example or of every example).
    """
    data = task.load_data(context(cfg, "worker"), "train")
    if cfg.num_partitions is not None:
        labels = data.labels()
        if labels is None and cfg.partition == "dirichlet":
            raise TaskError(f"task {task.name}: --partition dirichlet needs int64 class labels y (1-d); use "
                            "--partition iid")
        try:
            idx = partition_indices(labels.numpy() if labels is not None else np.zeros(len(data), np.int64),
                                    cfg.num_partitions, cfg.partition_id, cfg.partition, cfg.alpha, cfg.seed)
        except ValueError as exc:
            raise TaskError(f"cannot split the data of task {task.name}: {exc}") from None
        data = data.subset(idx)
        log.info("partition %d/%d (%s%s, seed %d): %d examples%s", cfg.partition_id, cfg.num_partitions,
                 cfg.partition, f", alpha {cfg.alpha:g}" if cfg.partition == "dirichlet" else "", cfg.seed,
                 len(data), _label_counts(data))
    held_out = None
    if cfg.eval_fraction > 0:
        data, held_out = hold_out(data, cfg.eval_fraction, f"{cfg.seed}/{cfg.partition_id}")
        log.info("held out %d of %d examples (EVAL_FRACTION=%g) to evaluate each global model on; training on "
                 "%d", len(held_out), len(data) + len(held_out), cfg.eval_fraction, len(data))
    data, held_out = (ready_on(d, device) for d in (data, held_out))
    return data, held_out


def ready_on(data: LocalData | None, device: torch.device) -> LocalData | None:
    """``data`` ready to train on ``device``: tensors moved there; a Dataset decoded into its cache now, if it fits
    (None stays None)."""
    if isinstance(data, TensorData):
        return data.to(device)
    if isinstance(data, DatasetData):
        data.warm(device)
    return data


def hold_out(data: LocalData, fraction: float, key: str) -> tuple[LocalData, LocalData]:
    """(the rest, a random ``fraction`` of ``data``), seeded by ``key``; each keeps the original order.

    Raises
    ------
    TaskError
        When the held-out part or the rest would be empty.
    """
    rest, held = hold_out_positions(len(data), fraction, key)
    return data.subset(rest.tolist()), data.subset(held.tolist())


def hold_out_positions(n: int, fraction: float, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions kept for training, positions held out) of ``n`` examples: int64 tensors, ascending, a seeded
    (by ``key``) random ``round(fraction * n)`` held out. Raises :class:`TaskError` when either part is empty."""
    n_out = int(round(fraction * n))
    if not 1 <= n_out < n:
        raise TaskError(f"--eval-fraction {fraction:g} of {n} examples leaves {n_out} to evaluate on and "
                        f"{n - n_out} to train on; both need at least one")
    seed = int.from_bytes(hashlib.sha256(f"holdout/{key}".encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.sort(order[n_out:]).values, torch.sort(order[:n_out]).values


def coordinator_test_data(task: Task, cfg) -> LocalData:
    """The coordinator's test data (on the CPU). Raises :class:`TaskError` as :meth:`Task.load_data` does."""
    return task.load_data(context(cfg, "coordinator"), "test")
