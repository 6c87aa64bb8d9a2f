"""The terminal and plot monitors: rendering (golden text), headless PNGs, a real coordinator, and outages
(closed port, a socket that never answers): no traceback, "unreachable" shown, bounded CPU, Ctrl-C exits 0."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

import text_monitor
from processes import ROOT, MONITOR_TOKEN, FakeWorker, free_port, procs, status_client, try_status, wait_for  # noqa: F401

GOLDEN = Path(__file__).parent / "golden"


def fixed_status(num_nodes: int = 100) -> dict:
    """A status as the coordinator sends it, with fixed values."""
    nodes = [{"node_id": f"id{i:03d}", "name": f"worker-{i:03d}",
              "device": "cuda (NVIDIA H200)" if i % 3 == 0 else "cpu",
              "status": ("online", "training", "offline")[i % 3],
              "num_samples": 1000 + i, "updates_submitted": i % 5, "rounds_contributed": list(range(1, i % 5 + 1)),
              "last_train_loss": 0.5 + i / 1000 if i % 2 else None,
              "last_train_accuracy": 0.9 + i / 10000 if i % 2 else None,
              "last_seen_s_ago": float(i * 7), "last_heartbeat": 0.0, "registered_at": 0.0, "system_info": {}}
             for i in range(num_nodes)]
    history = [{"round": r, "test_loss": 1.0 / r, "test_accuracy": 0.8 + 0.03 * r, "num_updates": 90,
                "num_samples": 90000, "num_participants": 95, "node_ids": [], "started_at": 0.0, "finished_at": 0.0,
                "duration_s": 10.0 + r, "aggregation_s": 0.1, "evaluation_s": 0.5, "mean_train_loss": 0.3,
                "max_train_seconds": 8.0} for r in range(1, 6)]
    return {"api_version": 1, "run_id": "0123456789ab", "state": "training", "round": 6, "total_rounds": 10,
            "model_version": 5, "model": "simple_cnn", "dataset": "mnist", "min_nodes_to_start": 2,
            "client_fraction": 1.0, "min_updates": 1,
            "current_round": {"round": 6, "participants": [n["node_id"] for n in nodes[:95]],
                              "updates_received": min(40, len(nodes)),
                              "updates_refused": 0, "attempt": 1, "elapsed_s": 12.3, "timeout_s": 600.0},
            "updates_refused_total": {}, "nodes": nodes, "history": history}


def rendered(status, width: int, height: int, **kwargs) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width, height=height, no_color=True, force_terminal=False).print(
        text_monitor.render(status, height=height, **kwargs))
    return buffer.getvalue()


@pytest.mark.parametrize("num_nodes, width, height, golden", [
    (100, 80, 24, "text_monitor_100_nodes_80x24.txt"),
    (3, 100, 40, "text_monitor_3_nodes_100x40.txt"),
])
def test_text_monitor_golden(num_nodes, width, height, golden):
    text = rendered(fixed_status(num_nodes), width, height)
    path = GOLDEN / golden
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= height - 1 and max(len(line) for line in lines) <= width


@pytest.mark.parametrize("width, height", [(40, 12), (80, 24), (132, 50), (200, 8)])
def test_text_monitor_fits_any_terminal(width, height):
    text = rendered(fixed_status(100), width, height)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    if height >= 16:  # room for the header, the table and the trend
        assert len(lines) <= height - 1
        assert "more" in text  # 100 nodes never fit: the cut is said


def test_text_monitor_shows_the_metric_columns_while_round_1_is_evaluated():
    """Round 1 is committed and round 2 trains while the coordinator evaluates round 1's model: its record has
    no metrics yet (evaluation_pending); the table already has the accuracy and loss columns, with "-"."""
    status = fixed_status(3)
    status["history"] = [dict(status["history"][0], test_loss=None, test_accuracy=None, evaluation_pending=True)]
    lines = rendered(status, 100, 40).splitlines()
    header = lines.index(next(line for line in lines if "global model on the test set" in line)) + 1
    assert lines[header].split() == ["round", "accuracy", "loss", "updates", "samples", "seconds"]
    assert lines[header + 2].split() == ["1", "-", "-", "90", "90000", "11.0"]


def test_text_monitor_unreachable_keeps_the_last_picture():
    text = rendered(fixed_status(3), 100, 40, error="GET ...: [Errno 111] Connection refused",
                    unreachable_since=0.0)
    assert text.splitlines()[0].startswith("coordinator unreachable since ")
    assert "worker-002" in text


def test_text_monitor_once_shows_the_whole_error_not_a_line_cut_to_the_terminal():
    error = ("cannot verify the TLS certificate of https://10.0.0.5:5000: self-signed certificate. Pass --ca-cert "
             "with the coordinator's certificate (the file given to its --certfile)")
    console = Console(no_color=True, width=60, record=True)
    console.print(text_monitor.render(None, error, 0.0, refused=True, full_errors=True))
    assert "the file given to its --certfile" in " ".join(console.export_text().split())
    assert "…" in rendered(None, 60, 24, error=error, unreachable_since=0.0, refused=True)  # live: one line


def run_monitor(script: str, *args: str, timeout: float = 60, env: dict | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})}, cwd=cwd)


@pytest.mark.e2e
def test_monitors_against_a_real_coordinator(procs, tmp_path):
    port = free_port()
    procs.coordinator(port, "--rounds", "2", "--min-nodes", "2", "--no-eval")
    wait_for(lambda: try_status(status_client(port)), 60, "the coordinator", procs)
    a, b = FakeWorker(port, "alpha", 10), FakeWorker(port, "beta", 30)
    wait_for(lambda: (try_status(status_client(port)) or {}).get("state") == "training", 30, "round 1", procs)
    a.upload(1, 1.0, 1)
    b.upload(1, 2.0, 1)
    status = wait_for(lambda: (s := try_status(status_client(port))) and s["history"] and s, 30, "round 1", procs)
    address = f"127.0.0.1:{port}"
    once = run_monitor("text_monitor.py", "--coordinator-address", address, "--token", MONITOR_TOKEN, "--once",
                       env={"COLUMNS": "100"})
    assert once.returncode == 0, once.stderr
    assert f"round {status['round']}/{status['total_rounds']}" in once.stdout
    for node in status["nodes"]:
        assert node["name"] in once.stdout and str(node["num_samples"]) in once.stdout
    assert f"{status['history'][0]['num_samples']}" in once.stdout  # the round's samples, as in the JSON
    png = tmp_path / "plot.png"
    plot = run_monitor("monitor.py", "--coordinator-address", address, "--token", MONITOR_TOKEN, "--once", "--save",
                       str(png))
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    # without --save and without a display, --once writes the default PNG and says where
    headless = run_monitor("monitor.py", "--coordinator-address", address, "--token", MONITOR_TOKEN, "--once",
                           cwd=tmp_path)  # not into the checkout's logs/
    assert headless.returncode == 0 and "logs/monitor.png" in headless.stdout
    assert (tmp_path / "logs" / "monitor.png").stat().st_size > 20_000
    wrong = run_monitor("text_monitor.py", "--coordinator-address", address, "--token", "not-the-monitor-token",
                        "--once")
    assert wrong.returncode == 1 and "refused the token" in wrong.stdout and "unreachable" not in wrong.stdout
    live = run_monitor("text_monitor.py", "--coordinator-address", address, "--token", "not-the-monitor-token",
                       timeout=30)  # live: a refused token does not heal, so it says so and exits
    assert live.returncode == 1 and "refused the token" in live.stderr
    short = run_monitor("text_monitor.py", "--coordinator-address", address, "--token", "too-short", "--once")
    assert short.returncode == 2 and "must be at least 16 characters" in short.stderr  # as for --token of workers


@pytest.fixture
def silent_server():
    """A socket that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []
    server.settimeout(0.2)
    yield server.getsockname()[1], accepted
    server.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("script", ["text_monitor.py", "monitor.py"])
@pytest.mark.parametrize("target", ["closed port", "silent socket"])
def test_monitors_survive_an_absent_coordinator(script, target, silent_server, tmp_path):
    port = free_port() if target == "closed port" else silent_server[0]
    address = f"127.0.0.1:{port}"
    once = run_monitor(script, "--coordinator-address", address, "--once", "--token", "x" * 16,
                       *(["--save", str(tmp_path / "x.png")] if script == "monitor.py" else []))
    assert once.returncode == 1
    assert "unreachable" in once.stdout + once.stderr and "Traceback" not in once.stdout + once.stderr
    assert "wrote" not in once.stdout and not (tmp_path / "x.png").exists()  # no empty figure passed off as a plot

    # live mode: it keeps retrying with backoff (little CPU), and Ctrl-C ends it with status 0
    base = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    live = subprocess.Popen([sys.executable, str(ROOT / script), "--coordinator-address", address, "--interval", "0.5",
                             *(["--save", str(tmp_path / "live.png")] if script == "monitor.py" else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**base, "COLUMNS": "100"},
                            cwd=tmp_path)
    try:
        time.sleep(3)  # imports, then a few failed polls
        start_cpu = cpu_seconds(live.pid)
        time.sleep(4)
        spent = cpu_seconds(live.pid) - start_cpu
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=30)
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    assert live.returncode == 0, err
    assert "Traceback" not in out + err
    assert spent < 1.0, f"{script} used {spent:.2f}s of CPU in 4s while the coordinator was absent"
