"""Server state survives kill -9 (real processes on 127.0.0.1): a fedadam or scaffold coordinator killed at a
failpoint in the middle of round 2 and restarted ends the run with the bit-identical global model (and SCAFFOLD's
bit-identical global control variate) of a run that was not killed."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from fedrest.serialization import bytes_to_state_dict
from processes import FakeWorker, free_port, procs, status_client, try_status, wait_for  # noqa: F401

pytestmark = pytest.mark.e2e

ROUNDS = 3
UPLOADS = {"a": (10, [0.10, 0.25, 0.05]), "b": (30, [0.30, -0.20, 0.15])}  # name -> (num_samples, value per round)
CONTROLS = {"a": [0.5, -0.25, 0.125], "b": [-0.75, 0.3, 0.01]}  # scaffold: the control-variate change per round


def wait_state(port, procs, predicate, what, timeout=60):
    client = status_client(port)
    return wait_for(lambda: (lambda s: s if s is not None and predicate(s) else None)(try_status(client)),
                    timeout, what, procs)


def run(procs, label: str, strategy: str, failpoint: str | None = None) -> tuple[str, float]:
    """A run of ROUNDS rounds with two fake workers; with ``failpoint`` (name=seconds@pass) the coordinator is
    killed when it pauses there and started again. Returns (SHA-256 of the final global model, and of SCAFFOLD's
    control variate, seconds the restart took to finish the interrupted round)."""
    port = free_port()
    args = ("--rounds", str(ROUNDS), "--min-nodes", "2", "--no-eval", "--round-timeout", "60", "--strategy", strategy,
            "--temp-dir", f"temp-{label}", "--models-dir", f"models-{label}", "--max-share", "1")
    procs.coordinator(port, *args, env={"FL_FAILPOINTS": failpoint} if failpoint else None)
    wait_state(port, procs, lambda s: True, "the coordinator to answer")
    workers = {name: FakeWorker(port, name, n) for name, (n, _) in UPLOADS.items()}
    recovered = 0.0
    for number in range(1, ROUNDS + 1):
        wait_state(port, procs, lambda s, n=number: s["state"] == "training" and s["round"] == n, f"round {number}")
        for name, worker in workers.items():
            control = CONTROLS[name][number - 1] if strategy == "scaffold" else None
            worker.upload(number, UPLOADS[name][1][number - 1], number, control)
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
    digest = hashlib.sha256(data)
    if strategy == "scaffold":
        control_version, control = workers["a"].client.control_variate()
        assert control_version == ROUNDS
        digest.update(control)
    procs.stop_all()
    return digest.hexdigest(), recovered


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold"])
@pytest.mark.parametrize("failpoint", ["aggregate.before_checkpoint=30@2", "aggregate.before_commit=30@2"])
def test_killed_mid_round_ends_with_the_bit_identical_global_model(procs, strategy, failpoint):
    straight, _ = run(procs, "straight", strategy)
    killed, recovered = run(procs, "killed", strategy, failpoint)
    assert killed == straight
    print(f"\n{strategy}, kill -9 at {failpoint.split('=')[0]} of round 2: back at version 2 in {recovered:.1f}s; "
          f"final global model SHA-256 {killed[:16]}... equals the uninterrupted run's")


def test_scaffold_workers_keep_their_control_variates_across_a_kill_9(procs):
    """Two real workers train three scaffold rounds; one is killed with kill -9 after round 1 and started again.
    With every client in every round, the coordinator's c is the mean of the workers' c_i (each is the sum of its
    changes, c the sum of all over N = 2) only if the restarted worker went on from the c_i on its disk."""
    port = free_port()
    procs.coordinator(port, "--rounds", "3", "--min-nodes", "2", "--no-eval", "--strategy", "scaffold",
                      "--round-timeout", "300", "--node-timeout", "60", "--max-share", "1")
    for i in range(2):
        procs.worker(f"w{i}", port, "--partition-id", str(i), "--num-partitions", "4")
    stored = procs.workdir / "temp" / "workers" / "w0" / "control_variate.pt"

    def stored_round():
        try:
            return torch.load(stored, weights_only=True)["round"]
        except (OSError, RuntimeError, EOFError):
            return None

    wait_for(lambda: stored_round() == 1, 120, "w0's control variate after round 1", procs)
    procs.kill("w0")
    procs.worker("w0", port, "--partition-id", "0", "--num-partitions", "4")
    wait_state(port, procs, lambda s: s["state"] == "finished", "the last round", timeout=180)
    wait_for(lambda: stored_round() == 3, 30, "w0's control variate after round 3", procs)
    assert "after round 1 read from" in procs.output("w0")
    server = bytes_to_state_dict((procs.workdir / "temp" / "global" / "server_state_v3.pt").read_bytes())
    local = [torch.load(procs.workdir / "temp" / "workers" / f"w{i}" / "control_variate.pt",
                        weights_only=True)["control_variate"] for i in range(2)]
    assert set(server) == {f"c/{k}" for k in local[0]}
    for key in local[0]:
        mean = (local[0][key].double() + local[1][key].double()) / 2
        assert torch.allclose(server[f"c/{key}"], mean, rtol=1e-4, atol=1e-6), key
    assert max(float(v.abs().max()) for v in server.values()) > 0  # the control variates did move
