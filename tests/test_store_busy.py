"""F22: another process holds the run database's write lock (an operator's sqlite3 shell, a backup). Writes fail
fast with 503 ``store_busy`` and change nothing; heartbeats, task polls and the status keep answering from memory;
the round driver decides again (or commits its aggregated round) once the database is free."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import API, MONITOR, FakeClock, filled_state_dict, fingerprint, post_update, register
from fedrest.server import closing
from fedrest.server.federation import Phase
from fedrest.server.state_dir import DB_NAME
from fedrest.server.store import BUSY_HOLD_OFF_S, BUSY_TIMEOUT_S, RunStore, StoreBusy


@contextmanager
def held_write_lock(path: Path):
    """What `sqlite3 coordinator.sqlite3` then `BEGIN IMMEDIATE;` does: another connection holds the write lock."""
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_a_write_to_a_locked_database_fails_fast_then_at_once_and_succeeds_when_it_is_free(tmp_path):
    clock = FakeClock()
    store = RunStore(tmp_path / DB_NAME, clock=clock)
    store.put({"round": 1})
    with held_write_lock(store.path):
        t0 = time.perf_counter()
        with pytest.raises(StoreBusy, match="locked by another process") as first:
            store.put({"round": 2})
        assert time.perf_counter() - t0 < BUSY_TIMEOUT_S + 0.3  # waited about BUSY_TIMEOUT_S, not 30 s
        assert first.value.retry_after_s == BUSY_HOLD_OFF_S
        t0 = time.perf_counter()
        with pytest.raises(StoreBusy):  # within the hold-off: refused without waiting on SQLite at all
            store.put({"round": 2})
        assert time.perf_counter() - t0 < 0.05
        assert store.get("round") == 1  # reads are not blocked by a writer (WAL)
    with pytest.raises(StoreBusy):  # free now, but still within the hold-off
        store.put({"round": 2})
    clock.advance(BUSY_HOLD_OFF_S)
    store.put({"round": 2})
    assert store.get("round") == 2
    store.close()


def test_a_transaction_rolls_back_what_its_block_wrote_when_the_block_raises(tmp_path):
    store = RunStore(tmp_path / DB_NAME)
    store.put({"round": 1})
    with pytest.raises(KeyError):
        with store.transaction():
            store.put({"round": 2})
            store.save_node("n1", "node-1", {"node_id": "n1"})
            raise KeyError("a check failed after the writes")
    assert store.get("round") == 1 and store.nodes() == []
    with store.transaction():  # nested methods join one transaction that commits at the end
        store.put({"round": 3})
        store.save_node("n1", "node-1", {"node_id": "n1"})
    assert store.get("round") == 3 and store.nodes() == [{"node_id": "n1"}]
    store.close()


def test_a_locked_database_gives_a_fast_503_and_changes_nothing_while_heartbeats_polls_and_status_answer(
        app, client, fed, cfg, caplog):
    node = register(client, "node-a")
    fed.tick()
    assert (fed.phase, fed.round) == (Phase.TRAINING, 1)
    before = fingerprint(app)
    with caplog.at_level(logging.WARNING, "fl.federation"), held_write_lock(Path(cfg.temp_dir) / DB_NAME):
        t0 = time.perf_counter()
        joined = client.post(f"{API}/nodes", headers={"Authorization": f"Bearer {JOIN_TOKEN()}"},
                             json={"name": "node-b", "device": "cpu", "num_samples": 10})
        assert time.perf_counter() - t0 < 1.0
        assert joined.status_code == 503 and joined.get_json()["error"] == "store_busy"
        assert 0 < joined.get_json()["retry_after_s"] <= BUSY_HOLD_OFF_S + 1 and "Retry-After" in joined.headers
        upload = post_update(client, node, 1, filled_state_dict(0.5, 1), {"num_samples": 10})
        assert upload.status_code == 503 and upload.get_json()["error"] == "store_busy"
        assert fingerprint(app)[:-1] == before[:-1] and fed.state.updates == {}
        assert list((Path(cfg.temp_dir) / "updates").rglob("*.*")) == []  # the upload left no file
        t0 = time.perf_counter()
        assert client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"]).status_code == 200
        assert client.get(f"{API}/task", headers=node["headers"]).get_json()["action"] == "train"
        assert client.get(f"{API}/status", headers=MONITOR).status_code == 200
        assert client.get(f"{API}/health").status_code == 200
        assert time.perf_counter() - t0 < 1.0  # memory reads: not behind the blocked write
    assert fed.requests_refused_total["store_busy"] == 2
    assert sum("locked by another process" in r.getMessage() for r in caplog.records) == 1  # once per episode

    time.sleep(BUSY_HOLD_OFF_S)
    assert post_update(client, node, 1, filled_state_dict(0.5, 1), {"num_samples": 10}).status_code == 202
    register(client, "node-b")
    assert any("writable again" in r.getMessage() for r in caplog.records)


def test_the_driver_changes_nothing_while_the_database_is_locked_and_goes_on_when_it_is_free(make_app, tmp_path):
    app = make_app(min_nodes_to_start=1)
    client, fed = app.test_client(), app.extensions["federation"]
    register(client, "node-a")
    with held_write_lock(Path(fed.config.temp_dir) / DB_NAME):
        fed.tick()  # round 1 is due, but its opening cannot be stored
        assert (fed.phase, fed.round, fed.state.participants) == (Phase.WAITING, 0, [])
    time.sleep(BUSY_HOLD_OFF_S)
    fed.tick()
    assert (fed.phase, fed.round) == (Phase.TRAINING, 1)
    assert fed.store.get("phase") == "training" and fed.store.get("round") == 1


def test_an_aggregated_round_commits_once_the_database_is_free(make_app, monkeypatch, caplog):
    app = make_app(min_nodes_to_start=1)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, "node-a")
    fed.tick()
    assert post_update(client, node, 1, filled_state_dict(0.5, 1), {"num_samples": 10}).status_code == 202
    other = sqlite3.connect(Path(fed.config.temp_dir) / DB_NAME, isolation_level=None, timeout=0,
                            check_same_thread=False)
    write_round_files = closing.write_round_files

    def then_lock(*args, **kwargs):  # another process takes the lock while the round's files are written
        write_round_files(*args, **kwargs)
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(1.5, lambda: other.execute("ROLLBACK")).start()
    monkeypatch.setattr(closing, "write_round_files", then_lock)
    heartbeats = []  # (seconds the heartbeat took, its status code), one every 0.1 s while the round commits

    def beat():
        for _ in range(20):
            time.sleep(0.1)
            t0 = time.perf_counter()
            code = client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"]).status_code
            heartbeats.append((time.perf_counter() - t0, code))
    with caplog.at_level(logging.WARNING, "fl.federation"):
        beating = threading.Thread(target=beat)
        t0 = time.perf_counter()
        beating.start()
        fed.tick()  # closes round 1, aggregates, and commits it once the database is free
        waited = time.perf_counter() - t0
        beating.join()
    other.close()
    assert waited >= 1.5  # the commit waited for the database...
    assert [code for _, code in heartbeats] == [200] * 20
    # ...without holding the federation's lock meanwhile: a heartbeat waits at most for one write attempt
    # (BUSY_TIMEOUT_S = 0.2 s), never for the BUSY_HOLD_OFF_S (1 s) between two attempts, which one of the
    # heartbeats sent every 0.1 s would wait at least 0.9 s of
    assert max(seconds for seconds, _ in heartbeats) < 0.7 * BUSY_HOLD_OFF_S, heartbeats
    assert (fed.model_version, fed.store.get("model_version")) == (1, 1)
    assert [r.round for r in fed.state.history] == [1]
    assert any("the round goes on once it is free" in r.getMessage() for r in caplog.records)


def JOIN_TOKEN() -> str:  # noqa: N802 - the join token of the test configuration
    from conftest import JOIN_TOKEN as token
    return token
