"""Durable state, restart and recovery of the coordinator, in process (the process-killing tests are in
tests/test_faults_e2e.py): what was acknowledged survives, a restart resumes exactly, memory stays flat."""

from __future__ import annotations

import errno
import gc
import sqlite3
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import (MONITOR, API, JOIN_TOKEN, FakeClock, bearer, filled_state_dict, make_config, post_update,
                      register)
from fedrest.server import closing, driver
from fedrest.server.checkpoints import load_checkpoint
from fedrest.server.federation import Federation, Phase
from config import Config
from fedrest.server.registry import NodeRegistry
from fedrest.server.round_state import RoundState
from fedrest.server.rounds import sample_participants
from fedrest.server.status import status_json
from fedrest.server.store import RunStore, StoreError
from fedrest.serialization import bytes_to_state_dict, state_dict_to_bytes

JOIN = bearer(JOIN_TOKEN)


def global_model(client, node) -> "OrderedDict[str, torch.Tensor]":
    response = client.get(f"{API}/model", headers=node["headers"])
    assert response.status_code == 200
    return bytes_to_state_dict(response.data)


def expected_mean(pairs):
    """Hand-computed sample-weighted mean of filled state_dicts: [(value, num_samples), ...] -> float."""
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total


def test_restart_mid_round_keeps_every_acknowledged_update(make_app):
    app = make_app(min_nodes_to_start=3)
    client, fed = app.test_client(), app.extensions["federation"]
    a, b, c = (register(client, name, num_samples=n) for name, n in (("a", 10), ("b", 20), ("c", 30)))
    fed.tick()
    assert post_update(client, a, 1, filled_state_dict(1.0, 1), {"num_samples": 10}).status_code == 202
    assert post_update(client, b, 1, filled_state_dict(2.0, 2), {"num_samples": 20}).status_code == 202
    fed.stop()  # the process dies here: nothing else is written

    app2 = make_app(min_nodes_to_start=3)
    client2, fed2 = app2.test_client(), app2.extensions["federation"]
    assert (fed2.run_id, fed2.round, fed2.phase) == (fed.run_id, 1, Phase.TRAINING)
    assert set(fed2.state.updates) == {a["node_id"], b["node_id"]}
    assert sorted(fed2.state.participants) == sorted([a["node_id"], b["node_id"], c["node_id"]])
    # the node tokens survive: c uploads with the token it got before the restart; a's retry counts once
    assert post_update(client2, a, 1, filled_state_dict(1.0, 1), {"num_samples": 10}).status_code == 409
    assert post_update(client2, c, 1, filled_state_dict(3.0, 3), {"num_samples": 30}).status_code == 202
    fed2.tick()
    assert [r.round for r in fed2.state.history] == [1] and fed2.state.history[0].num_updates == 3
    model = global_model(client2, a)
    assert torch.allclose(model["fc1.weight"], torch.full_like(model["fc1.weight"],
                                                               expected_mean([(1.0, 10), (2.0, 20), (3.0, 30)])))
    # integer buffers: weighted mean (1*10 + 2*20 + 3*30) / 60 = 2.33 -> 2
    assert model["bn1.num_batches_tracked"].item() == 2
    assert fed2.state.history[0].num_samples == 60


def round_1_with_two_updates(make_app, **overrides):
    """A coordinator of 3 rounds whose round 1 holds the updates of a (1.0, 10 samples) and b (5.0, 30 samples),
    not yet aggregated: its federation."""
    app = make_app(min_nodes_to_start=2, communication_rounds=3, max_share=1.0, **overrides)
    client, fed = app.test_client(), app.extensions["federation"]
    a, b = register(client, "a", num_samples=10), register(client, "b", num_samples=30)
    fed.tick()
    post_update(client, a, 1, filled_state_dict(1.0, 4), {"num_samples": 10})
    post_update(client, b, 1, filled_state_dict(5.0, 8), {"num_samples": 30})
    return fed


def test_kill_during_aggregation_then_restart_aggregates_once(make_app, monkeypatch):
    fed = round_1_with_two_updates(make_app)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("kill -9 before the round's commit")

    monkeypatch.setattr(fed.store, "finish_round", crash)
    with pytest.raises(KeyboardInterrupt):
        fed.tick()
    # the global model file of version 1 may exist, the database still says "aggregating round 1"
    db = sqlite3.connect(Path(fed.config.temp_dir) / "coordinator.sqlite3")
    assert dict(db.execute("SELECT key, value FROM run").fetchall())["phase"] == '"aggregating"'
    db.close()

    app2 = make_app(min_nodes_to_start=2, communication_rounds=3, max_share=1.0)
    fed2 = app2.extensions["federation"]
    assert fed2.phase == Phase.AGGREGATING and len(fed2.state.updates) == 2 and fed2.model_version == 0
    fed2.tick()
    assert fed2.model_version == 1 and len(fed2.state.history) == 1
    assert fed2.round == 2 and fed2.phase == Phase.TRAINING
    fed2.tick()  # nothing more happens: exactly one aggregation of round 1
    assert len(fed2.state.history) == 1
    value = expected_mean([(1.0, 10), (5.0, 30)])
    assert torch.allclose(fed2.global_state["conv1.weight"], torch.full_like(fed2.global_state["conv1.weight"], value))
    checkpoint = load_checkpoint(Path(fed2.config.models_dir) / "global_model.pt")
    assert checkpoint["round"] == 1
    assert torch.equal(checkpoint["state_dict"]["conv1.weight"], fed2.global_state["conv1.weight"])
    assert not (Path(fed2.config.temp_dir) / "updates" / "round_1").exists()


def test_interrupted_writes_leave_no_file_that_is_loaded(make_app):
    app = make_app()
    fed = app.extensions["federation"]
    fed.stop()
    models, temp = Path(fed.config.models_dir), Path(fed.config.temp_dir)
    (models / ".global_model.pt.abc.tmp").write_bytes(b"half a checkpoint")
    (temp / "global" / ".model_v0.pt.xyz.tmp").write_bytes(b"half a model")
    fed2 = make_app().extensions["federation"]
    assert not list(models.glob(".*.tmp")) and not list((temp / "global").glob(".*.tmp"))
    assert fed2.global_state.keys() == fed.global_state.keys()


def test_a_damaged_global_model_stops_the_resume_with_a_clear_error(make_app, tmp_path):
    fed = make_app().extensions["federation"]
    fed.stop()
    path = Path(fed.config.temp_dir) / "global" / "model_v0.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(StoreError) as refused:
        make_app()
    message = str(refused.value)
    assert message.startswith(f"cannot resume run {fed.run_id}: global model version 0 ({path}) is unreadable: ")
    assert message.endswith(". Start with --fresh for a new run.")


def test_a_resumed_round_leaves_out_a_stored_update_whose_file_is_gone_and_says_so(make_app, caplog):
    app = make_app(min_nodes_to_start=2)
    client, fed = app.test_client(), app.extensions["federation"]
    a, b = register(client, "node-a"), register(client, "node-b")
    fed.tick()
    for node in (a, b):
        assert post_update(client, node, 1, filled_state_dict(0.5, 1), {"num_samples": 10}).status_code == 202
    fed.stop()
    Path(fed.state.updates[a["node_id"]].path).unlink()  # an operator removed it by hand
    with caplog.at_level("ERROR", "fl.federation"):
        resumed = make_app(min_nodes_to_start=2).extensions["federation"]
    assert list(resumed.state.updates) == [b["node_id"]] and resumed.round == 1
    assert f"round 1: stored update of {a['node_id']} is missing on disk; leaving it out" in [
        r.getMessage() for r in caplog.records]


def test_fresh_archives_the_old_run(make_app):
    app = make_app()
    client, fed = app.test_client(), app.extensions["federation"]
    register(client)
    fed.stop()
    app2 = make_app(fresh=fed.run_id)
    fed2 = app2.extensions["federation"]
    assert fed2.run_id != fed.run_id and fed2.nodes == {}
    archives = list((Path(fed.config.temp_dir) / "archive").iterdir())
    assert len(archives) == 1 and (archives[0] / "coordinator.sqlite3").exists()


def test_resume_keeps_the_settings_the_run_started_with(make_app):
    app = make_app(communication_rounds=7, local_epochs=2, evaluator=lambda sd: (0.5, 0.5))
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client)
    fed.tick()
    post_update(client, node, 1, filled_state_dict(1.0, 1), {"num_samples": 10})
    fed.tick()  # one round done: the run's settings are fixed from now on
    assert fed.model_version == 1
    fed.stop()
    fed2 = make_app(communication_rounds=3, local_epochs=5, round_timeout=9.0).extensions["federation"]
    assert (fed2.config.communication_rounds, fed2.config.local_epochs) == (7, 2)
    assert fed2.config.round_timeout == 9.0  # operational settings may change on restart


def test_a_run_that_completed_no_round_takes_new_settings(make_app):
    fed = make_app(communication_rounds=7, local_epochs=2).extensions["federation"]
    fed.stop()
    fed2 = make_app(communication_rounds=3, local_epochs=5).extensions["federation"]
    assert fed2.run_id == fed.run_id
    assert (fed2.config.communication_rounds, fed2.config.local_epochs) == (3, 5)
    fed2.stop()
    fed3 = make_app(explicit=set()).extensions["federation"]  # stored: a start that gives none keeps them
    assert (fed3.config.communication_rounds, fed3.config.local_epochs) == (3, 5)


def test_a_completed_run_stays_visible(make_app):
    app = make_app(communication_rounds=1, evaluator=lambda sd: (0.25, 0.75))
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client)
    fed.tick()
    post_update(client, node, 1, filled_state_dict(1.0, 1), {"num_samples": 10})
    fed.tick()
    assert fed.finished
    fed.stop()
    client2 = make_app(communication_rounds=1).test_client()
    status = client2.get(f"{API}/status", headers=MONITOR).get_json()
    assert status["state"] == "finished" and status["run_id"] == fed.run_id
    assert [(r["round"], r["test_accuracy"]) for r in status["history"]] == [(1, 0.75)]
    assert client2.get(f"{API}/task", headers=node["headers"]).get_json()["action"] == "stop"


def test_too_few_updates_at_the_deadline_restart_the_round(tmp_path):
    clock = FakeClock()
    cfg = make_config(tmp_path, min_nodes_to_start=2, min_updates=2, round_timeout=10.0)
    fed = Federation(cfg, filled_state_dict(0.0, 0), clock=clock)
    a, _, _ = fed.register("a", "cpu", 10, {})
    b, _, _ = fed.register("b", "cpu", 10, {})
    fed.tick()
    fed.submit_update(a, 1, {"num_samples": 10}, state_dict_to_bytes(filled_state_dict(1.0, 1)))
    clock.advance(11)
    a.last_seen_mono = b.last_seen_mono = clock.now
    fed.tick()
    assert (fed.round, fed.state.attempt, fed.phase) == (1, 2, Phase.TRAINING)
    assert fed.state.updates == {} and fed.state.history == []
    assert RunStore(Path(cfg.temp_dir) / "coordinator.sqlite3").get("attempt") == 2


def test_client_sampling_is_reproducible_and_sized():
    online = [f"n{i:02d}" for i in range(20)]
    chosen = sample_participants(online, 0.25, 2, seed=7, round_number=3, attempt=1)
    assert len(chosen) == 5 and set(chosen) <= set(online)
    assert chosen == sample_participants(online, 0.25, 2, seed=7, round_number=3, attempt=1)
    others = {tuple(sample_participants(online, 0.25, 2, seed=7, round_number=r, attempt=1)) for r in range(1, 9)}
    assert len(others) > 1  # different rounds sample different nodes
    assert len(sample_participants(online, 0.01, 3, 0, 1, 1)) == 3  # at least MIN_NODES
    assert sample_participants(online, 1.0, 2, 0, 1, 1) == online
    assert sample_participants(online[:2], 0.5, 5, 0, 1, 1) == online[:2]  # never more than are online


def test_client_sampling_follows_names_not_random_node_ids():
    """Two runs of the same clients get other random node ids; the registry lists nodes by name, and the sample
    drawn from that order names the same clients (a seeded simulation is repeatable)."""
    names = [f"client-{i:04d}" for i in range(200)]
    runs = []
    for _ in range(2):
        registry = NodeRegistry(node_timeout=60.0, max_nodes=1000)
        for name in reversed(names):  # registered in another order than the names'
            node, _ = registry.prepare_registration(name, "cpu", 10, {}, None, f"hash-{name}", 0.0, 0.0)
            registry.add(node)
        online = registry.online_ids(1.0)
        chosen = sample_participants(online, 0.05, 2, seed=3, round_number=4, attempt=1)
        runs.append(([registry.nodes[i].name for i in chosen], set(online)))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 10
    assert runs[0][1].isdisjoint(runs[1][1])  # other ids, the same clients


def test_min_sample_sets_the_smallest_sample_apart_from_min_nodes_to_start():
    """MIN_NODES_TO_START=N waits for every client; MIN_SAMPLE (not N) is then the smallest sample of C."""
    online = [f"n{i:03d}" for i in range(100)]
    state = RoundState()
    state.open(1, 1, online, Config(min_nodes_to_start=100, min_sample=2, client_fraction=0.05), 0.0, 0.0)
    assert len(state.participants) == 5
    state.open(1, 1, online, Config(min_nodes_to_start=100, min_sample=8, client_fraction=0.05), 0.0, 0.0)
    assert len(state.participants) == 8
    state.open(1, 1, online, Config(min_nodes_to_start=10, client_fraction=0.05), 0.0, 0.0)
    assert len(state.participants) == 10  # MIN_SAMPLE 0: MIN_NODES_TO_START, as before


def test_fifty_rounds_keep_memory_for_updates_flat(tmp_path):
    """F7: no tensor of an earlier round stays referenced; stored updates are removed after each round."""
    tiny = OrderedDict(w=torch.zeros(64, 64), b=torch.zeros(64), n=torch.tensor(0, dtype=torch.int64))
    cfg = make_config(tmp_path, min_nodes_to_start=2, communication_rounds=50, save_model=False, max_share=1.0)
    fed = Federation(cfg, tiny)
    a, _, _ = fed.register("a", "cpu", 10, {})
    b, _, _ = fed.register("b", "cpu", 30, {})
    counts = {}
    for r in range(1, 51):
        fed.tick()
        assert fed.round == r
        for node, value, n in ((a, float(r), 10), (b, float(r) + 1, 30)):
            update = OrderedDict(w=torch.full((64, 64), value), b=torch.full((64,), value), n=torch.tensor(r))
            fed.submit_update(node, r, {"num_samples": n}, state_dict_to_bytes(update))
        fed.tick()
        if r in (10, 50):
            gc.collect()
            counts[r] = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
    assert fed.finished and len(fed.state.history) == 50
    assert counts[50] == counts[10], counts
    assert fed.global_state["w"][0, 0].item() == pytest.approx((50 * 10 + 51 * 30) / 40)
    assert not any((Path(cfg.temp_dir) / "updates").glob("round_*/*.pt"))
    assert [p.name for p in (Path(cfg.temp_dir) / "global").iterdir()] == ["model_v50.pt"]


def test_a_new_attempt_after_too_few_updates_accepts_uploads_again(tmp_path):
    """A round restarted with one update already accepted takes fresh uploads (no stale rows), and a restart of
    the coordinator then brings back only what this attempt acknowledged."""
    clock = FakeClock()
    cfg = make_config(tmp_path, min_nodes_to_start=1, min_updates=2, round_timeout=10.0)
    fed = Federation(cfg, filled_state_dict(0.0, 0), clock=clock)
    a, _, _ = fed.register("a", "cpu", 10, {})
    fed.tick()
    fed.submit_update(a, 1, {"num_samples": 10}, state_dict_to_bytes(filled_state_dict(1.0, 1)))
    clock.advance(1)
    a.last_seen_mono = clock.now
    fed.tick()  # every live participant answered, but MIN_UPDATES=2: attempt 2
    assert (fed.round, fed.state.attempt, len(fed.state.updates)) == (1, 2, 0)
    accepted = fed.submit_update(a, 1, {"num_samples": 10}, state_dict_to_bytes(filled_state_dict(3.0, 1)))
    assert accepted.num_samples == 10
    fed.stop()
    again = Federation(cfg, filled_state_dict(0.0, 0), clock=clock)
    assert list(again.state.updates) == [a.node_id] and again.state.attempt == 2
    assert bytes_to_state_dict(Path(again.state.updates[a.node_id].path).read_bytes())["fc2.bias"].eq(3.0).all()


def test_after_a_restart_nodes_that_left_or_were_long_gone_stay_offline(tmp_path):
    cfg = make_config(tmp_path, node_timeout=60.0, min_nodes_to_start=5)
    fed = Federation(cfg, filled_state_dict(0.0, 0))
    a, b, c = (fed.register(name, "cpu", 10, {})[0] for name in ("a", "b", "c"))
    fed.leave(b)  # Ctrl-C on the worker
    c.last_seen_wall -= 3600  # its worker exited an hour ago without a word
    fed.stop()  # a clean stop stores when each node was last seen
    fed2 = Federation(cfg, filled_state_dict(0.0, 0))
    assert {n.name: fed2.node_status(n) for n in fed2.nodes.values()} == {"a": "online", "b": "offline",
                                                                          "c": "offline"}
    status = {n["name"]: n for n in status_json(fed2.snapshot())["nodes"]}
    assert status["c"]["last_seen_s_ago"] >= 3600  # shown as it is, not "seen just now"
    fed2.stop()


def test_after_a_crash_the_participants_of_the_open_round_get_time_to_come_back(tmp_path):
    cfg = make_config(tmp_path, node_timeout=60.0, min_nodes_to_start=1)
    fed = Federation(cfg, filled_state_dict(0.0, 0))
    a, _, _ = fed.register("a", "cpu", 10, {})
    fed.tick()
    assert fed.state.participants == [a.node_id]
    a.last_seen_wall -= 3600
    fed.store.save_node(a.node_id, a.name, a.record())  # as if stored long ago, and then kill -9 (no stop)
    fed2 = Federation(cfg, filled_state_dict(0.0, 0))
    assert fed2.node_status(fed2.nodes[a.node_id]) == "training"
    fed2.tick()
    assert (fed2.phase, fed2.round, fed2.state.attempt) == (Phase.TRAINING, 1, 1)  # the round still waits for it
    fed2.stop()
    fed.stop()


def test_nodes_told_to_stop_are_gone_also_after_a_restart(make_app):
    app = make_app(communication_rounds=1)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client)
    fed.tick()
    post_update(client, node, 1, filled_state_dict(1.0, 1), {"num_samples": 10})
    fed.tick()
    assert client.get(f"{API}/task", headers=node["headers"]).get_json()["action"] == "stop"  # it exits now
    assert [n["status"] for n in client.get(f"{API}/status", headers=MONITOR).get_json()["nodes"]] == ["offline"]
    fed.stop()
    again = make_app(communication_rounds=1, keep_serving=True).test_client()
    assert [n["status"] for n in again.get(f"{API}/status", headers=MONITOR).get_json()["nodes"]] == ["offline"]


def test_a_failed_aggregation_backs_off_says_why_and_succeeds_later(make_app, fake_clock, monkeypatch, caplog):
    app = make_app(clock=fake_clock, min_nodes_to_start=1, communication_rounds=2)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, "a")
    fed.tick()
    assert post_update(client, node, 1, filled_state_dict(0.5, 1), {"num_samples": 10}).status_code == 202
    real_close, calls = closing.close_round, []

    def full_disk(*args, **kwargs):
        calls.append(fake_clock())
        if len(calls) <= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_close(*args, **kwargs)
    monkeypatch.setattr(closing, "close_round", full_disk)
    first = driver.AGGREGATION_RETRY_S[0]
    fed.tick()  # aggregation fails: the round stays in aggregation with its update
    assert (fed.phase, len(calls), len(fed.state.updates)) == (Phase.AGGREGATING, 1, 1)
    current = client.get(f"{API}/status", headers=MONITOR).get_json()["current_round"]
    assert "No space left on device" in current["aggregation_error"]
    assert current["aggregation_retry_in_s"] == pytest.approx(first)
    assert any("aggregation failed" in r.getMessage() and "trying again in 5s" in r.getMessage()
               for r in caplog.records)
    for _ in range(5):
        fed.tick()  # not every tick: it waits
    fake_clock.advance(first - 0.1)
    fed.tick()
    assert len(calls) == 1
    fake_clock.advance(0.2)
    fed.tick()  # fails again: the wait doubles
    assert len(calls) == 2 and fed.driver.failure[1] == pytest.approx(fake_clock() + 2 * first)
    fake_clock.advance(2 * first)
    fed.tick()
    assert len(calls) == 3 and fed.state.model_version == 1 and fed.driver.failure is None
    assert fed.state.history[-1].num_updates == 1
    assert client.get(f"{API}/status", headers=MONITOR).get_json()["current_round"]["aggregation_error"] is None


class ConvMeanEvaluator:
    """An evaluator whose metrics are a function of the model (the mean of conv1.weight) and that records the
    phase and round ``fed`` was in when it ran: (state_dict) -> {"loss", "accuracy"}."""

    def __init__(self) -> None:
        self.fed, self.seen = None, []

    def __call__(self, state_dict) -> dict:
        if self.fed is not None:
            self.seen.append((self.fed.phase, self.fed.round))
        value = float(state_dict["conv1.weight"].double().mean())
        return {"loss": abs(value), "accuracy": min(1.0, abs(value) / 10)}


def test_the_next_round_opens_before_the_coordinator_evaluates_the_last_one(make_app):
    """Issue 14: the coordinator's evaluation (about 0.8 s of a 4 s round) is off the critical path: round 2 is
    open (and stored) when round 1's global model is evaluated; the run's last round is evaluated before its
    commit, so the finished run's history is complete."""
    evaluator = ConvMeanEvaluator()
    app = make_app(min_nodes_to_start=2, communication_rounds=2, max_share=1.0, evaluator=evaluator)
    client, fed = app.test_client(), app.extensions["federation"]
    evaluator.fed = fed
    a, b = register(client, "a", num_samples=10), register(client, "b", num_samples=30)
    fed.tick()
    for number, (va, vb) in ((1, (1.0, 5.0)), (2, (2.0, 2.0))):
        post_update(client, a, number, filled_state_dict(va, 4), {"num_samples": 10})
        post_update(client, b, number, filled_state_dict(vb, 8), {"num_samples": 30})
        fed.tick()
    assert evaluator.seen == [(Phase.TRAINING, 2), (Phase.AGGREGATING, 2)]
    history = fed.state.history
    assert [r.test_loss for r in history] == [pytest.approx(expected_mean([(1.0, 10), (5.0, 30)])),
                                              pytest.approx(2.0)]
    assert not any(r.evaluation_pending for r in history) and fed.phase == Phase.FINISHED
    stored = RunStore(Path(fed.config.temp_dir) / "coordinator.sqlite3").history()
    assert [(r["test_loss"], r["evaluation_pending"]) for r in stored] == [(r.test_loss, False) for r in history]
    first = load_checkpoint(Path(fed.config.models_dir) / "global_model_round_1.pt")
    assert first["round"] == 1 and first["test_metrics"] == history[0].test_metrics


def test_a_restart_between_the_commit_and_the_evaluation_evaluates_once_more(make_app, monkeypatch):
    """Killed after round 1's commit but before its metrics are stored: the restarted coordinator evaluates
    global model 1 first, stores the same metrics and writes the user's checkpoint; round 2 is still open."""
    fed = round_1_with_two_updates(make_app, evaluator=ConvMeanEvaluator())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("kill -9 after the commit")

    monkeypatch.setattr(closing, "follow_up", crash)
    with pytest.raises(KeyboardInterrupt):
        fed.tick()
    monkeypatch.undo()
    stored = RunStore(Path(fed.config.temp_dir) / "coordinator.sqlite3").history()
    assert [(r["round"], r["test_loss"], r["evaluation_pending"]) for r in stored] == [(1, None, True)]
    assert not (Path(fed.config.models_dir) / "global_model_round_1.pt").exists()

    app2 = make_app(evaluator=ConvMeanEvaluator(), min_nodes_to_start=2, communication_rounds=3, max_share=1.0)
    fed2 = app2.extensions["federation"]
    assert (fed2.round, fed2.phase, fed2.model_version) == (2, Phase.TRAINING, 1)
    fed2.tick()
    record = fed2.state.history[0]
    assert not record.evaluation_pending and record.test_loss == pytest.approx(expected_mean([(1.0, 10), (5.0, 30)]))
    stored = RunStore(Path(fed2.config.temp_dir) / "coordinator.sqlite3").history()
    assert stored[0]["test_metrics"] == record.test_metrics and not stored[0]["evaluation_pending"]
    assert load_checkpoint(Path(fed2.config.models_dir) / "global_model_round_1.pt")["test_loss"] == record.test_loss
    assert (fed2.round, fed2.phase, len(fed2.state.history)) == (2, Phase.TRAINING, 1)


def test_a_database_error_after_the_evaluation_keeps_the_round_pending_and_is_retried(make_app, monkeypatch):
    """The metrics' row cannot be written (a database error the driver thread survives): the record stays
    pending in memory as on disk, and the next tick stores it without evaluating the model again."""
    evaluator = ConvMeanEvaluator()
    fed = round_1_with_two_updates(make_app, evaluator=evaluator)
    evaluator.fed = fed
    real_put = fed.store.put_history

    def failing_put(*args):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(fed.store, "put_history", failing_put)
    with pytest.raises(sqlite3.OperationalError):
        fed.tick()
    assert fed.state.history[0].evaluation_pending and fed.state.history[0].test_loss is None
    assert len(evaluator.seen) == 1 and (fed.round, fed.phase) == (2, Phase.TRAINING)
    monkeypatch.setattr(fed.store, "put_history", real_put)
    fed.tick()
    assert len(evaluator.seen) == 1  # evaluated once
    record = fed.state.history[0]
    assert not record.evaluation_pending and record.test_loss == pytest.approx(expected_mean([(1.0, 10), (5.0, 30)]))
    assert RunStore(Path(fed.config.temp_dir) / "coordinator.sqlite3").history()[0]["test_loss"] == record.test_loss


def test_without_an_evaluator_the_log_promises_no_evaluation(make_app, caplog):
    """--no-eval: the user's checkpoint is still written after the commit, but the "done" line says n/a (not
    "evaluating"), and no evaluation time is recorded, pending or not."""
    caplog.set_level("INFO", "fl.federation")
    fed = round_1_with_two_updates(make_app)
    fed.tick()
    assert "round 1/3 done: 2 updates, 40 samples, test accuracy n/a, test loss n/a" in caplog.text
    assert "evaluating" not in caplog.text
    record = fed.state.history[0]
    assert (record.evaluation_s, record.evaluation_pending) == (0.0, False)
    assert load_checkpoint(Path(fed.config.models_dir) / "global_model_round_1.pt")["round"] == 1
