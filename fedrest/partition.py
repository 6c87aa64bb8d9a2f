"""Deterministic, disjoint splits of a training set across workers (pure functions, no I/O).

Every worker computes the whole split from (seed, num_partitions) and keeps its own part, so
workers on different hosts agree without talking to each other, and the parts never overlap.

- IID: a seeded random permutation cut into ``num_partitions`` nearly equal parts.
- Non-IID label skew: for every class, proportions p ~ Dirichlet(alpha * 1_n) decide which share of
  that class each partition gets (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", Sec. 3). Small alpha gives few classes per
  worker; large alpha approaches IID.
"""

from __future__ import annotations

import numpy as np


def iid_partition(num_examples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Split ``range(num_examples)`` into ``num_partitions`` disjoint random parts.

    Returns
    -------
    list of int64 arrays, sorted ascending; sizes differ by at most one.

    Raises
    ------
    ValueError
        If ``num_partitions`` < 1 or there are fewer examples than partitions.
    """
    _check(num_examples, num_partitions)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_partitions)]


def dirichlet_partition(labels: np.ndarray, num_partitions: int, alpha: float, seed: int,
                        min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Split example indices by Dirichlet(alpha) label skew.

    Parameters
    ----------
    labels : int array (N,) of class labels.
    alpha : concentration > 0.
    min_size : every part gets at least this many examples; the draw is repeated (with the
        same seeded generator, so still deterministic) until it holds.

    Returns
    -------
    list of int64 arrays, sorted ascending, disjoint, together covering every example.

    Raises
    ------
    ValueError
        For alpha <= 0, too few examples, or when ``max_tries`` draws all leave a part smaller
        than ``min_size`` (use a larger alpha or fewer partitions).
    """
    labels = np.asarray(labels)
    _check(len(labels), num_partitions)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise ValueError(f"Dirichlet(alpha={alpha}) left a partition with fewer than {min_size} examples "
                     f"in {max_tries} draws; use a larger alpha or fewer partitions")


def partition_indices(labels: np.ndarray, num_partitions: int, partition_id: int, scheme: str = "iid",
                      alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Indices of part ``partition_id`` of a split by ``scheme`` ("iid" or "dirichlet").

    Raises
    ------
    ValueError
        For an unknown scheme, a partition id out of range, or the errors of the split functions.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in 0..{num_partitions - 1}, got {partition_id}")
    if scheme == "iid":
        return iid_partition(len(labels), num_partitions, seed)[partition_id]
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_partitions, alpha, seed)[partition_id]
    raise ValueError(f"unknown partition scheme {scheme!r}; use iid or dirichlet")


def _check(num_examples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_examples < num_partitions:
        raise ValueError(f"{num_examples} examples cannot fill {num_partitions} partitions")
