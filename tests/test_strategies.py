"""Strategies beyond FedAvg (fedrest.aggregation.strategy, .server_optimizers, .weights): each update rule against
values computed by hand on tiny tensors (one step and two), integer buffers kept integer, the bound on one node's
share, FedProx's proximal term in local training, and the server state committed with each round (a coordinator
restarted in the middle of aggregation ends with the same bits as one that was not)."""

from __future__ import annotations

import math
import sqlite3
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from config import Config
from fedrest.aggregation import ClientUpdate, ServerOptimizer, aggregate, capped_weights, make_strategy
from fedrest.server.store import StoreError
from fedrest.tasks import TaskError
from fedrest.tasks.data import TensorData
from fedrest.training import fit
from conftest import filled_state_dict, post_update, register

X0 = OrderedDict(w=torch.tensor([1.0, 2.0]), running_var=torch.tensor([1.0]), n=torch.tensor(4))
ROUND1 = OrderedDict(w=torch.tensor([1.5, 1.0]), running_var=torch.tensor([0.5]), n=torch.tensor(7))
ROUND2 = OrderedDict(w=torch.tensor([2.0, 1.0]), running_var=torch.tensor([0.25]), n=torch.tensor(9))
PARAMS = {"w"}  # running_var and n are buffers


def two_steps(optimizer: ServerOptimizer):
    x1, s1 = optimizer.step(X0, ROUND1, {}, PARAMS)
    x2, s2 = optimizer.step(x1, ROUND2, s1, PARAMS)
    return x1, s1, x2, s2


# ----------------------------------------------------------------------------- server optimizers by hand


def test_fedavgm_one_and_two_steps_by_hand():
    x1, s1, x2, s2 = two_steps(ServerOptimizer("fedavgm", 1.0, momentum=0.9))
    # round 1: Delta = [0.5, -1.0]; v = Delta; x = x0 + v = [1.5, 1.0]
    assert x1["w"].tolist() == [1.5, 1.0] and s1["velocity/w"].tolist() == [0.5, -1.0]
    # round 2: Delta = [2.0 - 1.5, 1.0 - 1.0] = [0.5, 0]; v = 0.9 * [0.5, -1] + [0.5, 0] = [0.95, -0.9]
    assert s2["velocity/w"].tolist() == pytest.approx([0.95, -0.9], abs=1e-15)
    assert x2["w"].tolist() == pytest.approx([2.45, 0.1], abs=1e-7)  # x1 + v, float32


def test_fedavgm_with_no_momentum_and_rate_one_is_fedavg_bit_for_bit():
    torch.manual_seed(0)
    reference = OrderedDict(w=torch.randn(50), b=torch.randn(3, 3))
    combined = OrderedDict((k, v + torch.randn_like(v)) for k, v in reference.items())
    out, _ = ServerOptimizer("fedavgm", 1.0, momentum=0.0).step(reference, combined, {})
    assert all(torch.equal(out[k], combined[k]) for k in reference)


def adaptive_by_hand(name: str, eta: float, beta1: float, beta2: float, tau: float) -> tuple[list, list]:
    """x after rounds 1 and 2 of Reddi et al.'s Algorithm 2, one coordinate at a time in plain Python floats."""
    x, m, v = [1.0, 2.0], [0.0, 0.0], [tau ** 2, tau ** 2]
    out = []
    for combined in ([1.5, 1.0], [2.0, 1.0]):
        for i in range(2):
            delta = combined[i] - x[i]
            m[i] = beta1 * m[i] + (1 - beta1) * delta
            if name == "fedadagrad":
                v[i] = v[i] + delta ** 2
            elif name == "fedadam":
                v[i] = beta2 * v[i] + (1 - beta2) * delta ** 2
            else:
                v[i] = v[i] - (1 - beta2) * delta ** 2 * math.copysign(1.0, v[i] - delta ** 2)
            x[i] = float(torch.tensor(x[i] + eta * m[i] / (math.sqrt(v[i]) + tau), dtype=torch.float32))
        out.append(list(x))
    return out[0], out[1]


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_optimizers_one_and_two_steps_by_hand(name):
    x1, s1, x2, s2 = two_steps(ServerOptimizer(name, 0.1, beta1=0.9, beta2=0.99, tau=0.01))
    want1, want2 = adaptive_by_hand(name, 0.1, 0.9, 0.99, 0.01)
    assert x1["w"].tolist() == want1 and x2["w"].tolist() == want2
    # the first step is eta * (1 - beta1) * Delta / (sqrt(v) + tau) whatever the rule for v: for coordinate 0 of
    # fedadam, v = 0.99 * 1e-4 + 0.01 * 0.25 = 0.002599 and x = 1 + 0.1 * 0.05 / (0.0509804 + 0.01) = 1.0819945
    if name == "fedadam":
        assert x1["w"][0].item() == pytest.approx(1.0819945, abs=1e-6)
        assert s1["v/w"][0].item() == pytest.approx(0.002599, abs=1e-12)
    assert s2["m/w"].dtype == torch.float64 and set(s2) == {"m/w", "v/w"}


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_buffers_take_the_combined_value_and_integers_stay_integers(name):
    x1, _, x2, _ = two_steps(ServerOptimizer(name))
    assert (x1["n"].dtype, x1["n"].item(), x2["n"].item()) == (torch.int64, 7, 9)
    assert (x1["running_var"].item(), x2["running_var"].item()) == (0.5, 0.25)  # never stepped (nor negative)
    assert x2["w"].dtype == torch.float32


def test_a_step_changes_neither_its_inputs_nor_the_strategy_state():
    strategy = make_strategy(Config(strategy="fedadam"), PARAMS)
    before = {k: v.clone() for k, v in X0.items()}
    result = strategy.aggregate([ClientUpdate.of("a", ROUND1, 3)], X0)
    assert strategy.state == {} and set(result.server_state) == {"m/w", "v/w"}
    assert all(torch.equal(X0[k], before[k]) for k in X0)


def test_optimizer_settings_out_of_range_are_refused():
    for kwargs in ({"momentum": 1.0}, {"beta1": -0.1}, {"tau": 0.0}):
        with pytest.raises(ValueError):
            ServerOptimizer("fedadam", **kwargs)
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("fedsgd")


# ----------------------------------------------------------------------------- bounded influence


def test_a_node_claiming_a_billion_samples_takes_at_most_max_share():
    assert capped_weights([1e9, 100, 100], 0.5) == [200.0, 100.0, 100.0]  # shares 0.5, 0.25, 0.25
    ref = OrderedDict(w=torch.zeros(1))
    updates = [("attacker", OrderedDict(w=torch.tensor([1000.0])), 10**9),
               ("h1", OrderedDict(w=torch.tensor([1.0])), 100), ("h2", OrderedDict(w=torch.tensor([3.0])), 100)]
    assert aggregate(updates, ref, "fedavg", max_share=0.5)["w"].item() == pytest.approx(0.5 * 1000 + 0.25 * 4)
    unbounded = aggregate(updates, ref, "fedavg")["w"].item()
    assert unbounded == pytest.approx((1000 * 10**9 + 400) / (10**9 + 200))  # what the bound prevents


def test_weights_under_the_bound_are_unchanged_and_an_impossible_bound_gives_equal_shares():
    assert capped_weights([10, 20, 30], 0.5) == [10.0, 20.0, 30.0]
    assert capped_weights([10, 30], 0.5) == [10.0, 10.0]  # two updates: 0.5 each at most
    assert capped_weights([5, 1, 1, 1], 0.2) == [1.0, 1.0, 1.0, 1.0]  # 0.2 * 4 < 1: equal shares
    with pytest.raises(ValueError):
        capped_weights([1, 0], 0.5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10**9), min_size=1, max_size=12), st.floats(0.05, 1.0))
def test_capped_weights_meet_the_bound_and_keep_the_order(weights, share):
    capped = capped_weights(weights, share)
    total = sum(capped)
    if share * len(weights) > 1:
        assert max(capped) <= share * total * (1 + 1e-9)
    else:
        assert len(set(capped)) == 1
    assert all(c <= w for c, w in zip(capped, weights))
    assert all((a <= b) == (ca <= cb) or ca == cb for a, ca in zip(weights, capped) for b, cb in zip(weights, capped))


def test_the_coordinator_bounds_a_node_that_registered_a_billion_samples(make_app):
    app = make_app(min_nodes_to_start=3)
    client, fed = app.test_client(), app.extensions["federation"]
    nodes = [register(client, "big", num_samples=10**9), register(client, "h1", num_samples=100),
             register(client, "h2", num_samples=100)]
    fed.tick()
    for node, value, n in zip(nodes, (5.0, 1.0, 3.0), (10**9, 100, 100)):
        assert post_update(client, node, 1, filled_state_dict(value, 1), {"num_samples": n}).status_code == 202
    fed.tick()
    assert fed.global_state["fc2.weight"].flatten()[0].item() == pytest.approx(3.5)  # 0.5 * 5 + 0.25 * (1 + 3)


# ----------------------------------------------------------------------------- FedProx


def test_fedprox_adds_mu_times_the_distance_from_the_global_model_to_each_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    start = nn.Linear(3, 2)
    trained = nn.Linear(3, 2)
    trained.load_state_dict(start.state_dict())
    fit(trained, TensorData(x, y), epochs=1, batch_size=4, learning_rate=0.5, momentum=0.0, proximal_mu=2.0)

    # by hand: two SGD steps on the two batches of the same shuffle, the second with the proximal gradient
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    w = [p.detach().clone().requires_grad_(True) for p in start.parameters()]
    anchor = [p.detach().clone() for p in start.parameters()]
    for batch in (order[:4], order[4:]):
        loss = nn.functional.cross_entropy(x[batch] @ w[0].T + w[1], y[batch])
        grads = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w = [(p - 0.5 * (g + 2.0 * (p - a))).requires_grad_(True) for p, g, a in zip(w, grads, anchor)]
    for got, want in zip(trained.parameters(), w):
        assert torch.allclose(got, want, atol=1e-6)
    plain = nn.Linear(3, 2)
    plain.load_state_dict(start.state_dict())
    fit(plain, TensorData(x, y), epochs=1, batch_size=4, learning_rate=0.5, momentum=0.0)
    assert not torch.allclose(plain.weight, trained.weight, atol=1e-4)  # the term changed the second step


def test_fedprox_mu_reaches_the_workers_with_the_round(make_app):
    app = make_app(strategy="fedprox", proximal_mu=0.25)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, "a")
    fed.tick()
    task = client.get("/api/v1/task", headers={"Authorization": f"Bearer {node['node_token']}"}).get_json()
    assert task["settings"]["strategy"] == "fedprox" and task["settings"]["proximal_mu"] == 0.25
    status = fed.snapshot()
    assert status.strategy == {"strategy": "fedprox", "aggregation": "fedavg", "proximal_mu": 0.25}


# ----------------------------------------------------------------------------- server state is part of the run


def run_rounds(make_app, rounds: range, crash_in: int | None = None, monkeypatch=None, **config):
    """Rounds of a fedadam run with three nodes uploading fixed values; optionally crash just before the commit
    of round ``crash_in`` (then restart and go on). Returns the last federation."""
    settings_ = dict(strategy="fedadam", min_nodes_to_start=3, communication_rounds=max(rounds), **config)
    app = make_app(**settings_)
    client, fed = app.test_client(), app.extensions["federation"]
    names = ("a", "b", "c")
    nodes = {n: register(client, n, num_samples=10 * (i + 1)) for i, n in enumerate(names)}
    for number in rounds:
        fed.tick()
        for i, name in enumerate(names):
            value = 0.1 * number + 0.05 * i - 0.02 * number * i
            post_update(client, nodes[name], number, filled_state_dict(value, number, fed.global_state),
                        {"num_samples": 10 * (i + 1)})
        if number == crash_in:
            original = fed.store.finish_round

            def crash(*args, **kwargs):
                raise KeyboardInterrupt("kill -9 before the round's commit")

            monkeypatch.setattr(fed.store, "finish_round", crash)
            with pytest.raises(KeyboardInterrupt):
                fed.tick()
            monkeypatch.setattr(fed.store, "finish_round", original)
            app = make_app(**settings_)
            client, fed = app.test_client(), app.extensions["federation"]
            assert fed.phase.value == "aggregating" and fed.model_version == number - 1
        fed.tick()
        assert fed.model_version == number
    return fed


def test_fedadam_restarted_before_a_commit_ends_bit_identical(tmp_path, make_app, monkeypatch):
    straight = run_rounds(make_app, range(1, 4))
    straight_bytes, straight_state = straight.global_bytes, dict(straight.strategy.state)
    straight.stop()
    for path in (tmp_path / "temp", tmp_path / "models"):  # a second run in the same directories
        for file in sorted(path.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
    resumed = run_rounds(make_app, range(1, 4), crash_in=2, monkeypatch=monkeypatch)
    assert resumed.global_bytes == straight_bytes
    assert set(resumed.strategy.state) == set(straight_state)
    assert all(torch.equal(resumed.strategy.state[k], straight_state[k]) for k in straight_state)
    stored = sorted(p.name for p in (tmp_path / "temp" / "global").glob("*.pt"))
    assert stored == ["model_v3.pt", "server_state_v3.pt"]


def test_a_damaged_server_state_file_stops_the_resume_with_one_clear_line(tmp_path, make_app):
    fed = run_rounds(make_app, range(1, 2))
    fed.stop()
    path = tmp_path / "temp" / "global" / "server_state_v1.pt"
    path.write_bytes(b"not a state")
    with pytest.raises(StoreError) as refused:
        make_app(strategy="fedadam", min_nodes_to_start=3, communication_rounds=1)
    message = str(refused.value)
    assert message.startswith(f"cannot resume run {fed.run_id}: the server state of version 1 ({path}) is "
                              "unreadable: ")
    assert message.endswith(". Start with --fresh for a new run.")
    db = sqlite3.connect(Path(tmp_path / "temp" / "coordinator.sqlite3"))
    assert dict(db.execute("SELECT key, value FROM run").fetchall())["model_version"] == "1"
    db.close()


# ----------------------------------------------------------------------------- a task's own strategy

OWN_STRATEGY_TASK = '''
import torch
from torch import nn
from fedrest.aggregation import Strategy, make_strategy


def build_model():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


class HalfStep(Strategy):
    """Moves the global model half of the way to FedAvg's result (and counts the rounds in its state)."""

    def aggregate(self, updates, reference, num_clients=1, noise_seed=0):
        result = super().aggregate(updates, reference, num_clients, noise_seed)
        result.state_dict = {k: (reference[k] + v) / 2 for k, v in result.state_dict.items()}
        result.server_state = {"rounds": self.state.get("rounds", torch.tensor(0)) + 1}
        return result

    @property
    def has_state(self):
        return True


def strategy(config, parameter_keys):
    base = make_strategy(config, parameter_keys)
    return HalfStep("half_step", base.combiner, parameter_keys=parameter_keys)
'''


def test_a_task_file_may_bring_its_own_strategy(tmp_path, make_app):
    task_file = tmp_path / "half_step_task.py"
    task_file.write_text(OWN_STRATEGY_TASK)
    app = make_app(task=str(task_file), max_share=1.0)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, "a", num_samples=10)
    start = {k: v.clone() for k, v in fed.global_state.items()}
    fed.tick()
    target = OrderedDict((k, torch.full_like(v, 1.0)) for k, v in start.items())
    assert post_update(client, node, 1, target, {"num_samples": 10}).status_code == 202
    fed.tick()
    assert fed.model_version == 1
    for key, value in fed.global_state.items():
        assert torch.allclose(value, (start[key] + 1.0) / 2)
    assert fed.strategy.state == {"rounds": torch.tensor(1)}
    assert fed.snapshot().strategy["strategy"] == "half_step"
    assert (Path(fed.config.temp_dir) / "global" / "server_state_v1.pt").exists()


def test_a_task_strategy_without_the_interface_is_one_clear_error(tmp_path, make_app):
    task_file = tmp_path / "bad_strategy_task.py"
    task_file.write_text("from torch import nn\n\ndef build_model():\n    return nn.Linear(3, 2)\n\n"
                         "def strategy(config, parameter_keys):\n    return object()\n")
    with pytest.raises(TaskError, match="returned an object without aggregate, state.*subclass"):
        make_app(task=str(task_file))


def test_each_strategy_describes_its_own_settings_for_the_status():
    def described(**settings):
        return make_strategy(Config(**settings)).describe()

    assert described(strategy="fedavgm", server_learning_rate=0.5, server_momentum=0.8) == {
        "strategy": "fedavgm", "aggregation": "fedavg", "server_learning_rate": 0.5, "server_momentum": 0.8}
    assert described(strategy="fedyogi", server_learning_rate=0.02, beta1=0.8, beta2=0.95, tau=0.01) == {
        "strategy": "fedyogi", "aggregation": "fedavg", "server_learning_rate": 0.02, "beta1": 0.8, "beta2": 0.95,
        "tau": 0.01}
    assert described(strategy="fedprox", proximal_mu=0.1) == {"strategy": "fedprox", "aggregation": "fedavg",
                                                              "proximal_mu": 0.1}
    assert described(clip_norm=1.0, dp_noise_multiplier=1.0) == {"strategy": "fedavg", "aggregation": "dp_fedavg"}


def test_fedyogi_leaves_v_alone_when_it_equals_the_squared_change():
    """Yogi's v - (1 - beta2) * Delta^2 * sign(v - Delta^2) (Reddi et al. 2021, Algorithm 2): sign(0) = 0, so a
    change of exactly tau in the first round keeps v = tau^2."""
    optimizer = ServerOptimizer("fedyogi", 0.1, beta1=0.9, beta2=0.99, tau=0.5)
    out, state = optimizer.step(OrderedDict(w=torch.tensor([1.0])), OrderedDict(w=torch.tensor([1.5])), {})
    assert state["v/w"].item() == 0.25
    assert out["w"].item() == pytest.approx(1.0 + 0.1 * (0.1 * 0.5) / (0.5 + 0.5))


def test_capped_weights_at_the_edges_of_the_bound():
    from fedrest.aggregation.weights import capped_weights

    assert capped_weights([1, 1], 0.5) == [1.0, 1.0]  # each exactly at the bound: unchanged
    assert capped_weights([3, 1], 0.75) == [3.0, 1.0]
    assert capped_weights([4, 1, 1], 1 / 3) == [1.0, 1.0, 1.0]  # max_share * m = 1: equal shares
    assert capped_weights([5, 1], 1.0) == [5.0, 1.0]
    for weights, share, message in (([], 0.5, "no weights"), ([1], 0.0, r"max_share must be in \(0, 1\], got 0.0"),
                                    ([1], 1.5, r"max_share must be in \(0, 1\], got 1.5"),
                                    ([1, 0], 0.5, r"weights must be finite numbers > 0, got \[1, 0\]")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            capped_weights(weights, share)
