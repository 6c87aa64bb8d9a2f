"""IID and Dirichlet label-skew partitions (partition.py): disjoint, complete, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from fedrest.partition import dirichlet_partition, iid_partition, partition_indices

NUM_CLASSES = 10


def _labels(per_class: int = 100) -> np.ndarray:
    return np.repeat(np.arange(NUM_CLASSES), per_class)  # (N,) sorted labels, N = 10 * per_class


def _assert_disjoint_cover(parts, num_examples):
    assert all(p.dtype == np.int64 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted ascending, no repeats inside a part
    joined = np.concatenate(parts)
    assert len(joined) == num_examples  # no example in two parts
    assert np.array_equal(np.sort(joined), np.arange(num_examples))  # every example somewhere


@pytest.mark.parametrize("num_examples, num_partitions", [(1000, 3), (10, 10), (7, 1), (101, 4), (5, 2)])
def test_iid_disjoint_complete_balanced(num_examples, num_partitions):
    parts = iid_partition(num_examples, num_partitions, seed=0)
    assert len(parts) == num_partitions
    _assert_disjoint_cover(parts, num_examples)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == num_examples


def test_iid_sizes_exact():
    assert [len(p) for p in iid_partition(10, 3, seed=5)] == [4, 3, 3]


def test_iid_deterministic_per_seed():
    a, b, c = iid_partition(500, 4, seed=1), iid_partition(500, 4, seed=1), iid_partition(500, 4, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_is_shuffled_not_contiguous_blocks():
    parts = iid_partition(1000, 2, seed=0)
    assert not np.array_equal(parts[0], np.arange(500))
    # every part sees roughly half of each class of the sorted label array
    counts = np.bincount(_labels()[parts[0]], minlength=NUM_CLASSES)
    assert counts.min() >= 30 and counts.max() <= 70


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
@pytest.mark.parametrize("num_partitions", [2, 5, 10])
def test_dirichlet_disjoint_complete(alpha, num_partitions):
    labels = _labels()
    parts = dirichlet_partition(labels, num_partitions, alpha, seed=3)
    assert len(parts) == num_partitions
    _assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_deterministic_per_seed():
    labels = _labels()
    a = dirichlet_partition(labels, 5, 0.5, seed=7)
    b = dirichlet_partition(labels, 5, 0.5, seed=7)
    c = dirichlet_partition(labels, 5, 0.5, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _class_shares(labels, parts):
    """(num_partitions, NUM_CLASSES) fraction of each part's examples in each class."""
    counts = np.stack([np.bincount(labels[p], minlength=NUM_CLASSES) for p in parts]).astype(float)
    return counts / counts.sum(axis=1, keepdims=True)


def test_dirichlet_small_alpha_is_skewed_large_alpha_near_uniform():
    labels = _labels(200)
    skewed = _class_shares(labels, dirichlet_partition(labels, 10, 0.05, seed=0))
    uniform = _class_shares(labels, dirichlet_partition(labels, 10, 1000.0, seed=0))
    # alpha = 0.05: most of a part's examples come from its two biggest classes
    top2 = np.sort(skewed, axis=1)[:, -2:].sum(axis=1)
    assert np.median(top2) > 0.8
    # ... and a typical part lacks several classes entirely
    assert np.median((skewed < 0.01).sum(axis=1)) >= 5
    # alpha = 1000: every class makes up close to 1/10 of every part
    assert np.all(np.abs(uniform - 0.1) < 0.05)
    assert np.all(uniform > 0)


def test_dirichlet_with_unlabelled_classes_order_and_non_contiguous_labels():
    labels = np.array([9, 3, 3, 9, 9, 3, 7, 7, 7, 7, 3, 9])
    parts = dirichlet_partition(labels, 3, 1.0, seed=0)
    _assert_disjoint_cover(parts, len(labels))


def test_partition_indices_matches_the_split_functions():
    labels = _labels(20)
    iid = iid_partition(len(labels), 4, seed=9)
    dirichlet = dirichlet_partition(labels, 4, 0.3, seed=9)
    for k in range(4):
        assert np.array_equal(partition_indices(labels, 4, k, "iid", seed=9), iid[k])
        assert np.array_equal(partition_indices(labels, 4, k, "dirichlet", alpha=0.3, seed=9), dirichlet[k])


@pytest.mark.parametrize("call, match", [
    (lambda: iid_partition(10, 0, seed=0), "num_partitions must be >= 1"),
    (lambda: iid_partition(10, -2, seed=0), "num_partitions must be >= 1"),
    (lambda: iid_partition(3, 4, seed=0), "3 examples cannot fill 4 partitions"),
    (lambda: iid_partition(0, 1, seed=0), "0 examples"),
    (lambda: dirichlet_partition(_labels(), 0, 0.5, seed=0), "num_partitions must be >= 1"),
    (lambda: dirichlet_partition(np.array([0, 1]), 3, 0.5, seed=0), "cannot fill"),
    (lambda: dirichlet_partition(_labels(), 2, 0.0, seed=0), "alpha must be > 0"),
    (lambda: dirichlet_partition(_labels(), 2, -1.0, seed=0), "alpha must be > 0"),
    (lambda: dirichlet_partition(_labels(), 2, float("nan"), seed=0), "alpha must be > 0"),
    (lambda: dirichlet_partition(np.zeros(4, dtype=int), 4, 1e-3, seed=0, min_size=2), "fewer than 2 examples"),
    (lambda: partition_indices(_labels(), 4, 4), "partition_id must be in 0..3"),
    (lambda: partition_indices(_labels(), 4, -1), "partition_id must be in 0..3"),
    (lambda: partition_indices(_labels(), 4, 0, scheme="pathological"), "unknown partition scheme"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
