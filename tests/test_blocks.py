"""The robust rules computed in coordinate blocks (fedrest.aggregation.blocks): bit-identical to the whole-tensor
rules and to a per-coordinate oracle written with Python floats, whatever the block width; the spill file is
written where asked and removed."""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict

import pytest
import torch

from fedrest.aggregation import coordinate_median, make_combiner, trimmed_mean
from fedrest.aggregation.blocks import SpilledUpdates, blockwise
from fedrest.aggregation.combine import ClientUpdate
from fedrest.aggregation.rules import median_of_sorted, trimmed_mean_of_sorted

REFERENCE = OrderedDict([
    ("conv.weight", torch.zeros(4, 3, 3, 3)),
    ("fc.weight", torch.zeros(10, 37)),
    ("fc.bias", torch.zeros(10, dtype=torch.float64)),
    ("scale", torch.zeros((), dtype=torch.float16)),
    ("bn.num_batches_tracked", torch.zeros((), dtype=torch.int64)),
])


def updates(m: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(m):
        state = OrderedDict()
        for key, ref in REFERENCE.items():
            if ref.is_floating_point():
                state[key] = (torch.randn(ref.shape, generator=generator, dtype=torch.float64) * 3).to(ref.dtype)
            else:
                state[key] = torch.randint(0, 1000, ref.shape, generator=generator, dtype=ref.dtype)
        out.append(state)
    return out


def oracle(states: list, rule: str, trim_fraction: float) -> "OrderedDict[str, torch.Tensor]":
    """Each coordinate on its own, in Python floats: statistics.median, or the kept sorted values summed in order."""
    m = len(states)
    k = math.floor(trim_fraction * m)
    out = OrderedDict()
    for key, ref in REFERENCE.items():
        columns = zip(*(s[key].reshape(-1).tolist() for s in states))
        if rule == "median":
            values = [statistics.median(sorted(float(v) for v in column)) for column in columns]
        else:
            values = []
            for column in columns:
                kept = sorted(float(v) for v in column)[k:m - k]
                total = kept[0]
                for v in kept[1:]:
                    total += v
                values.append(total / (m - 2 * k))
        result = torch.tensor(values, dtype=torch.float64).reshape(ref.shape)
        out[key] = torch.round(result).to(ref.dtype) if not ref.is_floating_point() else result.to(ref.dtype)
    return out


def assert_identical(a, b) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("m", [1, 2, 5, 8, 21])
@pytest.mark.parametrize("rule, beta", [("median", 0.0), ("trimmed_mean", 0.0), ("trimmed_mean", 0.2),
                                        ("trimmed_mean", 0.45)])
def test_blocks_of_any_width_are_bit_identical_to_the_whole_tensor_rule_and_the_oracle(m, rule, beta, tmp_path):
    states = updates(m, seed=m)
    whole = coordinate_median(states, REFERENCE) if rule == "median" else trimmed_mean(states, REFERENCE, beta)
    assert_identical(whole, oracle(states, rule, beta))
    k = math.floor(beta * m)

    def combine(values):
        return median_of_sorted(values) if rule == "median" else trimmed_mean_of_sorted(values, k)
    spilled = SpilledUpdates(REFERENCE, tmp_path)
    for state in states:
        spilled.append(state)
    try:
        for budget in (24 * m, 24 * m * 7, 24 * m * 100, 1 << 28):  # widths 1, 7, 100 and whole tensors
            assert_identical(blockwise(spilled, REFERENCE, combine, budget), whole)
    finally:
        spilled.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_the_combiners_spill_in_their_folder_and_give_the_whole_tensor_result(rule, tmp_path):
    states = updates(9, seed=3)
    combiner = make_combiner(rule, trim_fraction=0.2, spill_dir=str(tmp_path / "spill"))
    combiner.block_bytes = 24 * 9 * 5  # five coordinates per block
    seen = []

    def load_and_look(state):
        def load():
            seen.extend(p.name for p in (tmp_path / "spill").iterdir())
            return state
        return load
    result = combiner.combine([ClientUpdate(f"n{i}", 1, load_and_look(s)) for i, s in enumerate(states)], REFERENCE)
    expected = coordinate_median(states, REFERENCE) if rule == "median" else trimmed_mean(states, REFERENCE, 0.2)
    assert_identical(result.state_dict, expected)
    assert seen and all(name.startswith(".spill-") and name.endswith(".tmp") for name in seen)
    assert list((tmp_path / "spill").iterdir()) == []  # removed when the rule is done


def test_a_spill_record_holds_the_update_in_the_reference_layout(tmp_path):
    state = updates(1, seed=1)[0]
    spilled = SpilledUpdates(REFERENCE, tmp_path)
    spilled.append(state)
    try:
        assert spilled.record_bytes == sum(t.numel() * t.element_size() for t in REFERENCE.values())
        block = spilled.block("fc.weight", 5, 50)
        assert block.shape == (1, 45) and block.dtype == torch.float64
        assert torch.equal(block[0], state["fc.weight"].reshape(-1)[5:50].to(torch.float64))
    finally:
        spilled.close()
