"""Refused updates, names in use, hostile text, and non-finite metrics: what the coordinator does about them."""

from __future__ import annotations

import json
import logging

from conftest import MONITOR, API, JOIN_TOKEN, FakeClock, bearer, filled_state_dict, post_update, register

JOIN = bearer(JOIN_TOKEN)


def test_a_refused_update_is_the_nodes_answer_for_the_round(make_app):
    app = make_app(min_nodes_to_start=2)
    client, fed = app.test_client(), app.extensions["federation"]
    a, b = register(client, "a", num_samples=10), register(client, "b", num_samples=10)
    fed.tick()
    bad = post_update(client, a, 1, filled_state_dict(float("nan"), 1), {"num_samples": 10})
    assert bad.status_code == 400 and bad.get_json()["error"] == "invalid_update"
    assert client.get(f"{API}/task", headers=a["headers"]).get_json()["action"] == "wait"  # not asked again
    status = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert status["current_round"]["updates_refused"] == 1
    assert status["updates_refused_total"] == {"invalid_update": 1}
    assert {n["name"]: n["status"] for n in status["nodes"]} == {"a": "online", "b": "training"}
    assert post_update(client, b, 1, filled_state_dict(2.0, 1), {"num_samples": 10}).status_code == 202
    fed.tick()  # nobody is waited for any more: the round closes at once, without a's refused work
    assert len(fed.state.history) == 1 and fed.state.history[0].node_ids == [b["node_id"]]
    assert fed.global_state["fc2.bias"].eq(2.0).all()


def test_when_every_update_is_refused_the_round_restarts_and_says_why(make_app, caplog):
    clock = FakeClock()
    app = make_app(min_nodes_to_start=1, max_update_bytes=1024, clock=clock)
    client, fed = app.test_client(), app.extensions["federation"]
    a = register(client, "a", num_samples=10)
    fed.tick()
    too_big = post_update(client, a, 1, filled_state_dict(1.0, 1), {"num_samples": 10})
    assert too_big.status_code == 413
    with caplog.at_level(logging.WARNING, logger="fl.federation"):
        fed.tick()
    # it backs off (2 s, doubling up to ROUND_TIMEOUT) instead of retrying the same refused work at once
    assert (fed.phase.value, fed.round, fed.state.history) == ("waiting_for_nodes", 0, [])
    assert any("refused 1 of the updates" in r.getMessage() and "MAX_UPDATE_BYTES" in r.getMessage()
               and "next attempt in 2s" in r.getMessage() for r in caplog.records)
    fed.tick()
    assert fed.phase.value == "waiting_for_nodes"  # still backing off
    clock.advance(2.0)  # the back-off is over
    fed.tick()
    assert (fed.phase.value, fed.round) == ("training", 1)
    assert fed.store.updates(1) == []  # the refused attempt left nothing behind
    assert client.get(f"{API}/task", headers=a["headers"]).get_json()["action"] == "train"


def test_an_upload_for_a_closed_round_is_answered_409_before_its_body_and_changes_nothing(make_app):
    app = make_app()
    client, fed = app.test_client(), app.extensions["federation"]
    a = register(client, "a", num_samples=10)
    fed.tick()
    response = post_update(client, a, 7, filled_state_dict(1.0, 1), {"num_samples": 0})  # bad metadata, unread
    assert response.status_code == 409 and response.get_json()["error"] == "stale_round"
    assert fed.state.refused == {} and fed.updates_refused_total == {}
    assert client.get(f"{API}/task", headers=a["headers"]).get_json()["action"] == "train"


def test_a_replaced_worker_process_cannot_take_its_name_back(client, fed):
    def reg(instance, expected):
        response = client.post(f"{API}/nodes", headers=JOIN, json={"name": "dup", "device": "cpu",
                                                                    "num_samples": 5, "instance_id": instance})
        assert response.status_code == expected, response.get_json()
        return response.get_json()

    first = reg("process-1", 201)
    second = reg("process-2", 200)  # e.g. the worker was restarted after a crash: it takes the name over
    assert second["node_id"] == first["node_id"]
    refused = reg("process-1", 409)  # the first one was in fact still running: it is told, not let back in
    assert refused["error"] == "name_in_use" and "--name" in refused["message"]
    assert reg("process-2", 200)["node_id"] == first["node_id"]
    assert fed.nodes[first["node_id"]].instance_id == "process-2"


def test_text_that_is_not_unicode_is_refused(client, fed):
    body = '{"name": "a\\ud800b", "device": "cpu", "num_samples": 1}'
    response = client.post(f"{API}/nodes", headers=JOIN, data=body, content_type="application/json")
    assert response.status_code == 400 and "unicode" in response.get_json()["message"]
    body = '{"name": "ok", "device": "cpu", "num_samples": 1, "system_info": {"x": "\\udfff"}}'
    response = client.post(f"{API}/nodes", headers=JOIN, data=body, content_type="application/json")
    assert response.status_code == 400
    assert fed.nodes == {}


def test_registration_and_tasks_name_the_model_and_dataset(client, fed):
    node = register(client)
    assert (node["model"], node["dataset"]) == ("simple_cnn", "mnist")
    fed.tick()
    task = client.get(f"{API}/task", headers=node["headers"]).get_json()
    assert (task["action"], task["model"], task["dataset"]) == ("train", "simple_cnn", "mnist")


def test_a_diverged_model_is_recorded_without_a_test_loss_and_status_stays_json(make_app):
    app = make_app(evaluator=lambda state: (float("nan"), 0.1))
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client)
    fed.tick()
    post_update(client, node, 1, filled_state_dict(1.0, 1), {"num_samples": 10})
    fed.tick()
    text = client.get(f"{API}/status", headers=MONITOR).get_data(as_text=True)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    status = json.loads(text, parse_constant=refuse)
    assert status["history"][0]["test_loss"] is None
