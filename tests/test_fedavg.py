"""FedAvg (utils.fedavg, utils.FedAvgAccumulator) against hand-computed values (F1, F3, F9, F10, F14)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import SimpleCNN
from fedrest.aggregation import FedAvgAccumulator, fedavg
from fedrest.serialization import UpdateRejected


def sd(**tensors) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict(tensors)


# ----------------------------------------------------------------------------- hand-computed means


def test_float_weighted_mean_hand_computed():
    a = sd(w=torch.tensor([1.0, 2.0]), b=torch.tensor([[0.0, -4.0]]))
    b = sd(w=torch.tensor([5.0, 6.0]), b=torch.tensor([[8.0, 4.0]]))
    out = fedavg([(a, 1), (b, 3)])
    # w: (1*1 + 3*5)/4 = 4, (1*2 + 3*6)/4 = 5;  b: (0 + 24)/4 = 6, (-4 + 12)/4 = 2
    assert list(out) == ["w", "b"]
    assert torch.equal(out["w"], torch.tensor([4.0, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[6.0, 2.0]]))
    assert out["w"].dtype == torch.float32 and out["b"].shape == (1, 2)


def test_equal_counts_give_plain_mean_and_three_updates():
    out = fedavg([(sd(w=torch.tensor([3.0])), 2), (sd(w=torch.tensor([6.0])), 2), (sd(w=torch.tensor([0.0])), 4)])
    # (2*3 + 2*6 + 4*0) / 8 = 18/8 = 2.25
    assert out["w"].item() == 2.25


@pytest.mark.parametrize("values, weights, expected", [
    ((1, 2), (1, 3), 2),     # (1 + 6)/4 = 1.75 -> 2
    ((0, 1), (3, 1), 0),     # 1/4 = 0.25 -> 0
    ((1, 2), (1, 1), 2),     # 1.5 -> 2 (half to even)
    ((2, 3), (1, 1), 2),     # 2.5 -> 2 (half to even, not half up)
    ((100, 0), (1, 1), 50),  # exact
    ((7, 7), (5, 9), 7),     # identical counters keep their value
])
def test_integer_rule_on_0d_int64(values, weights, expected):
    updates = [(sd(num_batches_tracked=torch.tensor(v, dtype=torch.int64)), n) for v, n in zip(values, weights)]
    out = fedavg(updates)
    nbt = out["num_batches_tracked"]
    assert nbt.dtype == torch.int64
    assert nbt.shape == torch.Size([]) and nbt.dim() == 0
    assert nbt.item() == expected


def test_integer_rule_on_int32_vector():
    a = sd(c=torch.tensor([1, 10, -3], dtype=torch.int32))
    b = sd(c=torch.tensor([2, 20, -4], dtype=torch.int32))
    out = fedavg([(a, 1), (b, 3)])
    # (1+6)/4=1.75->2, (10+60)/4=17.5->18 (even), (-3-12)/4=-3.75->-4
    assert out["c"].dtype == torch.int32
    assert out["c"].tolist() == [2, 18, -4]


def test_bool_rule_is_weighted_majority():
    a = sd(mask=torch.tensor([True, False, True, True]))
    b = sd(mask=torch.tensor([False, False, True, False]))
    out = fedavg([(a, 1), (b, 3)])
    # weighted share of True: 0.25, 0, 1, 0.25 -> rounded 0, 0, 1, 0
    assert out["mask"].dtype == torch.bool
    assert out["mask"].tolist() == [False, False, True, False]
    heavy_a = fedavg([(a, 3), (b, 1)])  # shares 0.75, 0, 1, 0.75
    assert heavy_a["mask"].tolist() == [True, False, True, True]
    tie = fedavg([(a, 1), (b, 1)])  # shares 0.5, 0, 1, 0.5 -> half to even -> 0
    assert tie["mask"].tolist() == [False, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
def test_float_dtype_preserved(dtype):
    a = sd(w=torch.tensor([1.0, 2.0, -8.0], dtype=dtype))
    b = sd(w=torch.tensor([2.0, 4.0, 0.0], dtype=dtype))
    out = fedavg([(a, 1), (b, 3)])
    # (1+6)/4 = 1.75, (2+12)/4 = 3.5, -8/4 = -2 (all exact in every dtype above)
    assert out["w"].dtype == dtype
    assert out["w"].tolist() == [1.75, 3.5, -2.0]


def test_float16_mean_computed_in_float64_not_overflowing():
    # 60000 * 3 overflows float16 (max 65504) if summed in the reference dtype
    a = sd(w=torch.tensor([60000.0], dtype=torch.float16))
    out = fedavg([(a, 3), (a, 5)])
    assert out["w"].dtype == torch.float16
    assert out["w"].item() == 60000.0


def test_reference_dtype_and_keys_are_enforced():
    reference = sd(w=torch.zeros(2), n=torch.tensor(0))
    out = fedavg([(sd(w=torch.tensor([2.0, 4.0]), n=torch.tensor(4)), 2)], reference=reference)
    assert list(out) == ["w", "n"]
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert out["n"].item() == 4 and out["n"].dtype == torch.int64
    with pytest.raises(UpdateRejected, match="missing"):
        fedavg([(sd(w=torch.zeros(2)), 1)], reference=reference)


# ----------------------------------------------------------------------------- rejections


def _pair():
    return sd(w=torch.tensor([1.0, 2.0]), n=torch.tensor(3)), sd(w=torch.tensor([3.0, 4.0]), n=torch.tensor(5))


@pytest.mark.parametrize("bad, match", [
    (sd(w=torch.tensor([3.0, 4.0])), "missing"),                                            # missing key
    (sd(w=torch.tensor([3.0, 4.0]), n=torch.tensor(5), extra=torch.zeros(1)), "unexpected"),  # extra key
    (sd(v=torch.tensor([3.0, 4.0]), n=torch.tensor(5)), "missing"),                          # renamed key
    (sd(w=torch.tensor([3.0, 4.0, 5.0]), n=torch.tensor(5)), "shape"),
    (sd(w=torch.tensor([[3.0, 4.0]]), n=torch.tensor(5)), "shape"),
    (sd(w=torch.tensor([3.0, 4.0]), n=torch.tensor([5])), "shape"),                          # 1-d vs 0-d
    (sd(w=torch.tensor([3.0, 4.0], dtype=torch.float64), n=torch.tensor(5)), "dtype"),
    (sd(w=torch.tensor([3.0, 4.0]), n=torch.tensor(5.0)), "dtype"),                          # float counter
    (sd(w=torch.tensor([3.0, 4.0]), n=torch.tensor(5, dtype=torch.int32)), "dtype"),
])
def test_mismatched_update_rejected(bad, match):
    good, _ = _pair()
    with pytest.raises(UpdateRejected, match=match):
        fedavg([(good, 1), (bad, 1)])


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_non_finite_update_rejected(bad_value):
    good, other = _pair()
    other["w"][1] = bad_value
    with pytest.raises(UpdateRejected, match="NaN or infinite"):
        fedavg([(good, 1), (other, 1)])
    with pytest.raises(UpdateRejected, match="NaN or infinite"):
        fedavg([(other, 1)])


def test_rejected_update_leaves_accumulator_unchanged():
    good, other = _pair()
    acc = FedAvgAccumulator(good)
    acc.add(good, 2)
    poisoned = sd(w=torch.tensor([math.nan, 0.0]), n=torch.tensor(1))
    with pytest.raises(UpdateRejected):
        acc.add(poisoned, 100)
    with pytest.raises(UpdateRejected):
        acc.add(sd(w=torch.zeros(3), n=torch.tensor(1)), 100)
    with pytest.raises(UpdateRejected):
        acc.add(other, 0)
    assert acc.num_updates == 1 and acc.total_samples == 2
    out = acc.result()
    assert torch.equal(out["w"], torch.tensor([1.0, 2.0])) and out["n"].item() == 3
    assert bool(torch.isfinite(out["w"]).all())


@pytest.mark.parametrize("num_samples", [0, -1, -100, True, False, 1.0, 2.5, "3", None, math.nan])
def test_bad_num_samples_rejected(num_samples):
    good, other = _pair()
    with pytest.raises(UpdateRejected, match="num_samples"):
        fedavg([(good, 1), (other, num_samples)])
    with pytest.raises(UpdateRejected, match="num_samples"):
        FedAvgAccumulator(good).add(good, num_samples)


def test_numpy_float_num_samples_rejected_not_truncated():
    good, _ = _pair()
    with pytest.raises(UpdateRejected):
        FedAvgAccumulator(good).add(good, np.float64(2.0))


def test_empty_list_raises_value_error():
    with pytest.raises(ValueError, match="zero updates"):
        fedavg([])
    with pytest.raises(ValueError, match="zero updates"):
        fedavg(iter(()))
    with pytest.raises(ValueError, match="zero updates"):
        FedAvgAccumulator(sd(w=torch.zeros(1))).result()


# ----------------------------------------------------------------------------- no leaked state (F14)


def test_two_accumulators_are_independent_and_reusable_results():
    ref = sd(w=torch.zeros(2), n=torch.tensor(0))
    acc1, acc2 = FedAvgAccumulator(ref), FedAvgAccumulator(ref)
    acc1.add(sd(w=torch.tensor([4.0, 8.0]), n=torch.tensor(2)), 1)
    acc2.add(sd(w=torch.tensor([-2.0, 2.0]), n=torch.tensor(10)), 5)
    acc1.add(sd(w=torch.tensor([0.0, 0.0]), n=torch.tensor(6)), 3)
    first1 = acc1.result()
    first2 = acc2.result()
    # acc1: (4 + 0)/4 = 1, (8 + 0)/4 = 2, counter (2 + 18)/4 = 5; acc2: only its one update
    assert torch.equal(first1["w"], torch.tensor([1.0, 2.0])) and first1["n"].item() == 5
    assert torch.equal(first2["w"], torch.tensor([-2.0, 2.0])) and first2["n"].item() == 10
    assert (acc1.num_updates, acc1.total_samples, acc2.num_updates, acc2.total_samples) == (2, 4, 1, 5)
    # result() does not consume or change the accumulator; the reference was not modified
    assert torch.equal(acc1.result()["w"], first1["w"])
    assert torch.equal(ref["w"], torch.zeros(2)) and ref["n"].item() == 0
    # a mutation of a result does not reach the accumulator
    first1["w"].fill_(99.0)
    assert torch.equal(acc1.result()["w"], torch.tensor([1.0, 2.0]))


def test_fedavg_called_twice_gives_same_answer_and_does_not_mutate_inputs():
    a = sd(w=torch.tensor([1.0, 2.0]), n=torch.tensor(3))
    b = sd(w=torch.tensor([5.0, 6.0]), n=torch.tensor(7))
    first = fedavg([(a, 1), (b, 3)])
    second = fedavg([(a, 1), (b, 3)])
    third = fedavg([(b, 2)])
    assert torch.equal(first["w"], torch.tensor([4.0, 5.0])) and first["n"].item() == 6  # (3+21)/4 = 6
    assert torch.equal(second["w"], first["w"]) and second["n"].item() == 6
    assert torch.equal(third["w"], torch.tensor([5.0, 6.0])) and third["n"].item() == 7
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0])) and torch.equal(b["w"], torch.tensor([5.0, 6.0]))
    assert a["n"].item() == 3 and b["n"].item() == 7


# ----------------------------------------------------------------------------- full SimpleCNN (F1, F3)


def _trained_state(seed: int, steps: int) -> "OrderedDict[str, torch.Tensor]":
    """A SimpleCNN state after ``steps`` forward passes in train mode (BatchNorm statistics move)."""
    torch.manual_seed(seed)
    net = SimpleCNN()
    net.train()
    with torch.no_grad():
        for _ in range(steps):
            net(torch.randn(4, 1, 28, 28) * (seed + 1) + seed)
    return OrderedDict((k, v.clone()) for k, v in net.state_dict().items())


def test_full_simplecnn_state_dict_averaged_including_batchnorm_buffers():
    a, b = _trained_state(1, 2), _trained_state(2, 6)
    out = fedavg([(a, 1), (b, 3)])
    assert list(out) == list(a)
    for key in ("bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
                "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked"):
        assert key in out
    for key, value in out.items():
        assert value.dtype == a[key].dtype and value.shape == a[key].shape, key
        if value.is_floating_point():
            expected = ((a[key].double() * 1 + b[key].double() * 3) / 4).float()
            assert torch.equal(value, expected), key
    # num_batches_tracked: 2 and 6 forward passes, weights 1 and 3 -> (2 + 18)/4 = 5, int64 0-d
    for bn in ("bn1", "bn2"):
        nbt = out[f"{bn}.num_batches_tracked"]
        assert (a[f"{bn}.num_batches_tracked"].item(), b[f"{bn}.num_batches_tracked"].item()) == (2, 6)
        assert nbt.dtype == torch.int64 and nbt.dim() == 0 and nbt.item() == 5
    # the running statistics really changed: they are neither the initial values nor either input
    assert not torch.equal(out["bn1.running_mean"], torch.zeros(32))
    assert not torch.equal(out["bn1.running_mean"], a["bn1.running_mean"])
    assert not torch.equal(out["bn1.running_mean"], b["bn1.running_mean"])
    net = SimpleCNN()
    result = net.load_state_dict(out, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert net.bn1.num_batches_tracked.item() == 5


# ----------------------------------------------------------------------------- properties (hypothesis)

SHAPES = [(), (1,), (3,), (2, 3)]


@st.composite
def float_updates(draw):
    shape = draw(st.sampled_from(SHAPES))
    size = int(np.prod(shape)) if shape else 1
    count = draw(st.integers(1, 5))
    values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
    arrays = [np.array(draw(st.lists(values, min_size=size, max_size=size)), dtype=np.float32).reshape(shape)
              for _ in range(count)]
    counts = draw(st.lists(st.integers(1, 10_000), min_size=count, max_size=count))
    ints = [np.array(draw(st.lists(st.integers(-10**6, 10**6), min_size=size, max_size=size)),
                     dtype=np.int64).reshape(shape) for _ in range(count)]
    return arrays, ints, counts


def _to_updates(arrays, ints, counts):
    return [(OrderedDict(w=torch.from_numpy(a.copy()), c=torch.from_numpy(i.copy())), n)
            for a, i, n in zip(arrays, ints, counts)]


@settings(max_examples=60, deadline=None)
@given(float_updates())
def test_property_weighted_mean_matches_float64_reference(data):
    arrays, ints, counts = data
    out = fedavg(_to_updates(arrays, ints, counts))
    total = float(sum(counts))
    ref_w = sum(np.float64(n) * a.astype(np.float64) for a, n in zip(arrays, counts)) / total
    ref_c = np.round(sum(np.float64(n) * i.astype(np.float64) for i, n in zip(ints, counts)) / total)
    np.testing.assert_allclose(out["w"].numpy(), ref_w, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(out["c"].numpy(), ref_c.astype(np.int64))
    # the mean lies inside the range of the inputs
    stacked = np.stack(arrays).astype(np.float64)
    assert np.all(out["w"].numpy() >= stacked.min(axis=0) - 1e-4)
    assert np.all(out["w"].numpy() <= stacked.max(axis=0) + 1e-4)


@settings(max_examples=40, deadline=None)
@given(float_updates(), st.sampled_from([torch.float16, torch.float32, torch.float64]))
def test_property_dtype_and_shape_preserved(data, dtype):
    arrays, ints, counts = data
    updates = [(OrderedDict(w=u["w"].to(dtype), c=u["c"]), n) for u, n in _to_updates(arrays, ints, counts)]
    out = fedavg(updates)
    assert out["w"].dtype == dtype and out["c"].dtype == torch.int64
    assert out["w"].shape == torch.Size(arrays[0].shape) and out["c"].shape == torch.Size(arrays[0].shape)
    assert bool(torch.isfinite(out["w"]).all())


@settings(max_examples=40, deadline=None)
@given(float_updates(), st.randoms(use_true_random=False))
def test_property_permutation_invariant(data, rnd):
    arrays, ints, counts = data
    updates = _to_updates(arrays, ints, counts)
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    a, b = fedavg(updates), fedavg(shuffled)
    torch.testing.assert_close(a["w"], b["w"], rtol=1e-6, atol=1e-4)
    # integer results may only differ where the float64 mean sits on a .5 boundary; never by more than 1
    assert int((a["c"] - b["c"]).abs().max()) <= 1


def test_the_accumulator_refuses_a_weight_that_is_not_finite_and_positive_and_an_empty_result():
    from fedrest.aggregation.fedavg import FedAvgAccumulator

    acc = FedAvgAccumulator(OrderedDict(w=torch.zeros(1)))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=f"^a FedAvg weight must be a finite number > 0, got {bad!r}$"):
            acc.add_weighted(OrderedDict(w=torch.ones(1)), bad)
    with pytest.raises(ValueError, match="^FedAvg of zero updates$"):
        acc.result()
    acc.add_weighted(OrderedDict(w=torch.ones(1)), 0.25)
    assert acc.result()["w"].item() == 1.0
