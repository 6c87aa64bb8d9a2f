"""Fault injection with real processes on 127.0.0.1: kill -9 workers and the coordinator at chosen moments,
take the coordinator away for 30 s, cut uploads in the middle, skew a worker's clock. Each test asserts what
was recovered (rounds, updates, the weighted mean) and prints how long recovery took."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time

import pytest
import requests
import torch

from fedrest.client import CoordinatorError
from fedrest.server.checkpoints import load_checkpoint
from processes import (ROOT, TOKEN, FakeWorker, free_port, procs, status_client, try_status,  # noqa: F401
                       wait_for)
from fedrest.serialization import bytes_to_state_dict, state_dict_to_bytes

pytestmark = pytest.mark.e2e


def weighted(pairs) -> float:
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)


def wait_state(port: int, procs, predicate, timeout: float, what: str, allow_exit=()) -> dict:
    client = status_client(port)

    def check():
        status = try_status(client)
        return status if status is not None and predicate(status) else None

    return wait_for(check, timeout, what, procs, allow_exit)


# ----------------------------------------------------------------------------- workers die


def test_worker_killed_mid_training_round_completes_and_it_rejoins(procs):
    port = free_port()
    procs.coordinator(port, "--rounds", "2", "--min-nodes", "3", "--round-timeout", "20", "--node-timeout", "60",
                      "--local-epochs", "2")
    for i in range(3):
        procs.worker(f"w{i}", port, "--partition-id", str(i), "--num-partitions", "3")
    status = wait_state(port, procs, lambda s: s["state"] == "training" and s["round"] == 1, 120,
                        "round 1 to start")
    victim = next(n for n in status["nodes"] if n["name"] == "w2")
    # w2 downloads the global model, then trains at once (2 epochs take several seconds): kill it in training
    wait_for(lambda: "downloaded global model version 0" in procs.output("w2"), 60, "w2 to start training", procs)
    assert "update sent" not in procs.output("w2")
    procs.kill("w2")
    killed_at = time.monotonic()
    status = wait_state(port, procs, lambda s: len(s["history"]) >= 1, 120, "round 1 to close", allow_exit=("w2",))
    closed_after = time.monotonic() - killed_at
    assert status["history"][0]["num_updates"] == 2
    assert victim["node_id"] not in status["history"][0]["node_ids"]
    procs.worker("w2", port, "--partition-id", "2", "--num-partitions", "3")  # restarted with the same name
    status = wait_state(port, procs, lambda s: s["state"] == "finished", 180, "round 2 to finish")
    assert [r["num_updates"] for r in status["history"]] == [2, 3]
    w2 = next(n for n in status["nodes"] if n["name"] == "w2")
    assert w2["node_id"] == victim["node_id"] and w2["rounds_contributed"] == [2]
    print(f"\nworker kill -9 mid-training: round 1 closed {closed_after:.1f}s later with 2 of 3 updates; "
          f"the restarted worker contributed to round 2 as node {w2['node_id']}")


# ----------------------------------------------------------------------------- the coordinator dies


def test_coordinator_killed_after_k_of_n_updates_loses_none(procs):
    port = free_port()
    args = ("--rounds", "2", "--min-nodes", "3", "--no-eval", "--round-timeout", "120")
    procs.coordinator(port, *args)
    wait_state(port, procs, lambda s: True, 60, "the coordinator to answer")
    workers = [FakeWorker(port, f"f{i}", n) for i, n in enumerate((10, 20, 30))]
    wait_state(port, procs, lambda s: s["state"] == "training", 30, "round 1")
    assert workers[0].upload(1, 1.0, 1)["accepted"]
    assert workers[1].upload(1, 2.0, 2)["accepted"]  # k = 2 of n = 3 acknowledged
    procs.kill("coordinator")
    restarted = time.monotonic()
    procs.coordinator(port, *args)
    status = wait_state(port, procs, lambda s: True, 60, "the restarted coordinator")
    recovered = time.monotonic() - restarted
    assert (status["round"], status["state"], status["current_round"]["updates_received"]) == (1, "training", 2)
    with pytest.raises(CoordinatorError) as duplicate:  # the node tokens survived; a retry counts once
        workers[0].upload(1, 1.0, 1)
    assert duplicate.value.error == "duplicate_update"
    assert workers[2].upload(1, 3.0, 3)["accepted"]
    wait_state(port, procs, lambda s: s["model_version"] == 1, 60, "round 1 to be aggregated")
    version, data = workers[0].client.model()
    model = bytes_to_state_dict(data)
    assert version == 1
    assert torch.allclose(model["fc1.weight"], torch.full_like(model["fc1.weight"],
                                                               weighted([(1.0, 10), (2.0, 20), (3.0, 30)])))
    assert model["bn1.num_batches_tracked"].item() == round(weighted([(1, 10), (2, 20), (3, 30)]))
    for w in workers:
        w.upload(2, 0.5, 1)
    status = wait_state(port, procs, lambda s: s["state"] == "finished", 60, "round 2")
    assert [(r["round"], r["num_updates"], r["num_samples"]) for r in status["history"]] == [(1, 3, 60), (2, 3, 60)]
    print(f"\ncoordinator kill -9 after 2 of 3 updates: back in {recovered:.1f}s with both updates; "
          f"the round finished with all 3")


@pytest.mark.parametrize("failpoint", ["aggregate.before_commit", "checkpoint.between_files",
                                       "atomic_write.before_replace=30@3"])
def test_coordinator_killed_during_aggregation_or_checkpoint_recovers_consistently(procs, tmp_path, failpoint):
    port = free_port()
    args = ("--rounds", "2", "--min-nodes", "2", "--no-eval", "--round-timeout", "60", "--max-share", "1")
    spec = failpoint if "=" in failpoint else f"{failpoint}=30"
    procs.coordinator(port, *args, env={"FL_FAILPOINTS": spec})
    wait_state(port, procs, lambda s: True, 60, "the coordinator to answer")
    a, b = FakeWorker(port, "a", 10), FakeWorker(port, "b", 30)
    wait_state(port, procs, lambda s: s["state"] == "training", 30, "round 1")
    a.upload(1, 1.0, 2)
    b.upload(1, 3.0, 6)
    name = spec.split("=")[0]
    wait_for(lambda: f"failpoint {name} reached" in procs.output("coordinator"), 60, f"failpoint {name}", procs)
    procs.kill("coordinator")
    leftovers = [p.name for p in (tmp_path / "models").glob(".*.tmp")] + \
                [p.name for p in (tmp_path / "temp").rglob(".*.tmp")]
    procs.coordinator(port, *args)
    # round 1 committed, and its checkpoint written (again, after a kill between the files) before it is read
    status = wait_state(port, procs, lambda s: s["model_version"] == 1 and not s["history"][0]["evaluation_pending"],
                        60, "round 1 after the restart")
    assert [r["num_updates"] for r in status["history"]] == [2] and status["round"] == 2
    expected = weighted([(1.0, 10), (3.0, 30)])
    _, data = a.client.model()
    assert torch.allclose(bytes_to_state_dict(data)["conv2.weight"], torch.full((64, 32, 3, 3), expected))
    # every model file on disk is whole: it loads, and it is round 1's aggregate
    for path in (tmp_path / "models").glob("*.pt"):
        checkpoint = load_checkpoint(path)
        assert checkpoint["round"] == 1
        assert torch.allclose(checkpoint["state_dict"]["conv2.weight"], torch.full((64, 32, 3, 3), expected))
    assert not list((tmp_path / "models").glob(".*.tmp"))  # interrupted writes were cleaned up
    a.upload(2, 1.0, 1)
    b.upload(2, 1.0, 1)
    wait_state(port, procs, lambda s: s["state"] == "finished", 60, "round 2")
    print(f"\ncoordinator kill -9 at {name}: temporary files at the kill {leftovers}; the restart completed "
          f"round 1 once, weighted mean {expected}")


@pytest.mark.parametrize("failpoint", ["aggregate.before_commit", "checkpoint.between_files"])
def test_sigterm_lets_an_aggregation_or_checkpoint_write_in_progress_finish_and_the_next_start_resumes(
        procs, tmp_path, failpoint):
    """SIGTERM while round 1 is aggregated (before its commit) or while its checkpoint files are written: the
    coordinator finishes that work, exits 0, and the next start goes on from round 2 without aggregating or
    writing round 1 again."""
    port = free_port()
    args = ("--rounds", "2", "--min-nodes", "2", "--no-eval", "--round-timeout", "60", "--max-share", "1")
    procs.coordinator(port, *args, env={"FL_FAILPOINTS": f"{failpoint}=3"})
    wait_state(port, procs, lambda s: True, 60, "the coordinator to answer")
    a, b = FakeWorker(port, "a", 10), FakeWorker(port, "b", 30)
    wait_state(port, procs, lambda s: s["state"] == "training", 30, "round 1")
    a.upload(1, 1.0, 2)
    b.upload(1, 3.0, 6)
    wait_for(lambda: f"failpoint {failpoint} reached" in procs.output("coordinator"), 60, failpoint, procs)
    coordinator = procs.procs["coordinator"]
    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(30) == 0, procs.output("coordinator")
    first = procs.output("coordinator")
    assert first.index(f"failpoint {failpoint} reached") < first.index("received SIGTERM")
    with sqlite3.connect(tmp_path / "temp" / "coordinator.sqlite3") as db:  # round 1 was committed, and complete
        rows = db.execute("SELECT round, record FROM history").fetchall()
    assert [r for r, _ in rows] == [1] and json.loads(rows[0][1])["evaluation_pending"] is False
    expected = weighted([(1.0, 10), (3.0, 30)])
    for name in ("global_model_round_1.pt", "global_model.pt"):  # both checkpoint files written, whole
        checkpoint = load_checkpoint(tmp_path / "models" / name)
        assert checkpoint["round"] == 1
        assert torch.allclose(checkpoint["state_dict"]["conv2.weight"], torch.full((64, 32, 3, 3), expected))
    procs.coordinator(port, *args)
    status = wait_state(port, procs, lambda s: s["state"] == "training" and s["round"] == 2, 60, "round 2")
    assert [r["num_updates"] for r in status["history"]] == [2]
    a.upload(2, 1.0, 1)
    b.upload(2, 1.0, 1)
    wait_state(port, procs, lambda s: s["state"] == "finished", 60, "round 2 to finish")
    second = procs.output("coordinator")[len(first):]
    assert "aggregating the" not in second and "failpoint" not in second


def _evaluated_run(procs, label: str, failpoint: str | None = None) -> list:
    """Two rounds of two fake workers with the coordinator's evaluation on (the MNIST test split); with
    ``failpoint`` the coordinator is killed when it pauses there in round 1 and started again. Returns
    (round, test_loss, test_accuracy, the user's checkpoint's test_loss) per round."""
    port = free_port()
    args = ("--rounds", "2", "--min-nodes", "2", "--round-timeout", "60", "--max-share", "1",
            "--temp-dir", f"temp-{label}", "--models-dir", f"models-{label}")
    procs.coordinator(port, *args, env={"FL_FAILPOINTS": failpoint} if failpoint else None)
    wait_state(port, procs, lambda s: True, 60, "the coordinator to answer")
    a, b = FakeWorker(port, "a", 10), FakeWorker(port, "b", 30)
    for number, (va, vb) in ((1, (0.002, 0.004)), (2, (-0.001, 0.003))):
        wait_state(port, procs, lambda s, n=number: s["state"] == "training" and s["round"] == n, 60, f"round {number}")
        for worker, value in ((a, va), (b, vb)):  # the global model moved by ``value``: each round's differs
            _, data = worker.client.model()
            update = {k: v + value if v.is_floating_point() else v for k, v in bytes_to_state_dict(data).items()}
            worker.client.submit_update(number, {"num_samples": worker.num_samples}, state_dict_to_bytes(update))
        if failpoint and number == 1:
            reached = f"failpoint {failpoint.split('=')[0]} reached"
            wait_for(lambda text=reached: text in procs.output("coordinator"), 60, reached, procs)
            procs.kill("coordinator")
            procs.coordinator(port, *args)
    status = wait_state(port, procs, lambda s: s["state"] == "finished", 60, "the last round")
    procs.stop_all()
    models = procs.workdir / f"models-{label}"
    return [(r["round"], r["test_loss"], r["test_accuracy"], r["evaluation_pending"],
             load_checkpoint(models / f"global_model_round_{r['round']}.pt")["test_loss"]) for r in status["history"]]


@pytest.mark.parametrize("failpoint", ["round.after_commit=30@1", "follow_up.before_checkpoint=30@1",
                                       "follow_up.before_store=30@1"])
def test_killed_between_a_commit_and_its_evaluation_resumes_exactly(procs, failpoint):
    """Issue 14: the coordinator evaluates round r's global model (and writes the user's checkpoint) after the
    commit, while round r+1 trains. Killed with -9 at each step of that, the restarted coordinator evaluates
    again: the same test metrics in the history and in the checkpoints as a run that was not killed."""
    straight = _evaluated_run(procs, "straight")
    killed = _evaluated_run(procs, "killed", failpoint)
    assert killed == straight
    assert all(loss is not None and loss == saved for _, loss, _, _, saved in killed)
    assert killed[0][1] != killed[1][1]  # two different models, told apart
    print(f"\nkill -9 at {failpoint.split('=')[0]} of round 1: history and checkpoints equal the straight run's "
          f"({killed})")


def test_coordinator_down_30s_workers_wait_and_the_run_completes(procs):
    port = free_port()
    args = ("--rounds", "3", "--min-nodes", "2", "--round-timeout", "300")
    procs.coordinator(port, *args)
    for i in range(2):
        procs.worker(f"w{i}", port, "--partition-id", str(i), "--num-partitions", "4")
    wait_state(port, procs, lambda s: len(s["history"]) == 1, 120, "round 1")
    procs.kill("coordinator")
    time.sleep(30)
    for i in range(2):
        assert procs.procs[f"w{i}"].poll() is None, procs.output(f"w{i}")  # still waiting, not crashed
    restarted = time.monotonic()
    procs.coordinator(port, *args)
    status = wait_state(port, procs, lambda s: s["state"] == "finished", 180, "the run to finish")
    assert [r["round"] for r in status["history"]] == [1, 2, 3]
    assert all(r["num_updates"] == 2 for r in status["history"])
    for i in range(2):
        assert procs.procs[f"w{i}"].wait(30) == 0
        assert "Traceback" not in procs.output(f"w{i}")
    print(f"\ncoordinator down 30 s after round 1: rounds 2-3 finished {time.monotonic() - restarted:.1f}s "
          f"after the restart")


# ----------------------------------------------------------------------------- the network breaks


class CuttingProxy:
    """A loopback TCP proxy that breaks the first update upload it sees (connections are kept alive, so each
    chunk from the worker is checked for the start of ``POST .../updates``): ``mode="request"`` forwards the
    first chunk of that request and closes the connection; ``mode="response"`` forwards the whole request but
    drops the coordinator's answer."""

    def __init__(self, target_port: int, mode: str) -> None:
        self.target, self.mode, self.cuts = target_port, mode, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the coordinator is not up yet: the worker sees a refused connection
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            state = {"drop_answer": False}
            threading.Thread(target=self._upstream, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, state), daemon=True).start()

    def _claim_cut(self, chunk: bytes) -> bool:
        with self._lock:
            if self.cuts == 0 and chunk.startswith(b"POST ") and b"/updates" in chunk.split(b"\r\n", 1)[0]:
                self.cuts = 1
                return True
        return False

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _upstream(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        try:
            while chunk := client.recv(65536):
                cut = self._claim_cut(chunk)
                server.sendall(chunk)
                if cut and self.mode == "request":
                    break  # the rest of the upload never arrives
                if cut:
                    state["drop_answer"] = True
        except OSError:
            pass
        self._close(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while chunk := server.recv(65536):
                if state["drop_answer"]:
                    break  # the coordinator answered; the worker never hears it
                client.sendall(chunk)
        except OSError:
            pass
        self._close(client, server)


@pytest.mark.parametrize("mode", ["request", "response"])
def test_upload_cut_in_the_middle_is_retried_and_counted_once(procs, mode):
    port = free_port()
    procs.coordinator(port, "--rounds", "1", "--min-nodes", "1", "--round-timeout", "120")
    proxy = CuttingProxy(port, mode)
    try:
        procs.start("w0", "worker.py", "--coordinator-address", f"127.0.0.1:{proxy.port}", "--token", TOKEN,
                    "--cpu", "--name", "w0", "--quiet", "--cpu-workers", "1", "--partition-id", "0",
                    "--num-partitions", "8")
        status = wait_state(port, procs, lambda s: s["state"] == "finished", 120, "the round")
        assert procs.procs["w0"].wait(30) == 0
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert status["history"][0]["num_updates"] == 1 and status["history"][0]["num_samples"] == 500
    assert status["nodes"][0]["updates_submitted"] == 1
    print(f"\nupload cut ({mode}): retried by the worker, counted once")


# ----------------------------------------------------------------------------- liveness


def test_skewed_clock_and_training_longer_than_node_timeout_never_look_offline(procs):
    port = free_port()
    procs.coordinator(port, "--rounds", "1", "--min-nodes", "2", "--node-timeout", "2", "--round-timeout", "120",
                      "--local-epochs", "6")
    skew = {"PYTHONPATH": str(ROOT / "tests" / "clock_skew")}
    procs.worker("skewed", port, "--partition-id", "0", "--num-partitions", "4", env=skew)
    procs.worker("plain", port, "--partition-id", "1", "--num-partitions", "4")
    client = status_client(port)
    seen, started = set(), None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = try_status(client)
        if status is not None:
            if status["state"] == "training" and started is None:
                started = time.monotonic()
            if started is not None and status["state"] != "finished":  # once told to stop, a node is gone
                seen.update((n["name"], n["status"]) for n in status["nodes"])
            if status["state"] == "finished":
                break
        time.sleep(0.2)
    assert status["state"] == "finished", procs.dump()
    training_s = max(r["max_train_seconds"] for r in status["history"])
    assert training_s > 4, "local training must outlast NODE_TIMEOUT for this test to mean anything"
    assert ("skewed", "training") in seen and ("plain", "training") in seen
    assert not any(s == "offline" for _, s in seen), seen
    assert status["history"][0]["num_updates"] == 2
    assert "+3600" not in procs.output("skewed")
    print(f"\nclock one hour ahead and {training_s:.1f}s of training with NODE_TIMEOUT=2s: never offline")


def test_worker_training_when_its_round_closes_drops_the_work_and_leaves_on_sigterm(procs):
    port = free_port()
    procs.coordinator(port, "--rounds", "3", "--min-nodes", "2", "--round-timeout", "6", "--local-epochs", "4")
    procs.worker("fast", port, "--partition-id", "0", "--num-partitions", "16")  # 250 examples
    procs.worker("slow", port)  # all 4,000 examples: 4 epochs take far longer than 6 s
    wait_state(port, procs, lambda s: len(s["history"]) >= 2, 120, "two rounds")
    wait_for(lambda: "closed while this node was training; dropping the work" in procs.output("slow"), 30,
             "the slow worker to drop its work", procs)
    slow_log = procs.output("slow")
    assert "update not taken" not in slow_log  # it never finished and sent work of a closed round
    assert "round 2: trained" not in slow_log
    status = try_status(status_client(port))
    slow = next(n for n in status["nodes"] if n["name"] == "slow")
    assert slow["updates_submitted"] == 0 and all(r["num_updates"] == 1 for r in status["history"])
    # SIGTERM: the worker tells the coordinator it leaves, exits 0, and is offline at once
    procs.procs["slow"].terminate()
    assert procs.procs["slow"].wait(20) == 0
    status = try_status(status_client(port))
    assert next(n for n in status["nodes"] if n["name"] == "slow")["status"] == "offline"
    assert "Traceback" not in procs.output("slow")


# ----------------------------------------------------------------------------- the database held by another process


def test_a_locked_database_answers_503_at_once_heartbeats_answer_and_a_worker_joins_once_it_is_free(procs, tmp_path):
    """F22 with real processes: an operator's sqlite3 session holds the run database's write lock. A registration
    is answered 503 store_busy within a second (not after 30 s), heartbeats and the status keep answering, a
    real worker keeps trying, and once the lock goes the worker joins and the round completes."""
    port = free_port()
    procs.coordinator(port, "--rounds", "1", "--min-nodes", "2", "--no-eval")
    status = status_client(port)
    wait_for(lambda: try_status(status), 60, "the coordinator", procs)
    fake = FakeWorker(port, "fake", 100)
    shell = sqlite3.connect(tmp_path / "temp" / "coordinator.sqlite3", isolation_level=None, timeout=5)
    shell.execute("BEGIN IMMEDIATE")  # what `sqlite3 temp/coordinator.sqlite3` then `BEGIN IMMEDIATE;` does
    try:
        t0 = time.monotonic()
        answer = requests.post(f"http://127.0.0.1:{port}/api/v1/nodes", headers={"Authorization": f"Bearer {TOKEN}"},
                               json={"name": "other", "device": "cpu", "num_samples": 10}, timeout=10)
        assert time.monotonic() - t0 < 1.5
        assert answer.status_code == 503 and answer.json()["error"] == "store_busy" and "Retry-After" in answer.headers
        procs.worker("w0", port, "--num-partitions", "5", "--partition-id", "0")
        wait_state(port, procs, lambda s: s["requests_refused_total"].get("store_busy", 0) >= 2, 60,
                   "the worker's registration to be answered store_busy")  # the first was ours
        t0 = time.monotonic()
        assert fake.client.heartbeat(fake.node_id)["node_id"] == fake.node_id
        assert try_status(status)["node_counts"]["online"] == 1  # the worker has not joined
        assert time.monotonic() - t0 < 1.0
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    wait_state(port, procs, lambda s: s["state"] == "training", 60, "the worker to join and round 1 to open")
    assert fake.upload(1, 0.5, 1)["accepted"]
    done = wait_state(port, procs, lambda s: s["state"] == "finished", 120, "round 1 to finish")
    assert done["history"][0]["num_updates"] == 2
    assert "locked by another process" in procs.output("coordinator")
    assert "writable again" in procs.output("coordinator")
