"""The federation's state machine driven directly (no HTTP): deadlines (F4), offline participants, restarts of a
round, with a fake clock. The HTTP contract is tested in test_api.py; the decisions alone in test_rounds.py."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import torch

from conftest import FakeClock, make_config
from fedrest.serialization import state_dict_to_bytes
from fedrest.server import driver
from fedrest.server.federation import Federation, Phase
from fedrest.server.status import status_json


def _tiny_federation(tmp_path, clock, **overrides):
    cfg = make_config(tmp_path, **{"round_timeout": 30.0, "node_timeout": 60.0, **overrides})
    initial = OrderedDict(w=torch.zeros(2), n=torch.tensor(0))
    return Federation(cfg, initial, clock=clock)


def _submit(fed, node, round_number, w, n_counter, num_samples):
    data = state_dict_to_bytes(OrderedDict(w=torch.tensor(w), n=torch.tensor(n_counter)))
    return fed.submit_update(node, round_number, {"num_samples": num_samples}, data)


def test_deadline_aggregates_what_arrived(tmp_path):
    clock = FakeClock()
    fed = _tiny_federation(tmp_path, clock, min_nodes_to_start=2)
    a, _, _ = fed.register("node-a", "cpu", 10, {})
    b, _, _ = fed.register("node-b", "cpu", 10, {})
    fed.tick()
    assert (fed.phase, fed.round, len(fed.state.participants)) == (Phase.TRAINING, 1, 2)
    _submit(fed, a, 1, [2.0, -6.0], 3, 7)
    clock.advance(29.0)
    fed.tick()
    assert (fed.phase, fed.state.history) == (Phase.TRAINING, [])  # b is online and the deadline is ahead
    clock.advance(1.5)  # past ROUND_TIMEOUT = 30 s, b still within NODE_TIMEOUT
    assert fed.node_status(fed.nodes[b.node_id]) == "training"
    fed.tick()
    assert len(fed.state.history) == 1
    record = fed.state.history[0]
    assert (record.num_updates, record.num_participants, record.num_samples, record.node_ids) == (1, 2, 7, [a.node_id])
    assert torch.equal(fed.global_state["w"], torch.tensor([2.0, -6.0])) and fed.global_state["n"].item() == 3
    assert (fed.phase, fed.round) == (Phase.TRAINING, 2)
    fed.stop()


def test_deadline_without_updates_restarts_the_same_round(tmp_path):
    clock = FakeClock()
    fed = _tiny_federation(tmp_path, clock)
    node, token, _ = fed.register("node-a", "cpu", 10, {})
    fed.tick()
    first_start = fed.state.started_mono
    assert (fed.round, fed.state.attempt) == (1, 1)
    clock.advance(31.0)
    assert fed.authenticate(token) is node  # the node is alive (as after a heartbeat)
    fed.tick()
    assert (fed.phase, fed.round, fed.state.attempt) == (Phase.TRAINING, 1, 2)
    assert fed.state.history == [] and fed.model_version == 0
    assert fed.state.started_mono == first_start + 31.0  # a fresh deadline
    assert fed.state.participants == [node.node_id]
    fed.tick()  # the new deadline is ahead: nothing happens
    assert (fed.round, fed.state.attempt) == (1, 2)
    _submit(fed, node, 1, [1.0, 1.0], 1, 5)  # the restarted round takes updates for the same number
    fed.tick()
    assert (fed.round, len(fed.state.history), fed.state.history[0].round) == (2, 1, 1)
    fed.stop()


def test_all_participants_offline_goes_back_to_waiting(tmp_path):
    clock = FakeClock()
    fed = _tiny_federation(tmp_path, clock, node_timeout=10.0, round_timeout=600.0)
    fed.register("node-a", "cpu", 10, {})
    fed.tick()
    assert fed.round == 1
    clock.advance(11.0)  # silent past NODE_TIMEOUT, long before the round deadline
    fed.tick()
    assert (fed.phase, fed.round, fed.state.history) == (Phase.WAITING, 0, [])
    status = status_json(fed.snapshot())
    assert status["state"] == "waiting_for_nodes" and status["current_round"] is None
    fed.stop()


def test_offline_participant_does_not_hold_the_round(tmp_path):
    clock = FakeClock()
    fed = _tiny_federation(tmp_path, clock, node_timeout=10.0, round_timeout=600.0)
    a, _, _ = fed.register("node-a", "cpu", 10, {})
    b, _, _ = fed.register("node-b", "cpu", 10, {})
    fed.tick()
    clock.advance(8.0)
    _submit(fed, a, 1, [4.0, 4.0], 2, 2)  # a answers (and is seen); b stays silent
    fed.tick()
    assert fed.state.history == []
    clock.advance(5.0)  # b silent for 13 s > NODE_TIMEOUT; a seen 5 s ago
    fed.tick()
    assert len(fed.state.history) == 1 and fed.state.history[0].num_updates == 1
    assert fed.state.participants == [a.node_id]  # round 2 starts with the nodes online now
    fed.stop()


def test_the_log_says_a_round_is_done_before_the_next_one_starts_and_who_a_round_waits_for(tmp_path, caplog):
    clock = FakeClock()
    fed = _tiny_federation(tmp_path, clock, min_nodes_to_start=2, communication_rounds=2)
    a, _, _ = fed.register("node-a", "cpu", 10, {})
    fed.register("node-b", "cpu", 10, {})
    with caplog.at_level(logging.INFO, logger="fl.federation"):
        fed.tick()
        _submit(fed, a, 1, [1.0, 1.0], 1, 5)
        clock.advance(11.0)  # node-b is silent, but within NODE_TIMEOUT and the deadline
        fed.tick()
        clock.advance(20.0)  # past ROUND_TIMEOUT: round 1 closes with node-a's update
        fed.tick()
    lines = [r.getMessage() for r in caplog.records]
    assert any("round 1: 1 of 2 updates; waiting for node-b (deadline in 19s)" in m for m in lines), lines
    done = next(i for i, m in enumerate(lines) if m.startswith("round 1/2 done"))
    started = next(i for i, m in enumerate(lines) if m.startswith("round 2/2 started"))
    assert done < started
    fed.stop()


def test_a_round_whose_updates_came_during_an_evaluation_closes_right_after_it(tmp_path, monkeypatch):
    """The driver thread evaluates round 1's model after its commit while round 2 trains. When round 2's last
    update arrives during that evaluation, its notification must not be lost: the driver ticks again at once
    instead of sleeping IDLE_TICK_S (made 60 s here: a lost wake-up would time the test out)."""
    monkeypatch.setattr(driver, "IDLE_TICK_S", 60.0)
    evaluating, release = threading.Event(), threading.Event()

    def evaluator(state_dict):
        if not evaluating.is_set():  # round 1's model: hold the driver until round 2's updates are in
            evaluating.set()
            release.wait(10)
        return {"loss": float(state_dict["w"].sum())}

    cfg = make_config(tmp_path, min_nodes_to_start=2, communication_rounds=3, round_timeout=300.0, max_share=1.0)
    fed = Federation(cfg, OrderedDict(w=torch.zeros(2), n=torch.tensor(0)), evaluator=evaluator)
    a, _, _ = fed.register("node-a", "cpu", 10, {})
    b, _, _ = fed.register("node-b", "cpu", 30, {})
    fed.start()
    try:
        deadline = time.monotonic() + 10
        while fed.round != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        for node, value in ((a, 1.0), (b, 3.0)):
            _submit(fed, node, 1, [value, value], 1, node.num_samples)
        assert evaluating.wait(10) and fed.round == 2 and fed.phase == Phase.TRAINING
        for node, value in ((a, 2.0), (b, 2.0)):
            _submit(fed, node, 2, [value, value], 1, node.num_samples)
        release.set()
        deadline = time.monotonic() + 20
        while len(fed.state.history) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.round for r in fed.state.history] == [1, 2]
        assert fed.state.history[0].test_loss == 2 * (1.0 * 10 + 3.0 * 30) / 40
    finally:
        fed.stop()
