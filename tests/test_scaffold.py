"""SCAFFOLD (fedrest.aggregation.scaffold, the worker's control variate on its disk, the coordinator's global one):
the update rules against values computed by hand, the corrected gradient in local training, the upload of the
control-variate change and the refusals around it, and the worker's file across restarts."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from config import Config, ConfigError
from fedrest.aggregation import ClientUpdate, make_strategy, scaffold
from fedrest.local_control import LocalControlVariate
from fedrest.serialization import bytes_to_state_dict, state_dict_to_bytes
from fedrest.tasks import TaskError
from fedrest.tasks.data import TensorData
from fedrest.training import fit
from conftest import filled_state_dict, post_update, register
from model import SimpleCNN

API = "/api/v1"
TASKS = Path(__file__).parent / "tasks"
ROOT = Path(__file__).parent.parent


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- the rules by hand


def test_the_local_control_variate_of_option_two_by_hand_one_and_two_rounds():
    # round 1: c_i = [0.1, -0.2], c = [0.3, 0], x = [1, 2], y = [0.8, 2.1], K = 4, eta = 0.05: 1/(K eta) = 5
    new, change = scaffold.next_local_control({"w": t(0.1, -0.2)}, {"w": t(0.3, 0.0)}, {"w": t(1.0, 2.0)},
                                              {"w": t(0.8, 2.1)}, steps=4, learning_rate=0.05)
    assert new["w"].tolist() == pytest.approx([0.1 - 0.3 + 0.2 * 5, -0.2 - 0.0 - 0.1 * 5], abs=1e-6)  # [0.8, -0.7]
    assert change["w"].tolist() == pytest.approx([0.7, -0.5], abs=1e-6)
    # round 2 from c_i = [0.8, -0.7], c = [0.5, 0.25], x = [0.9, 2.0], y = [1.0, 1.5], K = 2, eta = 0.1: 1/(K eta) = 5
    new2, change2 = scaffold.next_local_control(new, {"w": t(0.5, 0.25)}, {"w": t(0.9, 2.0)}, {"w": t(1.0, 1.5)},
                                                steps=2, learning_rate=0.1)
    assert new2["w"].tolist() == pytest.approx([0.8 - 0.5 - 0.1 * 5, -0.7 - 0.25 + 0.5 * 5], abs=1e-6)
    assert change2["w"].tolist() == pytest.approx([-0.5 - 0.1 * 5, -0.25 + 0.5 * 5], abs=1e-6)  # -c + (x - y)/(K eta)
    assert new2["w"].dtype == torch.float32


def test_local_momentum_scales_the_distance_by_one_minus_beta():
    new, change = scaffold.next_local_control({"w": t(0.1)}, {"w": t(0.3)}, {"w": t(1.0)}, {"w": t(0.8)},
                                              steps=4, learning_rate=0.05, momentum=0.9)
    assert new["w"].item() == pytest.approx(0.1 - 0.3 + 0.2 * (1 - 0.9) * 5, abs=1e-6)  # -0.1
    assert change["w"].item() == pytest.approx(-0.2, abs=1e-6)
    with pytest.raises(ValueError, match="steps >= 1"):
        scaffold.next_local_control({"w": t(0.1)}, {"w": t(0.3)}, {"w": t(1.0)}, {"w": t(0.8)}, steps=0,
                                    learning_rate=0.05)


@pytest.mark.parametrize("steps, learning_rate, momentum", [(0, 0.05, 0.0), (4, 0.0, 0.0), (4, -0.1, 0.0),
                                                            (4, 0.05, 1.0), (4, 0.05, -0.1)])
def test_local_control_refuses_each_bad_setting_alone(steps, learning_rate, momentum):
    with pytest.raises(ValueError, match="need steps >= 1, learning_rate > 0 and momentum in \\[0, 1\\)"):
        scaffold.next_local_control({"w": t(0.1)}, {"w": t(0.3)}, {"w": t(1.0)}, {"w": t(0.8)}, steps=steps,
                                    learning_rate=learning_rate, momentum=momentum)


def test_local_control_at_the_edges_of_its_settings_one_step_and_momentum_just_below_one():
    new, _ = scaffold.next_local_control({"w": t(0.0)}, {"w": t(0.0)}, {"w": t(1.0)}, {"w": t(0.5)}, steps=1,
                                         learning_rate=0.5)
    assert new["w"].item() == pytest.approx(1.0)  # (x - y) / (K eta) = 0.5 / 0.5
    new, _ = scaffold.next_local_control({"w": t(0.0)}, {"w": t(0.0)}, {"w": t(1.0)}, {"w": t(0.5)}, steps=1,
                                         learning_rate=0.5, momentum=0.75)
    assert new["w"].item() == pytest.approx(0.25)


def test_the_rules_answer_in_the_dtypes_of_the_control_variates_they_are_given():
    half = {"w": torch.tensor([0.5, 0.25], dtype=torch.float16)}
    assert scaffold.gradient_correction(half, {"w": t(0.25, 0.0)})["w"].dtype == torch.float16
    new, change = scaffold.next_local_control(half, {"w": t(0.0, 0.0)}, {"w": t(1.0, 1.0)}, {"w": t(1.0, 1.0)},
                                              steps=1, learning_rate=0.1)
    assert (new["w"].dtype, change["w"].dtype) == (torch.float16, torch.float16)
    assert change["w"].tolist() == [0.0, 0.0]


def test_the_global_control_variate_moves_by_the_sum_of_changes_over_n_by_hand():
    c0 = {"w": torch.zeros(2, dtype=torch.float64)}
    c1 = scaffold.next_global_control(c0, [{"w": t(0.7, -0.5)}, {"w": t(0.1, 0.3)}], num_clients=4)
    assert c1["w"].tolist() == pytest.approx([0.2, -0.05], abs=1e-7) and c1["w"].dtype == torch.float64
    c2 = scaffold.next_global_control(c1, [{"w": t(0.4, 0.4)}], num_clients=4)
    assert c2["w"].tolist() == pytest.approx([0.3, 0.05], abs=1e-7)
    assert c0["w"].tolist() == [0.0, 0.0]  # nothing given is changed
    assert scaffold.gradient_correction({"w": t(0.3, 0.0)}, {"w": t(0.1, -0.2)})["w"].tolist() == pytest.approx(
        [0.2, 0.2], abs=1e-7)


def test_the_strategy_averages_models_and_keeps_c_for_parameters_only():
    reference = OrderedDict(w=t(1.0, 2.0), running_var=t(1.0), n=torch.tensor(4))
    strategy = make_strategy(Config(strategy="scaffold", max_share=1.0), parameter_keys={"w"})
    updates = [ClientUpdate.of("a", OrderedDict(w=t(2.0, 2.0), running_var=t(0.5), n=torch.tensor(6)), 1,
                               {"w": t(0.6, -0.3)}),
               ClientUpdate.of("b", OrderedDict(w=t(4.0, 0.0), running_var=t(0.25), n=torch.tensor(8)), 3,
                               {"w": t(0.3, 0.9)})]
    result = strategy.aggregate(updates, reference, num_clients=3)
    assert result.state_dict["w"].tolist() == pytest.approx([3.5, 0.5])  # (2 + 3 * 4) / 4, (2 + 0) / 4
    assert set(result.server_state) == {"c/w"}
    assert result.server_state["c/w"].tolist() == pytest.approx([0.3, 0.2], abs=1e-7)  # (0.6 + 0.3) / 3, 0.6 / 3
    assert strategy.state == {} and strategy.has_state
    strategy.state = result.server_state
    assert strategy.control_variate(reference)["w"].dtype == torch.float32
    second = strategy.aggregate([updates[0]], result.state_dict, num_clients=3)
    assert second.server_state["c/w"].tolist() == pytest.approx([0.5, 0.1], abs=1e-7)


def test_an_update_whose_control_change_is_missing_or_unreadable_counts_as_zero_and_the_others_still_count():
    reference = OrderedDict(w=t(1.0, 2.0))
    strategy = make_strategy(Config(strategy="scaffold", max_share=1.0), parameter_keys={"w"})

    def unreadable():
        raise OSError("the control file is gone")
    updates = [ClientUpdate.of("a", OrderedDict(w=t(2.0, 2.0)), 1),  # no change came with it
               ClientUpdate("b", 1, lambda: OrderedDict(w=t(2.0, 2.0)), unreadable),
               ClientUpdate.of("c", OrderedDict(w=t(2.0, 2.0)), 1, {"w": t(1.0, 2.0, 3.0)}),  # wrong shape
               ClientUpdate.of("d", OrderedDict(w=t(2.0, 2.0)), 1, {"w": t(0.8, -0.4)})]
    result = strategy.aggregate(updates, reference, num_clients=1)
    assert result.used == ["a", "b", "c", "d"]
    assert result.control_skipped[:2] == [("a", "no control-variate change came with it"),
                                          ("b", "the control file is gone")]
    assert [key for key, _ in result.control_skipped] == ["a", "b", "c"] and "w" in result.control_skipped[2][1]
    assert result.server_state["c/w"].tolist() == pytest.approx([0.8, -0.4])  # d's alone, over N = 1
    assert result.server_state["c/w"].dtype == torch.float64


def test_the_global_control_variate_sums_in_float64_and_accepts_one_client():
    c = {"w": torch.zeros(1)}  # given as float32: summed and returned in float64 all the same
    new = scaffold.next_global_control(c, [{"w": t(2.0 ** 24)}, {"w": t(1.0)}], num_clients=1)
    assert new["w"].dtype == torch.float64 and new["w"].item() == 2.0 ** 24 + 1  # float32 would lose the 1
    with pytest.raises(ValueError, match="the number of clients must be >= 1, got 0"):
        scaffold.next_global_control(c, [], num_clients=0)


def test_the_local_control_change_is_taken_from_c_i_plus_before_it_is_rounded_to_its_dtype():
    """c_i+ = 2^24 + 1 is 2^24 in float32, but its change from c_i = 2^24 is 1: the rule computes in float64."""
    new, change = scaffold.next_local_control({"w": t(2.0 ** 24)}, {"w": t(0.0)}, {"w": t(1.0)}, {"w": t(0.5)},
                                              steps=1, learning_rate=0.5)
    assert new["w"].item() == 2.0 ** 24 and change["w"].item() == 1.0


def test_the_corrected_gradient_moves_one_sgd_step_by_minus_eta_times_the_correction():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    start = nn.Linear(3, 2)
    plain, corrected = nn.Linear(3, 2), nn.Linear(3, 2)
    plain.load_state_dict(start.state_dict())
    corrected.load_state_dict(start.state_dict())
    correction = {"weight": torch.full((2, 3), 0.5), "bias": t(-1.0, 2.0)}
    one = fit(plain, TensorData(x, y), epochs=1, batch_size=8, learning_rate=0.1, momentum=0.0)
    fit(corrected, TensorData(x, y), epochs=1, batch_size=8, learning_rate=0.1, momentum=0.0,
        gradient_correction=correction)
    assert torch.allclose(corrected.weight, plain.weight - 0.1 * 0.5, atol=1e-6)
    assert torch.allclose(corrected.bias, plain.bias - 0.1 * t(-1.0, 2.0), atol=1e-6)
    assert one.steps == 1
    assert fit(nn.Linear(3, 2), TensorData(x, y), epochs=2, batch_size=3, learning_rate=0.1).steps == 6


# ----------------------------------------------------------------------------- the coordinator


def scaffold_app(make_app, **config):
    app = make_app(strategy="scaffold", min_nodes_to_start=2, max_share=1.0, **config)
    client, fed = app.test_client(), app.extensions["federation"]
    return client, fed, register(client, "a", num_samples=10), register(client, "b", num_samples=30)


def control_of(value: float) -> bytes:
    return state_dict_to_bytes({n: torch.full_like(p, value) for n, p in SimpleCNN().named_parameters()})


def test_the_coordinator_serves_c_and_averages_the_uploaded_changes(make_app):
    client, fed, a, b = scaffold_app(make_app)
    response = client.get(f"{API}/control-variate", headers=a["headers"])
    assert response.status_code == 200 and response.headers["X-Model-Version"] == "0"
    c0 = bytes_to_state_dict(response.data)
    assert list(c0) == [n for n, _ in SimpleCNN().named_parameters()]  # parameters only: no BatchNorm buffers
    assert all(float(v.abs().max()) == 0.0 for v in c0.values())
    fed.tick()
    for node, value, n, change in ((a, 1.0, 10, 0.5), (b, 3.0, 30, -0.1)):
        answer = post_update(client, node, 1, filled_state_dict(value, 1), {"num_samples": n},
                             control=control_of(change))
        assert answer.status_code == 202, answer.get_json()
    fed.tick()
    assert fed.global_state["fc2.weight"].flatten()[0].item() == pytest.approx(2.5)  # (10 * 1 + 30 * 3) / 40
    response = client.get(f"{API}/control-variate", headers=a["headers"])
    assert response.headers["X-Model-Version"] == "1"
    c1 = bytes_to_state_dict(response.data)
    assert c1["conv1.weight"].dtype == torch.float32
    assert c1["conv1.weight"].flatten()[0].item() == pytest.approx((0.5 - 0.1) / 2, abs=1e-7)  # N = 2 nodes
    assert sorted(p.name for p in (Path(fed.config.temp_dir) / "global").glob("*.pt")) == [
        "model_v1.pt", "server_state_v1.pt"]


def test_an_update_without_or_with_a_bad_control_variate_is_refused_and_changes_nothing(make_app):
    client, fed, a, b = scaffold_app(make_app)
    fed.tick()
    update = filled_state_dict(1.0, 1)
    missing = post_update(client, a, 1, update, {"num_samples": 10})
    assert missing.status_code == 400 and missing.get_json()["error"] == "missing_control_variate"
    wrong = state_dict_to_bytes({"conv1.weight": torch.zeros(3)})
    bad = post_update(client, b, 1, update, {"num_samples": 30}, control=wrong)
    assert bad.status_code == 400 and "control variate" in bad.get_json()["message"]
    nan = state_dict_to_bytes({n: torch.full_like(p, math.nan) for n, p in SimpleCNN().named_parameters()})
    assert post_update(client, b, 1, update, {"num_samples": 30}, control=nan).status_code == 400
    huge = control_of(1e30)  # finite, but it would make c 1e29: bounded like an update by MAX_UPDATE_NORM
    answer = post_update(client, b, 1, update, {"num_samples": 30}, control=huge)
    assert answer.status_code == 400 and answer.get_json()["error"] == "update_norm_too_large"
    assert "control variate" in answer.get_json()["message"]
    assert fed.state.updates == {}
    assert list((Path(fed.config.temp_dir) / "updates").rglob("*.pt")) == []
    assert fed.updates_refused_total == {"missing_control_variate": 1, "invalid_update": 2, "update_norm_too_large": 1}


def test_other_strategies_have_no_control_variate(make_app):
    app = make_app()
    node = register(app.test_client(), "a")
    response = app.test_client().get(f"{API}/control-variate", headers=node["headers"])
    assert response.status_code == 404 and response.get_json()["error"] == "no_control_variate"


def test_scaffold_is_refused_with_a_robust_rule_and_with_a_task_that_trains_itself(make_app):
    with pytest.raises(ConfigError, match="scaffold cannot use --aggregation median"):
        Config(strategy="scaffold", aggregation="median")
    refused = subprocess.run([sys.executable, str(ROOT / "coordinator.py"), "--strategy", "scaffold",
                              "--aggregation", "median"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "coordinator.py: error: --strategy scaffold cannot use --aggregation median: its control variates correct "
        "the mean of the updates, not a median or trimmed mean"]  # one line, no usage text
    with pytest.raises(TaskError, match="own train\\(\\).*scaffold"):
        make_app(strategy="scaffold", task=str(TASKS / "digits_own_train.py"))


# ----------------------------------------------------------------------------- the worker's file


def test_the_workers_control_variate_survives_a_restart_and_belongs_to_one_run(tmp_path):
    parameters = {"w": torch.zeros(2), "b": torch.zeros(1)}
    stored = LocalControlVariate(tmp_path / "workers" / "node-a")
    assert stored.load("run1", parameters)["w"].tolist() == [0.0, 0.0]  # no file yet: c_i = 0
    stored.save("run1", 3, {"w": t(0.5, -1.5), "b": t(2.0)})
    again = LocalControlVariate(tmp_path / "workers" / "node-a")  # a new process
    assert again.load("run1", parameters)["w"].tolist() == [0.5, -1.5]
    assert again.load("run2", parameters)["w"].tolist() == [0.0, 0.0]  # another run starts from 0
    assert again.load("run1", {"w": torch.zeros(3)})["w"].tolist() == [0.0] * 3  # another model: 0
    again.path.write_bytes(b"damaged")
    assert again.load("run1", parameters)["b"].tolist() == [0.0]
    assert [p.name for p in again.path.parent.iterdir()] == ["control_variate.pt"]  # no temporary left


def test_the_global_control_variate_divides_by_all_registered_clients_not_by_the_participants(make_app):
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, line 17): c <- c + (1/N) sum over the sampled S of
    (c_i+ - c_i), with N every client of the federation: 4 registered, 2 sampled (C = 0.5)."""
    app = make_app(strategy="scaffold", min_nodes_to_start=4, min_sample=1, client_fraction=0.5, max_share=1.0)
    client, fed = app.test_client(), app.extensions["federation"]
    nodes = {n["node_id"]: n for n in (register(client, name, num_samples=10) for name in "abcd")}
    fed.tick()
    assert len(fed.state.participants) == 2
    for node_id, change in zip(fed.state.participants, (0.5, -0.1)):
        answer = post_update(client, nodes[node_id], 1, filled_state_dict(1.0, 1), {"num_samples": 10},
                             control=control_of(change))
        assert answer.status_code == 202, answer.get_json()
    fed.tick()
    c1 = bytes_to_state_dict(client.get(f"{API}/control-variate", headers=nodes[node_id]["headers"]).data)
    assert c1["fc1.weight"].flatten()[0].item() == pytest.approx((0.5 - 0.1) / 4, abs=1e-7)
