"""End to end over real processes on 127.0.0.1: HTTPS with a generated certificate, and rate limiting."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fedrest.client import CoordinatorClient, CoordinatorError, CoordinatorUnreachable, make_session
from make_cert import write_pair
from processes import MONITOR_TOKEN, ROOT, TOKEN, free_port, procs, wait_for  # noqa: F401 - procs is a fixture

pytestmark = pytest.mark.e2e


def _worker(procs, name: str, address: str, *args: str):
    return procs.start(name, "worker.py", "--coordinator-address", address, "--token", TOKEN, "--cpu", "--name",
                       name, "--quiet", "--cpu-workers", "1", "--partition-id", name[-1], "--num-partitions", "4",
                       *args)


def test_https_coordinator_two_workers_and_the_text_monitor(procs, tmp_path):
    cert, key = write_pair(tmp_path / "certs", ["127.0.0.1", "localhost"])
    port = free_port()
    address = f"https://127.0.0.1:{port}"
    procs.coordinator(port, "--rounds", "1", "--min-nodes", "2", "--certfile", str(cert), "--keyfile", str(key))
    status_client = CoordinatorClient(address, token=MONITOR_TOKEN,
                                      session=make_session(total_retries=0, ca_cert=str(cert)))

    def status():
        try:
            return status_client.status()
        except (CoordinatorUnreachable, CoordinatorError):
            return None

    wait_for(status, 120, "the HTTPS coordinator", procs)
    # a worker that does not trust the certificate refuses to talk, with a clear message, and stops
    stranger = _worker(procs, "s3", address)
    assert stranger.wait(60) == 1
    assert "cannot verify the TLS certificate" in procs.output("s3") and "--ca-cert" in procs.output("s3")
    # the seed's address form (plain HOST:PORT, i.e. http://) against this HTTPS coordinator: told, not retried
    plain = _worker(procs, "p2", f"127.0.0.1:{port}")
    assert plain.wait(60) == 1
    assert f"speaks TLS (HTTPS), not plain HTTP: use --coordinator-address https://127.0.0.1:{port}" in \
        procs.output("p2")
    for name in ("w0", "w1"):
        _worker(procs, name, address, "--ca-cert", str(cert))
    final = wait_for(lambda: (s := status()) and s["state"] == "finished" and s, 300, "the round over TLS", procs,
                     allow_exit=("s3", "p2"))
    assert final["history"][0]["num_updates"] == 2 and final["history"][0]["test_accuracy"] > 0.5
    assert {n["name"] for n in final["nodes"]} == {"w0", "w1"}  # the stranger never registered

    shown = subprocess.run([sys.executable, str(ROOT / "text_monitor.py"), "--coordinator-address", address,
                            "--token", MONITOR_TOKEN, "--ca-cert", str(cert), "--once"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "finished" in shown.stdout and "w0" in shown.stdout
    untrusted = subprocess.run([sys.executable, str(ROOT / "text_monitor.py"), "--coordinator-address", address,
                                "--token", MONITOR_TOKEN, "--once"],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert untrusted.returncode != 0 and "cannot verify the TLS certificate" in untrusted.stdout + untrusted.stderr
    for name in ("w0", "w1"):
        assert procs.procs[name].wait(30) == 0, procs.output(name)
    logs = "".join(procs.output(n) for n in procs.procs) + (tmp_path / "logs" / "coordinator.log").read_text()
    assert TOKEN not in logs and MONITOR_TOKEN not in logs  # no token is ever logged
    assert "serving plain HTTP" not in procs.output("coordinator")


def test_a_rate_limited_worker_backs_off_and_completes_its_round(procs, tmp_path):
    port = free_port()
    procs.coordinator(port, "--rounds", "1", "--min-nodes", "1", "--rate-limit", "0.4")  # bursts of 2 requests
    _worker(procs, "w0", f"127.0.0.1:{port}")
    monitor = CoordinatorClient(f"127.0.0.1:{port}", token=MONITOR_TOKEN, session=make_session(total_retries=0))
    deadline, final = time.monotonic() + 300, None
    while time.monotonic() < deadline and final is None:
        time.sleep(3.0)  # slower than the limit: this monitor is never refused itself
        try:
            status = monitor.status()
        except (CoordinatorUnreachable, CoordinatorError):
            continue
        if status["state"] == "finished":
            final = status
    assert final is not None, procs.dump()
    assert final["history"][0]["num_updates"] == 1
    assert final["requests_refused_total"].get("too_many_requests", 0) >= 1, final["requests_refused_total"]
    assert procs.procs["w0"].wait(60) == 0, procs.output("w0")
