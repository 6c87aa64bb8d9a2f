"""The coordinator's REST API through Flask's test client, and the round state machine behind it.

No driver thread runs: tests call ``federation.tick()`` where the driver would.
"""

from __future__ import annotations

import gc
import io
import json
import math
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import (MONITOR, API, JOIN_TOKEN, bearer, filled_state_dict, post_update,
                      register, update_files)
from fedrest.server.checkpoints import load_checkpoint
from fedrest.server.federation import Phase
from model import SimpleCNN
from fedrest.serialization import bytes_to_state_dict, state_dict_to_bytes

JOIN = bearer(JOIN_TOKEN)


def assert_json_error(response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str)
    assert body["message"]
    if error is not None:
        assert body["error"] == error, body
    return body


def node_status(client, node_id: str) -> str:
    body = client.get(f"{API}/status", headers=MONITOR).get_json()
    return next(n["status"] for n in body["nodes"] if n["node_id"] == node_id)


def global_state_copy(fed) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, v.clone()) for k, v in fed.global_state.items())


# ============================================================================= health, errors


def test_health(client):
    response = client.get(f"{API}/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "api_version": 1, "state": "waiting_for_nodes", "round": 0}


def test_unknown_url_is_404_json(client):
    assert_json_error(client.get("/api/v1/no-such-thing"), 404, "not_found")
    assert_json_error(client.get("/no-such-page"), 404, "not_found")


@pytest.mark.parametrize("method, path, allowed", [
    ("put", "/nodes", "POST"),
    ("delete", "/health", "GET"),
    ("post", "/status", "GET"),
    ("get", "/rounds/1/updates", "POST"),
])
def test_wrong_method_is_405_json(client, method, path, allowed):
    response = getattr(client, method)(API + path, headers=JOIN)
    assert_json_error(response, 405, "method_not_allowed")
    assert allowed in response.headers["Allow"]


# ============================================================================= registration


def test_register_then_reregister_keeps_id_and_replaces_token(client, fed):
    first = register(client, "node-a", num_samples=100)
    assert first["name"] == "node-a" and first["run_id"] == fed.run_id
    assert first["heartbeat_interval"] == fed.config.heartbeat_interval
    assert first["node_timeout"] == fed.config.node_timeout
    assert len(first["node_token"]) >= 32
    second = register(client, "node-a", num_samples=250, device="cuda (H100)", expected=200)
    assert second["node_id"] == first["node_id"]
    assert second["node_token"] != first["node_token"]
    assert len(fed.nodes) == 1
    node = fed.nodes[first["node_id"]]
    assert (node.num_samples, node.device) == (250, "cuda (H100)")
    heartbeat = f"{API}/nodes/{first['node_id']}/heartbeat"
    assert_json_error(client.post(heartbeat, headers=first["headers"]), 401, "unauthorized")
    assert client.post(heartbeat, headers=second["headers"]).status_code == 200


def test_two_names_get_two_ids(client, fed):
    a, b = register(client, "node-a"), register(client, "node-b")
    assert a["node_id"] != b["node_id"] and a["node_token"] != b["node_token"]
    assert sorted(n.name for n in fed.nodes.values()) == ["node-a", "node-b"]


@pytest.mark.parametrize("headers", [
    {},
    bearer("wrong-join-token"),
    {"Authorization": f"Basic {JOIN_TOKEN}"},
    {"Authorization": "Bearer "},
    {"Authorization": JOIN_TOKEN},
])
def test_register_needs_the_join_token(client, fed, headers):
    response = client.post(f"{API}/nodes", headers=headers, json={"name": "x", "device": "cpu", "num_samples": 5})
    assert_json_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert fed.nodes == {}


GOOD_BODY = {"name": "node-a", "device": "cpu", "num_samples": 10, "system_info": {"os": "linux"}}


@pytest.mark.parametrize("changes", [
    {"name": None},
    {"name": ""},
    {"name": "   "},
    {"name": "x" * 129},
    {"name": "bad\nname"},
    {"name": 5},
    {"device": None},
    {"device": "d" * 65},
    {"num_samples": None},
    {"num_samples": 0},
    {"num_samples": -3},
    {"num_samples": True},
    {"num_samples": 1.5},
    {"num_samples": "10"},
    {"num_samples": 10**9 + 1},
    {"system_info": "linux"},
    {"system_info": [1, 2]},
    {"system_info": {"blob": "x" * 5000}},
])
def test_register_bad_bodies_are_400(client, fed, changes):
    body = {**GOOD_BODY, **changes}
    body = {k: v for k, v in body.items() if v is not None}
    assert_json_error(client.post(f"{API}/nodes", headers=JOIN, json=body), 400, "bad_request")
    assert fed.nodes == {}


def test_register_name_at_the_length_limit_is_fine(client):
    assert register(client, "n" * 128)["name"] == "n" * 128


@pytest.mark.parametrize("kwargs, status", [
    ({"data": "name=node-a", "content_type": "application/x-www-form-urlencoded"}, 415),
    ({"data": json.dumps(GOOD_BODY), "content_type": "text/plain"}, 415),
    ({}, 415),
    ({"data": "{not json", "content_type": "application/json"}, 400),
    ({"data": "[1, 2]", "content_type": "application/json"}, 400),
    ({"data": "null", "content_type": "application/json"}, 400),
])
def test_register_non_json_object_body(client, fed, kwargs, status):
    response = client.post(f"{API}/nodes", headers=JOIN, **kwargs)
    assert_json_error(response, status)
    assert fed.nodes == {}


def test_register_body_too_large_is_413_json(client, fed):
    body = {**GOOD_BODY, "system_info": {"blob": "x" * 2_200_000}}  # above REGISTRATION_BODY_LIMIT (2 MiB)
    answer = client.post(f"{API}/nodes", headers=JOIN, json=body)
    assert_json_error(answer, 413, "payload_too_large")
    assert answer.get_json()["limit_bytes"] == 2 * 1024 * 1024 and str(2 * 1024 * 1024) in answer.get_json()["message"]
    assert fed.nodes == {}


def test_no_auth_registration_and_status_work_without_token(make_app):
    client = make_app(no_auth=True).test_client()
    node = register(client, "open-node", token=None)
    assert node["node_id"]
    response = client.get(f"{API}/status")
    assert response.status_code == 200
    assert [n["name"] for n in response.get_json()["nodes"]] == ["open-node"]
    # node tokens are still needed for the node's own endpoints
    assert_json_error(client.get(f"{API}/task"), 401, "unauthorized")


# ============================================================================= heartbeat and leave


def test_heartbeat(client, fed):
    node = register(client)
    response = client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"])
    assert response.status_code == 200
    assert response.get_json() == {"node_id": node["node_id"], "round": 0, "state": "waiting_for_nodes",
                                   "model_version": 0, "node_status": "online",
                                   "heartbeat_interval": fed.config.heartbeat_interval}
    fed.tick()
    body = client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"]).get_json()
    assert (body["round"], body["state"], body["node_status"]) == (1, "training", "training")


def test_heartbeat_unknown_node_is_404(client):
    node = register(client)
    for headers in (node["headers"], {}):
        body = assert_json_error(client.post(f"{API}/nodes/0123456789abcdef/heartbeat", headers=headers), 404,
                                 "unknown_node")
        assert "register again" in body["message"]


def test_heartbeat_wrong_token_401_other_nodes_token_403(client):
    a, b = register(client, "node-a"), register(client, "node-b")
    url = f"{API}/nodes/{a['node_id']}/heartbeat"
    assert_json_error(client.post(url), 401, "unauthorized")
    assert_json_error(client.post(url, headers=bearer("not-a-node-token")), 401, "unauthorized")
    assert_json_error(client.post(url, headers=JOIN), 401, "unauthorized")
    assert_json_error(client.post(url, headers=b["headers"]), 403, "forbidden")


def test_fresh_coordinator_answers_unknown_node(make_app):
    """F6: after a fresh start the old id gets a distinct 404 (the worker re-registers) and the old token 401."""
    old_app = make_app()
    node = register(old_app.test_client())
    new_client = make_app(fresh=old_app.extensions["federation"].run_id).test_client()
    assert_json_error(new_client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"]), 404,
                      "unknown_node")
    assert_json_error(new_client.get(f"{API}/task", headers=node["headers"]), 401, "unauthorized")
    again = register(new_client, "node-a")
    assert again["node_id"] != node["node_id"]


def test_restarted_coordinator_keeps_nodes_and_tokens(make_app):
    """A restart on the same directories resumes: the node id and its token keep working."""
    old_client = make_app().test_client()
    node = register(old_client)
    new_client = make_app().test_client()
    response = new_client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"])
    assert response.status_code == 200 and response.get_json()["node_id"] == node["node_id"]
    assert register(new_client, "node-a", expected=200)["node_id"] == node["node_id"]


def test_leave_marks_offline_and_any_request_revives(client, fed):
    node = register(client)
    response = client.delete(f"{API}/nodes/{node['node_id']}", headers=node["headers"])
    assert response.status_code == 200
    assert response.get_json() == {"node_id": node["node_id"], "status": "offline"}
    assert node_status(client, node["node_id"]) == "offline"
    fed.tick()
    assert fed.phase == Phase.WAITING  # an offline node does not start a round
    assert client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"]).status_code == 200
    assert node_status(client, node["node_id"]) == "online"


def test_leave_of_another_node_is_403(client):
    a, b = register(client, "node-a"), register(client, "node-b")
    assert_json_error(client.delete(f"{API}/nodes/{a['node_id']}", headers=b["headers"]), 403, "forbidden")
    assert node_status(client, a["node_id"]) == "online"


# ============================================================================= liveness (F5)


@pytest.mark.parametrize("revive", ["heartbeat", "task", "model"])
def test_silent_node_goes_offline_and_comes_back(clocked_app, fake_clock, revive):
    client = clocked_app.test_client()
    fed = clocked_app.extensions["federation"]
    node = register(client)
    assert node_status(client, node["node_id"]) == "online"
    fake_clock.advance(fed.config.node_timeout - 1)
    assert node_status(client, node["node_id"]) == "online"
    fake_clock.advance(2)
    assert node_status(client, node["node_id"]) == "offline"
    requests_by_name = {
        "heartbeat": lambda: client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"]),
        "task": lambda: client.get(f"{API}/task?wait=0", headers=node["headers"]),
        "model": lambda: client.get(f"{API}/model", headers=node["headers"]),
    }
    assert requests_by_name[revive]().status_code == 200
    assert node_status(client, node["node_id"]) == "online"
    status = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert status["nodes"][0]["last_seen_s_ago"] == 0.0


def test_failed_authentication_does_not_count_as_liveness(clocked_app, fake_clock):
    client = clocked_app.test_client()
    fed = clocked_app.extensions["federation"]
    a, b = register(client, "node-a"), register(client, "node-b")
    fake_clock.advance(fed.config.node_timeout + 1)
    url = f"{API}/nodes/{a['node_id']}/heartbeat"
    assert client.post(url, headers=bearer("forged-token")).status_code == 401
    assert client.post(url, headers=b["headers"]).status_code == 403  # b acted (and is alive), a did not
    assert node_status(client, a["node_id"]) == "offline"
    assert node_status(client, b["node_id"]) == "online"


# ============================================================================= task


def test_task_needs_a_node_token(client):
    assert_json_error(client.get(f"{API}/task"), 401, "unauthorized")
    assert_json_error(client.get(f"{API}/task", headers=JOIN), 401, "unauthorized")


def test_task_wait_train_then_wait(client, fed):
    node = register(client)
    assert client.get(f"{API}/task", headers=node["headers"]).get_json() == {
        "action": "wait", "round": 0, "model_version": 0, "state": "waiting_for_nodes"}
    fed.tick()
    task = client.get(f"{API}/task?wait=0", headers=node["headers"]).get_json()
    cfg = fed.config
    assert task["action"] == "train" and task["round"] == 1 and task["model_version"] == 0
    assert task["model"] == "simple_cnn"
    assert 0 < task["deadline_s"] <= cfg.round_timeout
    assert task["settings"] == {"local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size,
                                "learning_rate": cfg.learning_rate, "momentum": cfg.momentum, "seed": cfg.seed,
                                "strategy": "fedavg"}
    assert post_update(client, node, 1, filled_state_dict(0.5, 1), {"num_samples": 10}).status_code == 202
    task = client.get(f"{API}/task", headers=node["headers"]).get_json()
    assert (task["action"], task["round"], task["state"]) == ("wait", 1, "training")


def test_task_stop_after_last_round(make_app):
    app = make_app(communication_rounds=1)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client)
    fed.tick()
    assert post_update(client, node, 1, filled_state_dict(0.5, 1)).status_code == 202
    fed.tick()
    assert fed.phase == Phase.FINISHED
    task = client.get(f"{API}/task?wait=5", headers=node["headers"]).get_json()
    assert task["action"] == "stop" and task["round"] == 1 and task["model_version"] == 1
    assert "1 rounds" in task["reason"]
    assert fed.all_told_to_stop()
    assert client.get(f"{API}/health").get_json()["state"] == "finished"


@pytest.mark.parametrize("wait", ["abc", "1000", "60.5", "-1", "nan", "inf", ""])
def test_task_bad_wait_is_400(client, wait):
    node = register(client)
    body = assert_json_error(client.get(f"{API}/task?wait={wait}", headers=node["headers"]), 400, "bad_request")
    assert "wait" in body["message"]


def test_long_poll_waits_then_answers_wait(client):
    node = register(client)
    start = time.monotonic()
    task = client.get(f"{API}/task?wait=0.4", headers=node["headers"]).get_json()
    elapsed = time.monotonic() - start
    assert task["action"] == "wait"
    assert 0.35 <= elapsed < 5


def test_long_poll_returns_train_promptly_when_round_starts(client, fed):
    node = register(client)
    ticked = []

    def tick_later():
        time.sleep(0.3)
        ticked.append(time.monotonic())
        fed.tick()

    thread = threading.Thread(target=tick_later)
    start = time.monotonic()
    thread.start()
    task = client.get(f"{API}/task?wait=20", headers=node["headers"]).get_json()
    answered = time.monotonic()
    thread.join()
    assert task["action"] == "train" and task["round"] == 1
    assert answered - start >= 0.25  # it did wait for the round
    assert answered - ticked[0] < 2.0  # and answered well before the 20 s wait ran out


def test_node_polling_counts_as_online(clocked_app, fake_clock):
    fed = clocked_app.extensions["federation"]
    client = clocked_app.test_client()
    node = register(client)
    node_obj = fed.nodes[node["node_id"]]
    node_obj.polling = 1  # as while a long poll is in progress
    fake_clock.advance(fed.config.node_timeout * 10)
    assert node_status(client, node["node_id"]) == "online"


# ============================================================================= model


def test_model_download(client, fed):
    node = register(client)
    assert_json_error(client.get(f"{API}/model"), 401, "unauthorized")
    response = client.get(f"{API}/model", headers=node["headers"])
    assert response.status_code == 200
    assert response.mimetype == "application/octet-stream"
    assert response.headers["X-Model-Version"] == "0"
    assert response.headers["X-Model-Name"] == "simple_cnn"
    assert response.headers["Cache-Control"] == "no-store"
    state = bytes_to_state_dict(response.data)
    net = SimpleCNN()
    net.load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], v) for k, v in fed.global_state.items())
    assert len(response.data) > 4_000_000


# ============================================================================= updates


@pytest.fixture
def round_one(client, fed, cfg):
    """One registered node (100 samples) in the open round 1; returns (node, global bytes before)."""
    node = register(client, "node-a", num_samples=100)
    fed.tick()
    assert (fed.phase, fed.round) == (Phase.TRAINING, 1)
    return node, fed.global_bytes


def assert_nothing_recorded(fed, cfg, global_bytes, node_id):
    assert len(fed.state.updates) == 0
    assert fed.global_bytes == global_bytes
    assert fed.nodes[node_id].updates_submitted == 0
    assert update_files(cfg) == []
    assert (fed.phase, fed.round, fed.state.history) == (Phase.TRAINING, 1, [])


def test_update_accepted(client, fed, cfg, round_one):
    node, global_bytes = round_one
    update = filled_state_dict(0.25, 3)
    meta = {"num_samples": 60, "train_loss": 0.5, "train_accuracy": 0.9, "train_seconds": 1.5}
    response = post_update(client, node, 1, update, meta)
    assert response.status_code == 202
    assert response.get_json() == {"accepted": True, "round": 1, "node_id": node["node_id"], "num_samples": 60}
    accepted = fed.state.updates[node["node_id"]]
    assert (accepted.num_samples, accepted.train_loss, accepted.train_accuracy, accepted.train_seconds) == \
        (60, 0.5, 0.9, 1.5)
    files = update_files(cfg)
    assert [f.name for f in files] == [f"{node['node_id']}.pt"]
    stored = bytes_to_state_dict(files[0].read_bytes())
    assert all(torch.equal(stored[k], update[k]) for k in update)
    assert fed.nodes[node["node_id"]].updates_submitted == 1
    assert fed.global_bytes == global_bytes  # nothing aggregated yet
    assert node_status(client, node["node_id"]) == "online"  # answered: no longer "training"


def test_real_model_sized_update_accepted(client, fed, round_one):
    """F8: a ~4.8 MB SimpleCNN update goes through the multipart encoding."""
    node, _ = round_one
    torch.manual_seed(3)
    data = state_dict_to_bytes(SimpleCNN().state_dict())
    assert len(data) > 4_500_000
    response = post_update(client, node, 1, data=data, metadata={"num_samples": 100})
    assert response.status_code == 202, response.get_json()
    assert list(fed.state.updates) == [node["node_id"]]


def test_duplicate_update_is_409_and_counts_once(client, fed, cfg, round_one):
    node, _ = round_one
    assert post_update(client, node, 1, filled_state_dict(1.0, 1), {"num_samples": 10}).status_code == 202
    files = update_files(cfg)
    body = assert_json_error(post_update(client, node, 1, filled_state_dict(9.0, 9), {"num_samples": 99}), 409,
                             "duplicate_update")
    assert body["current_round"] == 1
    assert len(fed.state.updates) == 1 and fed.state.updates[node["node_id"]].num_samples == 10
    assert fed.nodes[node["node_id"]].updates_submitted == 1
    assert update_files(cfg) == files
    assert bytes_to_state_dict(files[0].read_bytes())["fc2.bias"][0].item() == 1.0  # first upload kept


@pytest.mark.parametrize("round_number", [0, 2, 7])
def test_wrong_round_is_409_stale_round(client, fed, cfg, round_one, round_number):
    node, global_bytes = round_one
    body = assert_json_error(post_update(client, node, round_number, filled_state_dict(1.0, 1)), 409, "stale_round")
    assert body["current_round"] == 1 and body["state"] == "training"
    assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])


def test_update_before_any_round_is_409(client, fed, cfg):
    node = register(client)
    body = assert_json_error(post_update(client, node, 1, filled_state_dict(1.0, 1)), 409, "stale_round")
    assert (body["current_round"], body["state"]) == (0, "waiting_for_nodes")
    assert fed.state.updates == {} and update_files(cfg) == []


def test_node_registered_after_round_start_is_not_participant(client, fed, cfg, round_one):
    _, global_bytes = round_one
    late = register(client, "node-late", num_samples=50)
    assert client.get(f"{API}/task", headers=late["headers"]).get_json()["action"] == "wait"
    body = assert_json_error(post_update(client, late, 1, filled_state_dict(1.0, 1)), 409, "not_participant")
    assert body["current_round"] == 1
    assert fed.state.updates == {} and update_files(cfg) == [] and fed.global_bytes == global_bytes
    assert fed.nodes[late["node_id"]].updates_submitted == 0


def _invalid_updates():
    def edit(fn):
        state = filled_state_dict(0.5, 1)
        fn(state)
        return state

    def put(key, value):
        return lambda s: s.__setitem__(key, value)

    return {
        "missing-key": edit(lambda s: s.pop("fc2.bias")),
        "extra-key": edit(put("fc3.weight", torch.zeros(2))),
        "missing-buffer": edit(lambda s: s.pop("bn1.num_batches_tracked")),
        "shape": edit(put("fc2.bias", torch.zeros(11))),
        "0d-becomes-1d": edit(put("bn1.num_batches_tracked", torch.tensor([1]))),
        "dtype": edit(lambda s: s.__setitem__("fc2.weight", s["fc2.weight"].double())),
        "float-counter": edit(put("bn2.num_batches_tracked", torch.tensor(1.0))),
        "nan": edit(lambda s: s["fc1.weight"].view(-1).__setitem__(5, math.nan)),
        "inf": edit(lambda s: s["bn1.running_var"].__setitem__(0, math.inf)),
        "-inf": edit(lambda s: s["conv1.bias"].__setitem__(3, -math.inf)),
    }


INVALID = _invalid_updates()


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_update_is_400(client, fed, cfg, round_one, case):
    node, global_bytes = round_one
    body = assert_json_error(post_update(client, node, 1, INVALID[case], {"num_samples": 10}), 400,
                             "invalid_update")
    assert body["message"]
    assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def create_marker(path: str) -> int:
    with open(path, "w") as f:
        f.write("pwned")
    return 0


class Exploit:
    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (create_marker, (self.path,))


@pytest.mark.parametrize("payload", ["garbage", "truncated", "list", "malicious-archive", "malicious-pickle"])
def test_undecodable_or_malicious_update_is_400_without_side_effect(client, fed, cfg, tmp_path, round_one,
                                                                     payload):
    import pickle

    node, global_bytes = round_one
    marker = tmp_path / "marker"
    valid = state_dict_to_bytes(filled_state_dict(0.5, 1))
    data = {
        "garbage": b"\x00not a torch archive" * 50,
        "truncated": valid[: len(valid) // 3],
        "list": _torch_bytes(list(filled_state_dict(0.5, 1).values())),
        "malicious-archive": _torch_bytes({**filled_state_dict(0.5, 1), "fc2.bias": Exploit(marker)}),
        "malicious-pickle": pickle.dumps({"fc2.bias": Exploit(marker)}, protocol=2),
    }[payload]
    body = assert_json_error(post_update(client, node, 1, data=data, metadata={"num_samples": 10}), 400,
                             "invalid_update")
    assert body["message"]
    assert not marker.exists()
    assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])


@pytest.mark.parametrize("raw_metadata", [
    None,                                              # field missing
    "{not json",
    "[1, 2]",
    "{}",                                              # num_samples missing
    '{"num_samples": 0}',
    '{"num_samples": -5}',
    '{"num_samples": 101}',                            # more than the node registered (100)
    '{"num_samples": true}',
    '{"num_samples": 10.0}',
    '{"num_samples": "10"}',
    '{"num_samples": 10, "train_accuracy": 2}',
    '{"num_samples": 10, "train_accuracy": -0.1}',
    '{"num_samples": 10, "train_loss": -1}',
    '{"num_samples": 10, "train_loss": NaN}',
    '{"num_samples": 10, "train_loss": Infinity}',
    '{"num_samples": 10, "train_loss": "low"}',
    '{"num_samples": 10, "train_seconds": -3}',
])
def test_bad_metadata_is_400(client, fed, cfg, round_one, raw_metadata):
    node, global_bytes = round_one
    response = post_update(client, node, 1, filled_state_dict(0.5, 1),
                           metadata=False if raw_metadata is None else None, raw_metadata=raw_metadata)
    body = assert_json_error(response, 400, "bad_request")
    assert "metadata" in body["message"]
    assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])


def test_metadata_at_the_limits_is_accepted(client, fed, round_one):
    node, _ = round_one
    meta = {"num_samples": 100, "train_accuracy": 1, "train_loss": 0, "train_seconds": 0, "extra": "ignored"}
    assert post_update(client, node, 1, filled_state_dict(0.5, 1), meta).status_code == 202
    accepted = fed.state.updates[node["node_id"]]
    assert (accepted.num_samples, accepted.train_accuracy, accepted.train_loss) == (100, 1.0, 0.0)


def test_missing_state_dict_part_is_400(client, fed, cfg, round_one):
    node, global_bytes = round_one
    response = post_update(client, node, 1, None, {"num_samples": 10})
    body = assert_json_error(response, 400, "bad_request")
    assert "state_dict" in body["message"]
    assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])


@pytest.mark.parametrize("kwargs", [
    {"data": b"raw bytes", "content_type": "application/octet-stream"},
    {"json": {"num_samples": 10}},
    {"data": {"metadata": '{"num_samples": 10}'}, "content_type": "application/x-www-form-urlencoded"},
])
def test_non_multipart_update_is_415(client, fed, cfg, round_one, kwargs):
    node, global_bytes = round_one
    response = client.post(f"{API}/rounds/1/updates", headers=node["headers"], **kwargs)
    assert_json_error(response, 415, "unsupported_media_type")
    assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])


def test_update_needs_a_node_token(client, fed, cfg, round_one):
    node, global_bytes = round_one
    for headers in ({}, JOIN, bearer("forged-token")):
        response = post_update(client, None, 1, filled_state_dict(0.5, 1), headers=headers)
        assert_json_error(response, 401, "unauthorized")
    assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])


@pytest.mark.parametrize("size", [10_000, 200_000])  # within / beyond the multipart slack above the limit
def test_update_over_max_update_bytes_is_413_naming_the_limit(make_app, size):
    app = make_app(max_update_bytes=1024)
    client, fed, cfg = app.test_client(), app.extensions["federation"], app.extensions["federation"].config
    node = register(client)
    fed.tick()
    global_bytes = fed.global_bytes
    body = assert_json_error(post_update(client, node, 1, data=b"\x01" * size, metadata={"num_samples": 10}), 413,
                             "payload_too_large")
    assert body["limit_bytes"] == 1024
    assert "MAX_UPDATE_BYTES=1024" in body["message"]
    assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])


@pytest.mark.parametrize("over", [0, 1])  # a file part of exactly MAX_UPDATE_BYTES bytes, and one byte more
def test_an_update_of_exactly_max_update_bytes_is_accepted_and_one_byte_more_is_413(make_app, over):
    data = state_dict_to_bytes(filled_state_dict(0.5, 1))
    app = make_app(max_update_bytes=len(data) - over)
    client, fed, cfg = app.test_client(), app.extensions["federation"], app.extensions["federation"].config
    node = register(client)
    fed.tick()
    global_bytes = fed.global_bytes
    response = post_update(client, node, 1, data=data, metadata={"num_samples": 10})
    if over:
        body = assert_json_error(response, 413, "payload_too_large")
        assert body["limit_bytes"] == len(data) - 1
        assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])
    else:
        assert response.status_code == 202, response.get_json()
        assert list(fed.state.updates) == [node["node_id"]]


def test_oversized_metadata_field_is_413(client, fed, cfg, round_one):
    node, global_bytes = round_one
    meta = {"num_samples": 10, "padding": "x" * 300_000}
    body = assert_json_error(post_update(client, node, 1, filled_state_dict(0.5, 1), meta), 413,
                             "payload_too_large")
    assert "metadata" in body["message"]
    assert_nothing_recorded(fed, cfg, global_bytes, node["node_id"])


# ============================================================================= aggregation (F1, F3, F13, F14)


def test_two_nodes_aggregate_once_to_the_hand_computed_mean_round_after_round(make_app):
    app = make_app(max_share=1.0)  # the plain sample-weighted mean (no bound on a node's share)
    client, fed, cfg = app.test_client(), app.extensions["federation"], app.extensions["federation"].config
    a = register(client, "node-a", num_samples=10)
    b = register(client, "node-b", num_samples=30)
    fed.tick()
    assert (fed.round, sorted(fed.state.participants)) == (1, sorted([a["node_id"], b["node_id"]]))
    reference = global_state_copy(fed)

    # round 1: floats 1.0 (n=1) and 5.0 (n=3) -> (1 + 15)/4 = 4.0; counters 2 and 6 -> (2 + 18)/4 = 5
    assert post_update(client, a, 1, filled_state_dict(1.0, 2), {"num_samples": 1}).status_code == 202
    fed.tick()  # b has not answered and is online: nothing happens
    assert (fed.phase, fed.round, fed.state.history) == (Phase.TRAINING, 1, [])
    assert post_update(client, b, 1, filled_state_dict(5.0, 6), {"num_samples": 3}).status_code == 202
    fed.tick()
    assert (fed.phase, fed.round, fed.model_version, len(fed.state.history)) == (Phase.TRAINING, 2, 1, 1)
    fed.tick()  # nothing more: round 2 waits for its updates, round 1 is not aggregated again
    assert (fed.round, len(fed.state.history)) == (2, 1)
    for key, value in fed.global_state.items():
        assert value.dtype == reference[key].dtype and value.shape == reference[key].shape, key
        expected = 4.0 if value.is_floating_point() else 5
        assert torch.equal(value, torch.full_like(value, expected)), key
    assert fed.global_state["bn1.num_batches_tracked"].dim() == 0
    record = fed.state.history[0]
    assert (record.round, record.num_updates, record.num_samples, record.num_participants) == (1, 2, 4, 2)
    assert sorted(record.node_ids) == sorted([a["node_id"], b["node_id"]])
    assert update_files(cfg) == []  # round 1's stored updates are gone
    assert fed.state.updates == {}

    # round 2: the accumulator starts from zero again. floats 2.0 (n=3) and -2.0 (n=1) -> (6 - 2)/4 = 1.0;
    # counters 4 and 9 -> (12 + 9)/4 = 5.25 -> 5
    assert post_update(client, a, 2, filled_state_dict(2.0, 4), {"num_samples": 3}).status_code == 202
    assert post_update(client, b, 2, filled_state_dict(-2.0, 9), {"num_samples": 1}).status_code == 202
    fed.tick()
    assert (fed.round, fed.model_version, len(fed.state.history)) == (3, 2, 2)
    for key, value in fed.global_state.items():
        expected = 1.0 if value.is_floating_point() else 5
        assert torch.equal(value, torch.full_like(value, expected)), key
    assert fed.nodes[a["node_id"]].rounds_contributed == [1, 2]
    assert fed.nodes[b["node_id"]].updates_submitted == 2

    # the model endpoint serves the new global model
    response = client.get(f"{API}/model", headers=a["headers"])
    assert response.headers["X-Model-Version"] == "2"
    served = bytes_to_state_dict(response.data)
    assert torch.equal(served["fc1.weight"], torch.ones_like(served["fc1.weight"]))
    assert served["bn2.num_batches_tracked"].item() == 5


def test_real_model_updates_average_to_the_sample_weighted_mean(make_app):
    app = make_app(max_share=1.0)  # the plain sample-weighted mean (no bound on a node's share)
    client, fed = app.test_client(), app.extensions["federation"]
    a = register(client, "node-a", num_samples=100)
    b = register(client, "node-b", num_samples=300)
    fed.tick()
    states = []
    for seed, n_batches in ((1, 2), (2, 6)):
        torch.manual_seed(seed)
        net = SimpleCNN()
        net.train()
        with torch.no_grad():
            for _ in range(n_batches):
                net(torch.randn(2, 1, 28, 28) + seed)
        states.append(net.state_dict())
    assert post_update(client, a, 1, states[0], {"num_samples": 100}).status_code == 202
    assert post_update(client, b, 1, states[1], {"num_samples": 300}).status_code == 202
    fed.tick()
    assert len(fed.state.history) == 1
    for key, value in fed.global_state.items():
        if value.is_floating_point():
            expected = ((states[0][key].double() * 100 + states[1][key].double() * 300) / 400).float()
            assert torch.equal(value, expected), key
            assert bool(torch.isfinite(value).all())
    assert fed.global_state["bn1.num_batches_tracked"].item() == 5  # (2*100 + 6*300)/400
    # F3: BatchNorm statistics were averaged, not left at their initial values
    assert not torch.equal(fed.global_state["bn2.running_mean"], torch.zeros(64))


def test_checkpoints_written_and_loadable(make_app):
    app = make_app(evaluator=lambda state: (0.25, 0.75))
    client, fed = app.test_client(), app.extensions["federation"]
    models = fed.config.models_dir
    node = register(client, num_samples=10)
    fed.tick()
    assert post_update(client, node, 1, filled_state_dict(3.0, 4), {"num_samples": 10}).status_code == 202
    fed.tick()
    for name in ("global_model_round_1.pt", "global_model.pt"):
        path = Path(models) / name
        assert path.exists(), name
        checkpoint = load_checkpoint(path)
        assert checkpoint["format"] == "fl-checkpoint-v1"
        assert (checkpoint["round"], checkpoint["model_name"]) == (1, "simple_cnn")
        assert (checkpoint["test_loss"], checkpoint["test_accuracy"]) == (0.25, 0.75)
        assert "token" not in checkpoint["config"] and checkpoint["config"]["batch_size"] == 32
        net = SimpleCNN()
        net.load_state_dict(checkpoint["state_dict"], strict=True)
        assert torch.equal(net.fc1.bias, torch.full((128,), 3.0))
        assert net.bn1.num_batches_tracked.item() == 4
    assert sorted(p.name for p in Path(models).iterdir()) == ["global_model.pt", "global_model_round_1.pt"]


def test_no_checkpoint_without_save_model(make_app):
    app = make_app(save_model=False)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, num_samples=10)
    fed.tick()
    assert post_update(client, node, 1, filled_state_dict(3.0, 4), {"num_samples": 10}).status_code == 202
    fed.tick()
    assert fed.model_version == 1
    assert list(Path(fed.config.models_dir).iterdir()) == []


def test_load_checkpoint_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(state_dict_to_bytes({"w": torch.zeros(1)}))
    with pytest.raises(ValueError, match="not a fl-checkpoint-v1"):
        load_checkpoint(path)


def test_concurrent_uploads_and_ticks_aggregate_exactly_once(app, fed, cfg):
    nodes = [register(app.test_client(), f"node-{i}", num_samples=100) for i in range(4)]
    fed.tick()
    values, counts = [1.0, 2.0, 3.0, 4.0], [10, 20, 30, 40]
    barrier = threading.Barrier(len(nodes))
    statuses = [None] * len(nodes)

    def upload(i):
        client = app.test_client()
        barrier.wait()
        statuses[i] = post_update(client, nodes[i], 1, filled_state_dict(values[i], 1),
                                  {"num_samples": counts[i]}).status_code

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [202] * 4
    assert len(fed.state.updates) == 4
    tick_barrier = threading.Barrier(4)

    def tick():
        tick_barrier.wait()
        fed.tick()

    tickers = [threading.Thread(target=tick) for _ in range(4)]
    for t in tickers:
        t.start()
    for t in tickers:
        t.join()
    assert len(fed.state.history) == 1 and fed.round == 2 and fed.model_version == 1
    assert fed.state.history[0].num_updates == 4 and fed.state.history[0].num_samples == 100
    # (10*1 + 20*2 + 30*3 + 40*4) / 100 = 300/100 = 3.0
    assert torch.equal(fed.global_state["fc2.weight"], torch.full((10, 128), 3.0))


def test_no_tensor_of_an_earlier_round_stays_referenced(client, fed):
    """F7: the coordinator keeps one global model, not one per round."""
    node = register(client, num_samples=10)
    fed.tick()
    initial_refs = [weakref.ref(t) for t in fed.global_state.values()]
    for round_number in (1, 2):
        assert post_update(client, node, round_number, filled_state_dict(float(round_number), 1),
                           {"num_samples": 10}).status_code == 202
        fed.tick()
        if round_number == 1:
            round_one_refs = [weakref.ref(t) for t in fed.global_state.values()]
    current_refs = [weakref.ref(t) for t in fed.global_state.values()]
    gc.collect()
    assert fed.model_version == 2
    assert all(r() is not None for r in current_refs)  # the references do track live tensors
    assert all(r() is None for r in initial_refs)
    assert all(r() is None for r in round_one_refs)
    assert fed.state.updates == {} and len(fed.state.history) == 2


def test_reregistration_mid_round_keeps_participation(client, fed, cfg):
    node = register(client, "node-a", num_samples=10)
    fed.tick()
    again = register(client, "node-a", num_samples=20, expected=200)  # e.g. a restarted worker
    assert fed.state.participants == [node["node_id"]]
    assert client.get(f"{API}/task", headers=again["headers"]).get_json()["action"] == "train"
    assert post_update(client, again, 1, filled_state_dict(1.0, 1), {"num_samples": 20}).status_code == 202
    fed.tick()
    assert len(fed.state.history) == 1 and fed.state.history[0].num_samples == 20


# ==================================================== regressions: leaving, failures in aggregation, hostile JSON


def test_leave_while_a_long_poll_is_pending_takes_effect(app, client, fed):
    a = register(client, "node-a", num_samples=10)
    b = register(client, "node-b", num_samples=10)
    fed.tick()
    assert post_update(client, a, 1, filled_state_dict(1.0, 1), {"num_samples": 10}).status_code == 202
    # a waits for the next round in a long poll, as the worker's main thread does ...
    poll = threading.Thread(target=lambda: app.test_client().get(f"{API}/task?wait=1", headers=a["headers"]))
    poll.start()
    try:
        deadline = time.monotonic() + 5
        while fed.nodes[a["node_id"]].polling == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert fed.nodes[a["node_id"]].polling == 1
        # ... when it is stopped (Ctrl-C): the worker sends DELETE while the old poll is still held here
        response = client.delete(f"{API}/nodes/{a['node_id']}", headers=a["headers"])
        assert response.get_json()["status"] == "offline"
        assert node_status(client, a["node_id"]) == "offline"
    finally:
        poll.join(10)
    assert node_status(client, a["node_id"]) == "offline"  # the end of the abandoned poll does not revive it
    assert post_update(client, b, 1, filled_state_dict(3.0, 1), {"num_samples": 10}).status_code == 202
    fed.tick()
    assert fed.round == 2 and fed.state.participants == [b["node_id"]]  # nobody waits for the node that left


def _failing_evaluator(state):
    raise RuntimeError("evaluation failed (e.g. out of memory)")


@pytest.mark.parametrize("failure", ["evaluator", "checkpoint"])
def test_failure_during_aggregation_does_not_wedge_the_federation(make_app, failure):
    app = make_app(evaluator=_failing_evaluator if failure == "evaluator" else None)
    client, fed = app.test_client(), app.extensions["federation"]
    if failure == "checkpoint":
        models = Path(fed.config.models_dir)
        models.rmdir()
        models.write_text("not a directory")  # the checkpoint cannot be written
    node = register(client, num_samples=10)
    fed.tick()
    assert post_update(client, node, 1, filled_state_dict(1.0, 1), {"num_samples": 10}).status_code == 202
    try:
        fed.tick()  # in production this runs in the driver thread, which must survive
    except Exception as exc:  # noqa: BLE001 - the point: nothing may escape to kill the driver
        pytest.fail(f"tick() raised {exc!r}: the driver thread would die")
    assert fed.phase != Phase.AGGREGATING
    assert client.get(f"{API}/health").get_json()["state"] != "aggregating"


def test_a_registration_with_nan_in_system_info_is_400_so_the_status_stays_strict_json(client, fed):
    body = '{"name": "node-x", "device": "cpu", "num_samples": 3, "system_info": {"load": NaN, "t": Infinity}}'
    response = client.post(f"{API}/nodes", headers=JOIN, data=body, content_type="application/json")
    answer = assert_json_error(response, 400, "bad_request")
    assert answer["message"] == "system_info must not hold NaN, Infinity or invalid unicode"
    assert fed.nodes == {}
    register(client, "node-y")
    text = client.get(f"{API}/status", headers=MONITOR).get_data(as_text=True)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(text, parse_constant=refuse)["node_counts"]["online"] == 1


DEEP = "[" * 5000 + "]" * 5000  # nesting deeper than Python's recursion limit, well under 64 KiB


@pytest.mark.parametrize("case", ["register-deep-json", "metadata-deep-json", "metadata-huge-int"])
def test_bad_client_input_never_answers_5xx(client, fed, cfg, case):
    if case == "register-deep-json":
        body = '{"name": "x", "device": "cpu", "num_samples": 3, "system_info": {"a": ' + DEEP + "}}"
        response = client.post(f"{API}/nodes", headers=JOIN, data=body, content_type="application/json")
        assert_json_error(response, 400, "bad_request")
        assert fed.nodes == {}
        return
    node = register(client, num_samples=100)
    fed.tick()
    raw = {"metadata-deep-json": '{"num_samples": 10, "extra": ' + DEEP + "}",
           "metadata-huge-int": '{"num_samples": 10, "train_loss": 1' + "0" * 400 + "}"}[case]
    response = post_update(client, node, 1, filled_state_dict(0.5, 1), raw_metadata=raw)
    assert_json_error(response, 400, "bad_request")
    assert fed.state.updates == {} and update_files(cfg) == []


# ============================================================================= status


def test_status_needs_the_join_token(client):
    node = register(client)
    assert_json_error(client.get(f"{API}/status"), 401, "unauthorized")
    assert_json_error(client.get(f"{API}/status", headers=bearer("wrong-token-123")), 401, "unauthorized")
    assert_json_error(client.get(f"{API}/status", headers=node["headers"]), 401, "unauthorized")


def test_status_contents(make_app):
    app = make_app(evaluator=lambda state: (0.125, 0.875), communication_rounds=3)
    client, fed = app.test_client(), app.extensions["federation"]
    empty = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert (empty["round"], empty["total_rounds"], empty["state"], empty["nodes"], empty["history"]) == \
        (0, 3, "waiting_for_nodes", [], [])
    a = register(client, "node-a", num_samples=40, device="cpu")
    b = register(client, "node-b", num_samples=60, device="cuda (test)")
    fed.tick()
    post_update(client, a, 1, filled_state_dict(1.0, 1), {"num_samples": 40, "train_loss": 0.5})
    post_update(client, b, 1, filled_state_dict(1.0, 1), {"num_samples": 60, "train_loss": 1.5})
    fed.tick()
    status = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert (status["round"], status["total_rounds"], status["state"], status["model_version"]) == \
        (2, 3, "training", 1)
    assert status["current_round"]["round"] == 2 and status["current_round"]["updates_received"] == 0
    assert status["current_round"]["timeout_s"] == fed.config.round_timeout
    assert [(n["node_id"], n["name"], n["device"], n["status"], n["updates_submitted"], n["num_samples"])
            for n in status["nodes"]] == [(a["node_id"], "node-a", "cpu", "training", 1, 40),
                                          (b["node_id"], "node-b", "cuda (test)", "training", 1, 60)]
    assert status["nodes"][0]["rounds_contributed"] == [1]
    assert (status["nodes"][0]["last_train_loss"], status["nodes"][1]["last_train_loss"]) == (0.5, 1.5)
    assert status["nodes"][0]["system_info"] == {"test": True}
    assert status["min_nodes_to_start"] == 1 and status["model"] == "simple_cnn" and status["dataset"] == "mnist"
    assert "token_hash" not in status["nodes"][0] and "node_token" not in json.dumps(status)
    (row,) = status["history"]
    assert (row["round"], row["test_loss"], row["test_accuracy"], row["num_updates"], row["num_samples"]) == \
        (1, 0.125, 0.875, 2, 100)
    assert row["mean_train_loss"] == 1.0
    assert row["duration_s"] >= 0 and row["aggregation_s"] >= 0


# ============================================================================= F18: answers during aggregation


def test_endpoints_answer_quickly_while_the_coordinator_evaluates(make_app):
    started, release = threading.Event(), threading.Event()

    def slow_evaluator(state):
        started.set()
        release.wait(5.0)  # "evaluation" lasts until the test has measured (at most 5 s)
        return 0.5, 0.5

    app = make_app(evaluator=slow_evaluator)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, num_samples=10)
    other = register(client, "node-b", num_samples=10)
    fed.tick()
    assert post_update(client, node, 1, filled_state_dict(1.0, 1), {"num_samples": 10}).status_code == 202
    assert post_update(client, other, 1, filled_state_dict(1.0, 1), {"num_samples": 10}).status_code == 202
    ticker = threading.Thread(target=fed.tick)
    ticker.start()
    try:
        assert started.wait(10), "aggregation never reached the evaluator"
        timings = {}
        for name, call in {
            "heartbeat": lambda: client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"]),
            "status": lambda: client.get(f"{API}/status", headers=MONITOR),
            "task": lambda: client.get(f"{API}/task?wait=0", headers=node["headers"]),
            "health": lambda: client.get(f"{API}/health"),
        }.items():
            t0 = time.monotonic()
            response = call()
            timings[name] = time.monotonic() - t0
            assert response.status_code == 200, name
            if name == "status":  # round 2 trains while round 1's model is evaluated
                body = response.get_json()
                assert (body["state"], body["round"], body["history"][-1]["evaluation_pending"]) == \
                    ("training", 2, True)
        assert ticker.is_alive()  # the answers came while the evaluator was still running
        assert max(timings.values()) < 0.5, timings  # a held lock would make them wait the full 5 s
    finally:
        release.set()
        ticker.join(10)
    assert len(fed.state.history) == 1 and fed.round == 2


@pytest.mark.parametrize("raw,words", [(b"[" * 5000 + b"]" * 5000, "nested too deeply"),
                                       (b'{"name": ', "not valid JSON"), (b"[1, 2]", "must be a JSON object")])
def test_a_registration_body_that_is_not_a_json_object_says_what_is_wrong(client, fed, raw, words):
    response = client.post(f"{API}/nodes", headers=JOIN, data=raw, content_type="application/json")
    assert_json_error(response, 400, "bad_request")
    assert words in response.get_json()["message"] and fed.nodes == {}
