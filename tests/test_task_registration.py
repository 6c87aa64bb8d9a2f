"""The coordinator checks each registering worker's task fingerprint (HTTP, no processes): a match joins, a
mismatch is a 409 naming the differences that changes nothing but taking the name's old node out of the rounds;
a malformed fingerprint is a 400; the status, the history and /metrics carry the task and its metrics by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import API, JOIN_TOKEN, MONITOR, bearer, filled_state_dict, fingerprint, post_update
from config import Config
from fedrest.tasks import load_task
from model import SimpleCNN

JOIN = bearer(JOIN_TOKEN)
TASKS = Path(__file__).parent / "tasks"


def body(name: str = "node-a", task: dict | None = None) -> dict:
    b = {"name": name, "device": "cpu", "num_samples": 10, "system_info": {}}
    if task is not None:
        b["task"] = task
    return b


def mnist_fingerprint() -> dict:
    return load_task(Config()).fingerprint(SimpleCNN())


def test_a_worker_with_the_coordinators_task_registers(make_app):
    client = make_app().test_client()
    answer = client.post(f"{API}/nodes", headers=JOIN, json=body(task=mnist_fingerprint()))
    assert answer.status_code == 201 and answer.json["task"] == "mnist" and answer.json["model"] == "simple_cnn"


def test_a_worker_of_an_earlier_version_without_a_fingerprint_still_registers(make_app):
    assert make_app().test_client().post(f"{API}/nodes", headers=JOIN, json=body()).status_code == 201


def test_a_mismatched_task_is_409_naming_the_differences_and_changes_nothing(make_app):
    app = make_app()
    client = app.test_client()
    before = fingerprint(app)
    other = load_task(Config(task=str(TASKS / "digits_own_train.py")))
    answer = client.post(f"{API}/nodes", headers=JOIN, json=body(task=other.fingerprint(other.build_model())))
    assert answer.status_code == 409 and answer.json["error"] == "task_mismatch"
    found = answer.json["differences"]
    assert found[0] == "task: the coordinator runs 'mnist', this worker 'digits-adam'"
    assert "state_dict keys missing here: [conv1.weight, conv1.bias, bn1.weight, ...] (18)" in found
    assert "digits-adam" in answer.json["message"]
    assert fingerprint(app) == before


def test_a_registered_node_that_comes_back_with_another_task_is_out_of_the_rounds(make_app):
    app = make_app()
    client, fed = app.test_client(), app.extensions["federation"]
    node_id = client.post(f"{API}/nodes", headers=JOIN, json=body(task=mnist_fingerprint())).json["node_id"]
    assert fed.node_status(fed.nodes[node_id]) == "online"
    changed = mnist_fingerprint()
    changed["schema"][0][1] = [64, 1, 3, 3]  # other model code: conv1 with 64 filters
    answer = client.post(f"{API}/nodes", headers=JOIN, json=body(task=changed))
    assert answer.status_code == 409
    assert answer.json["differences"] == [
        "conv1.weight: the coordinator's is float32 [32, 1, 3, 3], this worker's float32 [64, 1, 3, 3]"]
    assert fed.node_status(fed.nodes[node_id]) == "offline"  # gone: no round waits for it or samples it
    fed.tick()
    assert fed.state.participants == []
    again = client.post(f"{API}/nodes", headers=JOIN, json=body(task=mnist_fingerprint()))
    assert again.status_code == 200 and fed.node_status(fed.nodes[node_id]) == "online"


@pytest.mark.parametrize("task", [
    "mnist", {"schema": []}, {"name": "mnist", "schema": "x"}, {"name": "mnist", "schema": [["k", [1], 3]]},
    {"name": "mnist", "schema": [["k", [-1], "float32"]]}, {"name": "mnist", "classes": [1, 2]},
    {"name": "mnist", "details": []}, {"name": "mnist", "schema": [["k"] * 3] * 20_001},
])
def test_a_malformed_fingerprint_is_400_and_changes_nothing(make_app, task):
    app = make_app()
    before = fingerprint(app)
    answer = app.test_client().post(f"{API}/nodes", headers=JOIN, json=body(task=task))
    assert answer.status_code == 400 and answer.json["error"] == "bad_request", answer.json
    assert fingerprint(app) == before


def test_the_status_history_and_metrics_show_every_metric_of_the_task(make_app):
    app = make_app(evaluator=lambda sd: {"loss": 0.5, "accuracy": 0.75, "f1": 0.625}, communication_rounds=1)
    client, fed = app.test_client(), app.extensions["federation"]
    answer = client.post(f"{API}/nodes", headers=JOIN, json=body(task=mnist_fingerprint())).json
    fed.tick()
    response = post_update(client, None, 1, filled_state_dict(0.5, 1), headers=bearer(answer["node_token"]))
    assert response.status_code == 202, response.json
    fed.tick()
    status = client.get(f"{API}/status", headers=MONITOR).json
    assert status["task"] == "mnist" and status["model"] == "simple_cnn"
    record = status["history"][0]
    assert record["test_metrics"] == {"loss": 0.5, "accuracy": 0.75, "f1": 0.625}
    assert (record["test_loss"], record["test_accuracy"]) == (0.5, 0.75)
    text = client.get("/metrics", headers=MONITOR).get_data(as_text=True)
    assert 'fl_test_metric{name="f1"} 0.625' in text and "fl_test_accuracy 0.75" in text


def test_federated_evaluation_asks_the_holders_and_records_the_weighted_mean(make_app):
    """After a round's commit the nodes holding a held-out part evaluate the new global model; the round's record
    gets the sample-weighted mean of their metrics, the run goes on when all answered, and a stale, unasked or
    repeated evaluation is a 409 that changes nothing."""
    app = make_app(communication_rounds=1, min_nodes_to_start=2)
    client, fed = app.test_client(), app.extensions["federation"]
    nodes = {}
    for name, held in (("a", 30), ("b", 10), ("c", 0)):
        nodes[name] = client.post(f"{API}/nodes", headers=JOIN, json={**body(name), "eval_samples": held}).json
    fed.tick()
    for name in nodes:
        response = post_update(client, None, 1, filled_state_dict(0.5, 1), headers=bearer(nodes[name]["node_token"]))
        assert response.status_code == 202
    fed.tick()  # aggregates round 1, then asks a and b (c holds nothing out)
    assert fed.phase.value == "evaluating" and sorted(fed.state.evaluators) == sorted(
        nodes[n]["node_id"] for n in ("a", "b"))
    task = client.get(f"{API}/task", headers=bearer(nodes["a"]["node_token"])).json
    assert task["action"] == "evaluate" and task["model_version"] == 1
    assert client.get(f"{API}/task", headers=bearer(nodes["c"]["node_token"])).json["action"] == "wait"

    def evaluate(name, round_number, num_samples, metrics):
        return client.post(f"{API}/rounds/{round_number}/evaluation", headers=bearer(nodes[name]["node_token"]),
                           json={"num_samples": num_samples, "metrics": metrics})

    assert evaluate("c", 1, 5, {"accuracy": 1.0}).json["error"] == "not_evaluator"
    assert evaluate("a", 2, 30, {"accuracy": 0.9}).json["error"] == "stale_round"
    assert evaluate("a", 1, 30, {"accuracy": float("inf")}).status_code == 400
    assert evaluate("a", 1, 30, {"accuracy": 0.9, "loss": 0.3}).status_code == 202
    assert evaluate("a", 1, 30, {"accuracy": 0.9}).json["error"] == "duplicate_evaluation"
    fed.tick()
    assert fed.phase.value == "evaluating"  # b has not answered yet
    assert evaluate("b", 1, 50, {"accuracy": 0.5, "loss": 0.7}).status_code == 202  # 50 counted as its 10
    fed.tick()
    assert fed.finished
    record = client.get(f"{API}/status", headers=MONITOR).json["history"][0]
    assert record["federated_metrics"] == pytest.approx({"accuracy": (30 * 0.9 + 10 * 0.5) / 40,
                                                         "loss": (30 * 0.3 + 10 * 0.7) / 40})
    assert (record["federated_num_samples"], record["federated_num_nodes"]) == (40, 2)
    text = client.get("/metrics", headers=MONITOR).get_data(as_text=True)
    assert 'fl_federated_metric{name="accuracy"} 0.8' in text


def test_no_evaluation_phase_without_held_out_data(make_app):
    app = make_app(communication_rounds=2)
    client, fed = app.test_client(), app.extensions["federation"]
    node = client.post(f"{API}/nodes", headers=JOIN, json=body("a")).json
    fed.tick()
    response = post_update(client, None, 1, filled_state_dict(0.5, 1), headers=bearer(node["node_token"]))
    assert response.status_code == 202
    fed.tick()
    assert fed.phase.value == "training" and fed.round == 2  # straight to the next round, as before


def test_a_worker_whose_model_differs_only_in_dtype_is_409_naming_both_dtypes(make_app):
    """A float64 model (``model.double()``) has the same keys and shapes: every upload of it would be refused,
    so it must not join and be sampled into rounds."""
    app = make_app()
    client = app.test_client()
    before = fingerprint(app)
    task = load_task(Config())
    answer = client.post(f"{API}/nodes", headers=JOIN, json=body(task=task.fingerprint(SimpleCNN().double())))
    assert answer.status_code == 409 and answer.json["error"] == "task_mismatch"
    assert answer.json["differences"][0] == ("conv1.weight: the coordinator's is float32 [32, 1, 3, 3], this "
                                             "worker's float64 [32, 1, 3, 3]")
    assert fingerprint(app) == before
