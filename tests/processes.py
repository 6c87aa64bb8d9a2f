"""Helpers of the end-to-end tests: real coordinator and worker processes on 127.0.0.1, always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest

import torch

from fedrest.client import CoordinatorClient, CoordinatorError, CoordinatorUnreachable, make_session
from fedrest.serialization import bytes_to_state_dict, state_dict_to_bytes

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "e2e-join-token-0123"
MONITOR_TOKEN = "e2e-monitor-token-0123"  # read-only: status, metrics, dashboard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Starts the project's programs with their output in files under ``workdir``; :meth:`stop_all` ends them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}

    def start(self, name: str, script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        self.starts[name] = self.starts.get(name, 0) + 1
        log_name = name if self.starts[name] == 1 else f"{name}.{self.starts[name]}"
        out = open(self.workdir / f"{log_name}.out", "wb")
        proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=self.workdir, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        out.close()
        self.procs[name] = proc
        return proc

    def coordinator(self, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
        return self.start("coordinator", "coordinator.py", "--host", "127.0.0.1", "--port", str(port),
                          "--token", TOKEN, "--monitor-token", MONITOR_TOKEN, "--heartbeat-interval", "1",
                          "--keep-serving", *args, env=env)

    def worker(self, name: str, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
        return self.start(name, "worker.py", "--coordinator-address", f"127.0.0.1:{port}", "--token", TOKEN,
                          "--cpu", "--name", name, "--quiet", "--cpu-workers", "1", *args, env=env)

    def output(self, name: str) -> str:
        texts = []
        for n in range(1, self.starts.get(name, 1) + 1):
            path = self.workdir / (f"{name}.out" if n == 1 else f"{name}.{n}.out")
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def kill(self, name: str) -> None:
        """kill -9."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

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

    def dump(self) -> str:
        return "\n".join(f"--- {n}\n{self.output(n)[-2500:]}" for n in self.procs)


def status_client(port: int) -> CoordinatorClient:
    return CoordinatorClient(f"127.0.0.1:{port}", token=MONITOR_TOKEN, session=make_session(total_retries=0))


def try_status(client: CoordinatorClient) -> dict | None:
    try:
        return client.status()
    except (CoordinatorUnreachable, CoordinatorError):
        return None


def wait_for(predicate, timeout: float, what: str, procs: Processes, allow_exit: tuple = ()):
    """Poll ``predicate`` until it returns a true value; fail with every process's output on timeout or when a
    process (other than those in ``allow_exit``) died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for name, proc in procs.procs.items():
            if name not in allow_exit and proc.poll() not in (None, 0):
                pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}:\n{procs.dump()}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{procs.dump()}")


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop_all()


def filled_like(reference, value: float, count: int) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, torch.full_like(v, value if v.is_floating_point() else count)) for k, v in reference.items())


class FakeWorker:
    """The test acting as a worker through the real HTTP API (so it controls exactly what is uploaded)."""

    def __init__(self, port: int, name: str, num_samples: int) -> None:
        self.client = CoordinatorClient(f"127.0.0.1:{port}", session=make_session(total_retries=2))
        answer, _ = self.client.register(name, "cpu", num_samples, {}, TOKEN)
        self.node_id, self.client.token, self.num_samples = answer["node_id"], answer["node_token"], num_samples

    def upload(self, round_number: int, value: float, count: int, control: float | None = None) -> dict:
        """Upload the global model's keys filled with ``value`` (integers with ``count``); with ``control``
        (SCAFFOLD), a control-variate change of the coordinator's c's keys filled with it."""
        _, data = self.client.model()
        update = filled_like(bytes_to_state_dict(data), value, count)
        control_bytes = None
        if control is not None:
            _, c = self.client.control_variate()
            control_bytes = state_dict_to_bytes(filled_like(bytes_to_state_dict(c), control, 0))
        return self.client.submit_update(round_number, {"num_samples": self.num_samples},
                                         state_dict_to_bytes(update), control_bytes)
