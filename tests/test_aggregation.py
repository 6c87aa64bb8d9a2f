"""Property tests of the aggregation strategies and rules (fedrest.aggregation) with hypothesis, plus the rules
inside a round. ``aggregate`` runs the same Strategy.aggregate path as the coordinator."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedrest.aggregation
from config import AGGREGATIONS, STRATEGIES, Config
from fedrest.aggregation import (aggregate, clip_update, coordinate_median, delta_norm, make_combiner,
                                 make_strategy, trimmed_mean)
from fedrest.aggregation.combine import COMBINERS
from fedrest.serialization import UpdateRejected
from conftest import API, MONITOR, filled_state_dict, post_update, register

WIDTH = 5  # coordinates of the float32 vector
finite32 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
finite64 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


def make_sd(vec32, mat64, count) -> OrderedDict:
    return OrderedDict(w=torch.tensor(vec32, dtype=torch.float32),
                       m=torch.tensor(mat64, dtype=torch.float64).reshape(2, 2),
                       n=torch.tensor(count, dtype=torch.int64))


state_dicts = st.builds(make_sd, st.lists(finite32, min_size=WIDTH, max_size=WIDTH),
                        st.lists(finite64, min_size=4, max_size=4), st.integers(0, 10**6))
weighted = st.lists(st.tuples(state_dicts, st.integers(1, 10**6)), min_size=1, max_size=7).map(
    lambda pairs: [(f"node{i:02d}", sd, n) for i, (sd, n) in enumerate(pairs)])  # (node id, state_dict, n_k)
REFERENCE = make_sd([0.0] * WIDTH, [0.0] * 4, 0)


@settings(max_examples=150, deadline=None)
@given(weighted)
def test_fedavg_matches_a_float64_reference(updates):
    out = aggregate(updates, REFERENCE, "fedavg")
    weights = np.array([n for _, _, n in updates], dtype=np.float64)
    for key in ("w", "m", "n"):
        stacked = np.stack([sd[key].numpy().astype(np.float64) for _, sd, _ in updates])
        expected = np.tensordot(weights, stacked, axes=1) / weights.sum()
        got = out[key].numpy()
        if key == "n":  # integers: the mean rounded half to even (a float64 tie can sit one ulp away)
            assert abs(int(got) - float(expected)) <= 0.5 + 1e-9
        elif key == "w":  # float32: the float64 mean, rounded once
            np.testing.assert_allclose(got, expected.astype(np.float32), rtol=2 ** -22, atol=1e-30)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300)


@settings(max_examples=100, deadline=None)
@given(weighted, st.randoms(use_true_random=False), st.sampled_from(AGGREGATIONS), st.sampled_from([0.0, 1.0, 1e5]))
def test_result_is_bit_identical_under_any_order_of_the_updates(updates, rnd, rule, clip):
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    first = aggregate(updates, REFERENCE, rule, trim_fraction=0.2, clip_norm=clip)
    second = aggregate(shuffled, REFERENCE, rule, trim_fraction=0.2, clip_norm=clip)
    for key in REFERENCE:
        assert torch.equal(first[key], second[key]), key
        assert first[key].dtype == REFERENCE[key].dtype and first[key].shape == REFERENCE[key].shape


@settings(max_examples=150, deadline=None)
@given(st.lists(state_dicts, min_size=1, max_size=6), st.lists(state_dicts, max_size=5),
       st.sampled_from(["median", "trimmed_mean"]), st.floats(-1e30, 1e30))
def test_robust_rules_stay_within_the_honest_values(honest, hostile, rule, huge):
    for sd in hostile:  # the attacker's coordinates: anything finite, here pushed far out
        sd["w"] = torch.full_like(sd["w"], huge)
        sd["m"] = torch.full_like(sd["m"], -huge)
    if rule == "median":  # tolerated: fewer hostile than honest updates
        hostile = hostile[:len(honest) - 1]
    beta = 0.45
    if rule == "trimmed_mean":
        while hostile and len(hostile) > math.floor(beta * (len(honest) + len(hostile))):
            hostile = hostile[:-1]
    updates = honest + hostile
    out = (coordinate_median(updates, REFERENCE) if rule == "median"
           else trimmed_mean(updates, REFERENCE, beta))
    for key in ("w", "m"):
        stacked = torch.stack([sd[key].double() for sd in honest])
        low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
        assert bool((out[key].double() >= low).all()) and bool((out[key].double() <= high).all()), key


@settings(max_examples=100, deadline=None)
@given(state_dicts, st.floats(1e-3, 1e7))
def test_clipping_bounds_the_change_and_keeps_its_direction(update, max_norm):
    clipped, scale = clip_update(update, REFERENCE, max_norm)
    norm = delta_norm(update, REFERENCE)
    assert 0 < scale <= 1
    if norm <= max_norm:
        assert scale == 1.0 and all(torch.equal(clipped[k], update[k]) for k in update)
    else:
        assert delta_norm(clipped, REFERENCE) <= max_norm * (1 + 1e-6) + 1e-6  # float32 rounding of w
        assert math.isclose(scale, max_norm / norm)
        assert torch.equal(clipped["n"], update["n"])  # integer buffers are not clipped


def test_hand_computed_values_of_each_rule():
    values = [1.0, 2.0, 100.0, 4.0]
    updates = [(f"n{i}", OrderedDict(w=torch.tensor([v])), 1) for i, v in enumerate(values)]
    reference = OrderedDict(w=torch.tensor([0.0]))
    assert aggregate(updates, reference, "median")["w"].item() == 3.0  # (2 + 4) / 2
    assert aggregate(updates, reference, "trimmed_mean", trim_fraction=0.25)["w"].item() == 3.0  # drop 1 and 100
    assert aggregate(updates, reference, "fedavg")["w"].item() == pytest.approx(26.75)
    clipped = aggregate(updates, reference, "fedavg", clip_norm=2.0)["w"].item()  # 1, 2, 2, 2
    assert clipped == pytest.approx(1.75)
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        aggregate(updates, reference, "mean")


# ----------------------------------------------------------------------------- inside a round


@pytest.mark.parametrize("rule, expected", [("median", 3.0), ("trimmed_mean", 3.0), ("fedavg", 26.75)])
def test_the_coordinator_aggregates_with_the_configured_rule(make_app, rule, expected):
    app = make_app(min_nodes_to_start=4, aggregation=rule, trim_fraction=0.25, max_update_norm=0)
    client, fed = app.test_client(), app.extensions["federation"]
    nodes = [register(client, f"n{i}") for i in range(4)]
    fed.tick()
    for node, value in zip(nodes, [1.0, 2.0, 100.0, 4.0]):
        response = post_update(client, node, 1, filled_state_dict(value, 1), {"num_samples": 10})
        assert response.status_code == 202, response.get_json()
    fed.tick()
    weight = fed.global_state["fc1.weight"]
    assert weight.dtype == torch.float32 and torch.all(weight == torch.tensor(expected, dtype=torch.float32))


def test_an_absurdly_large_change_is_refused_counted_and_changes_nothing(make_app):
    app = make_app(min_nodes_to_start=1, max_update_norm=1e3)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, "attacker")
    fed.tick()
    before = client.get(f"{API}/status", headers=MONITOR).get_json()
    response = post_update(client, node, 1, filled_state_dict(1e6, 1), {"num_samples": 10})
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == "update_norm_too_large" and "MAX_UPDATE_NORM=1000" in body["message"]
    after = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert after["updates_refused_total"] == {"update_norm_too_large": 1}
    assert after["current_round"]["updates_received"] == before["current_round"]["updates_received"] == 0
    assert not list(fed.spool.directory.glob("round_1/*.pt"))


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_every_configurable_rule_builds_its_combiner(name):
    assert make_combiner(name).name == name


def test_the_configurable_names_are_the_implemented_ones():
    assert set(AGGREGATIONS) == set(COMBINERS)
    assert set(STRATEGIES) == set(fedrest.aggregation.STRATEGIES)
    for name in STRATEGIES:
        rule = "fedavg" if name == "scaffold" else "median"  # scaffold averages (refused with the others)
        strategy = make_strategy(Config(strategy=name, aggregation=rule))
        assert (strategy.name, strategy.combiner.name) == (name, rule)


def test_two_updates_with_one_key_are_refused():
    sd = make_sd([1.0] * WIDTH, [0.0] * 4, 0)
    with pytest.raises(ValueError, match="share a key"):
        aggregate([("a", sd, 1), ("a", sd, 2)], REFERENCE, "fedavg")


def test_clipping_by_hand_around_a_reference_that_is_not_zero_computed_in_float64():
    """The change u - r, not u, is scaled (r = 5.2754..., u = -4.8986..., S = 0.7), in float64 and then rounded
    once to float32 (rounding each float32 step gives 4.5754919 instead)."""
    reference = OrderedDict(w=torch.tensor([5.275492191314697]), n=torch.tensor(3))
    update = OrderedDict(w=torch.tensor([-4.898619651794434]), n=torch.tensor(9))
    clipped, scale = clip_update(update, reference, 0.7)
    change = -4.898619651794434 - 5.275492191314697
    assert scale == 0.7 / abs(change)
    assert clipped["w"].dtype == torch.float32 and clipped["w"].item() == 4.5754923820495605
    assert clipped["w"].item() == pytest.approx(5.275492191314697 - 0.7)
    assert clipped["n"].item() == 9  # integer buffers keep the update's value
    for within in (abs(change) * 2, delta_norm(update, reference)):  # at the norm itself too: not scaled, not copied
        same, one = clip_update(update, reference, within)
        assert one == 1.0 and same["w"] is update["w"]
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"max_norm must be > 0, got {bad}"):
            clip_update(update, reference, bad)


def test_a_rule_over_no_update_is_refused():
    from fedrest.aggregation.fedavg import fedavg

    with pytest.raises(ValueError, match="^FedAvg of zero updates$"):
        fedavg([], OrderedDict(w=torch.zeros(1)))
    with pytest.raises(ValueError, match="^median of zero updates$"):
        coordinate_median([], OrderedDict(w=torch.zeros(1)))


def test_the_aggregate_helper_defaults_to_fedavg_and_a_tenth_trimmed_and_checks_each_update():
    reference = OrderedDict(w=torch.tensor([0.0]))
    updates = [(f"n{i}", OrderedDict(w=torch.tensor([float(v)])), 1) for i, v in enumerate(range(1, 10))]
    updates.append(("n9", OrderedDict(w=torch.tensor([1000.0])), 1))
    assert aggregate(updates[:2], reference)["w"].item() == 1.5  # FedAvg by default
    assert aggregate(updates, reference, "trimmed_mean")["w"].item() == pytest.approx(5.5)  # 1 cut at each end
    with pytest.raises(ValueError, match="^median of zero updates$"):
        aggregate([], reference, "median")
    for bad in (0, True, 2.5, "3"):
        with pytest.raises(UpdateRejected, match=f"num_samples must be an integer >= 1, got "
                                                                      f"{bad!r}"):
            aggregate([("a", OrderedDict(w=torch.tensor([1.0])), bad)], reference)
