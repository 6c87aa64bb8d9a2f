"""The README's manual path, walked as a new user walks it, in a checkout of its own (real processes, 127.0.0.1).

After a demo run (launch.py, as `make demo`), start coordinator.py with the README's flags (a certificate from
make_cert.py), start two workers with the command the coordinator printed (the join token read as it says,
`$(cat temp/join_token)`), watch with the printed text_monitor command, kill -9 the coordinator after round 1,
start it again with the same command and see the run resume and finish. Then the same command once more: a
finished run is not resumed by accident, and the printed --fresh command starts a new run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrest.client import CoordinatorClient, CoordinatorError, CoordinatorUnreachable, make_session
from processes import ROOT, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def checkout(tmp_path):
    """A folder laid out like a clone: the programs and package copied from this repository, and ``.venv`` the
    environment the suite runs in (so the printed ``.venv/bin/python`` commands work as printed)."""
    root = tmp_path / "fl"
    root.mkdir()
    for path in ROOT.iterdir():
        if path.suffix == ".py":
            shutil.copy2(path, root / path.name)
        elif path.name in ("fedrest", "static", "docs"):
            shutil.copytree(path, root / path.name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


class Shell:
    """Runs command lines with bash in the checkout, each in its own process group, output in files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: str) -> subprocess.Popen:
        out = open(self.root / f"{name}.out", "ab")
        proc = subprocess.Popen(["bash", "-c", command], cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out.close()
        self.procs[name] = proc
        return proc

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "COLUMNS": "200"})

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def wait_for_line(self, name: str, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output(name))
            if match:
                return match
            assert self.procs[name].poll() is None, f"{name} exited:\n{self.output(name)[-3000:]}"
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} from {name} in {timeout}s:\n{self.output(name)[-3000:]}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(30)

    def stop_all(self) -> None:
        for name in list(self.procs):
            try:
                self.kill(name, signal.SIGTERM)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.kill(name)


@pytest.fixture
def shell(checkout):
    s = Shell(checkout)
    yield s
    s.stop_all()


def status(root: Path, address: str) -> dict | None:
    client = CoordinatorClient(address, token=(root / "temp" / "monitor_token").read_text().strip(),
                               session=make_session(total_retries=0, ca_cert=str(root / "certs/coordinator.crt")))
    try:
        return client.status()
    except (CoordinatorUnreachable, CoordinatorError):
        return None


def wait_status(root, address, predicate, timeout, what, shell):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(root, address)
        if s is not None and predicate(s):
            return s
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(f"--- {n}\n{shell.output(n)[-2000:]}"
                                                             for n in shell.procs))


def test_the_readme_path_after_the_demo(checkout, shell):
    demo = shell.run(".venv/bin/python launch.py --workers 2 --rounds 1 --cpu", timeout=240)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert shell.run(".venv/bin/python make_cert.py --host 127.0.0.1").returncode == 0

    port = free_port()
    coordinator = (f".venv/bin/python coordinator.py --rounds 2 --min-nodes 2 --certfile certs/coordinator.crt "
                   f"--keyfile certs/coordinator.key --host 127.0.0.1 --port {port}")
    shell.start("coordinator", coordinator)
    worker = shell.wait_for_line("coordinator", r"start a worker with: (.*)").group(1).strip()
    watch = shell.wait_for_line("coordinator", r"watch with: (.*)").group(1).strip()
    assert "new run" in shell.output("coordinator")  # not the demo's finished run
    assert worker.startswith(".venv/bin/python worker.py --coordinator-address https://127.0.0.1:")
    assert '--token="$(cat temp/join_token)"' in worker
    dashboard = shell.wait_for_line("coordinator", r"dashboard: open (\S+) and enter the monitor token").group(1)
    assert dashboard == f"https://127.0.0.1:{port}/"
    for name in ("w1", "w2"):
        shell.start(name, f"{worker} --name {name} --cpu-threads 1 --quiet")
    address = f"https://127.0.0.1:{port}"
    wait_status(checkout, address, lambda s: len(s["history"]) == 1, 120, "round 1", shell)

    admin = shell.wait_for_line("coordinator", r"operator commands \(.*\): (.*) rotate join\|").group(1)
    rotated = shell.run(f"{admin} rotate monitor")  # as printed; the token file is rewritten, the old one refused
    assert rotated.returncode == 0 and "new monitor token" in rotated.stdout, rotated.stdout + rotated.stderr

    once = shell.run(f"{watch} --once")
    assert once.returncode == 0, once.stdout + once.stderr
    assert "w1" in once.stdout and "w2" in once.stdout and "round" in once.stdout

    run_id = status(checkout, address)["run_id"]
    shell.kill("coordinator")  # kill -9, then the same command again
    shell.start("coordinator", coordinator)
    shell.wait_for_line("coordinator", rf"resumed run {run_id}")
    final = wait_status(checkout, address, lambda s: s["state"] == "finished", 120, "the run to finish", shell)
    assert final["run_id"] == run_id and [r["round"] for r in final["history"]] == [1, 2]
    for name in ("w1", "w2"):
        assert shell.procs[name].wait(60) == 0, shell.output(name)
    shell.procs["coordinator"].wait(90)

    again = shell.run(coordinator, timeout=60)  # the same command once more: the run is finished
    assert again.returncode == 2
    fresh = re.search(r"To start a new run:\n  (.*--fresh=\w+)", again.stderr)
    assert fresh, again.stderr
    assert fresh.group(1).startswith(".venv/bin/python coordinator.py") and run_id in fresh.group(1)
    shell.start("coordinator", fresh.group(1))
    shell.wait_for_line("coordinator", rf"--fresh={run_id}: the stored run was moved to .*archive")
    new_run = shell.wait_for_line("coordinator", r"run (\w+): 2 rounds, 2 nodes to start(?![\s\S]*run \w+: 2 rounds)")
    assert new_run.group(1) != run_id
