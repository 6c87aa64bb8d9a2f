"""Server state survives kill -9 (real processes on 127.0.0.1): a fedadam coordinator killed at a failpoint in the
middle of round 2 and restarted ends the run with the bit-identical global model of a run that was not killed."""

from __future__ import annotations

import hashlib
import time

import pytest

from processes import FakeWorker, free_port, procs, status_client, try_status, wait_for  # noqa: F401

pytestmark = pytest.mark.e2e

ROUNDS = 3
UPLOADS = {"a": (10, [0.10, 0.25, 0.05]), "b": (30, [0.30, -0.20, 0.15])}  # name -> (num_samples, value per round)


def wait_state(port, procs, predicate, what, timeout=60):
    client = status_client(port)
    return wait_for(lambda: (lambda s: s if s is not None and predicate(s) else None)(try_status(client)),
                    timeout, what, procs)


def run(procs, label: str, failpoint: str | None = None) -> tuple[str, float]:
    """A fedadam run of ROUNDS rounds with two fake workers; with ``failpoint`` (name=seconds@pass) the coordinator
    is killed when it pauses there and started again. Returns (SHA-256 of the final global model, seconds the
    restart took to finish the interrupted round)."""
    port = free_port()
    args = ("--rounds", str(ROUNDS), "--min-nodes", "2", "--no-eval", "--round-timeout", "60", "--strategy", "fedadam",
            "--temp-dir", f"temp-{label}", "--models-dir", f"models-{label}", "--max-share", "1")
    procs.coordinator(port, *args, env={"FL_FAILPOINTS": failpoint} if failpoint else None)
    wait_state(port, procs, lambda s: True, "the coordinator to answer")
    workers = {name: FakeWorker(port, name, n) for name, (n, _) in UPLOADS.items()}
    recovered = 0.0
    for number in range(1, ROUNDS + 1):
        wait_state(port, procs, lambda s, n=number: s["state"] == "training" and s["round"] == n, f"round {number}")
        for name, worker in workers.items():
            worker.upload(number, UPLOADS[name][1][number - 1], number)
        if failpoint and number == 2:
            reached = f"failpoint {failpoint.split('=')[0]} reached"
            wait_for(lambda text=reached: text in procs.output("coordinator"), 60, reached, procs)
            procs.kill("coordinator")
            procs.coordinator(port, *args)
            started = time.monotonic()
            wait_state(port, procs, lambda s: s["model_version"] == 2, "round 2 after the restart")
            recovered = time.monotonic() - started
    wait_state(port, procs, lambda s: s["state"] == "finished", "the last round")
    version, data = workers["a"].client.model()
    assert version == ROUNDS
    procs.stop_all()
    return hashlib.sha256(data).hexdigest(), recovered


@pytest.mark.parametrize("failpoint", ["aggregate.before_checkpoint=30@2", "aggregate.before_commit=30@2"])
def test_fedadam_killed_mid_round_ends_with_the_bit_identical_global_model(procs, failpoint):
    straight, _ = run(procs, "straight")
    killed, recovered = run(procs, "killed", failpoint)
    assert killed == straight
    print(f"\nfedadam, kill -9 at {failpoint.split('=')[0]} of round 2: back at version 2 in {recovered:.1f}s; "
          f"final global model SHA-256 {killed[:16]}... equals the uninterrupted run's")
