"""The reference run: 3 workers, 5 rounds, E=1, B=32, one CPU thread each, the offline MNIST sample.

Runs ``launch.py`` as a user does (real coordinator and worker processes on 127.0.0.1) ``--repeats`` times, each
in a fresh directory, and prints every run's wall time and accuracies, then the median wall time. Used to check
that a change leaves the built-in MNIST path as fast as before and its accuracies bit-identical.

From the logs it also prints each round's overhead: the round's duration (the coordinator's "round r/N done ...,
T s": from the round's opening to its commit) minus the slowest worker's local training ("trained ... in T s"),
and the time outside the rounds (launch.py's wall time minus the rounds: start-up and shutdown). The logs give
0.1 s resolution.

    .venv/bin/python benchmarks/reference_run.py [--repeats 3] [--checkout PATH]

``--checkout`` runs the ``launch.py`` of another checkout (for example a ``git worktree`` of an earlier commit)
with this interpreter, for a before/after comparison on the same machine.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(checkout: Path) -> tuple[float, list[str], list[tuple[float, float]]]:
    """(wall seconds of launch.py, the accuracy per round it printed, (round seconds, slowest training seconds)
    per round from the logs)."""
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, str(checkout / "launch.py"), "--workers", "3", "--rounds", "5",
                              "--cpu", "--cpu-threads", "1", "--local-epochs", "1", "--batch-size", "32",
                              "--data-dir", str(ROOT / "data")],
                             cwd=work, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
        rounds = _rounds_from_logs(Path(work) / "logs" / "demo")
    if out.returncode != 0:
        raise SystemExit(f"launch.py failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    match = re.search(r"accuracy per round:\s+(.*)", out.stdout)
    return wall, match.group(1).split(", ") if match else [], rounds


def _rounds_from_logs(logs: Path) -> list[tuple[float, float]]:
    """(the round's duration, its slowest worker's training), seconds, for each round the coordinator finished."""
    text = (logs / "coordinator.log").read_text() if (logs / "coordinator.log").exists() else ""
    durations = {int(r): float(t) for r, t in re.findall(r"round (\d+)/\d+ done: .*, ([0-9.]+)s$", text, re.M)}
    training: dict[int, float] = {}
    for worker_log in logs.glob("worker_*.log"):
        for r, t in re.findall(r"round (\d+): trained .* in ([0-9.]+)s", worker_log.read_text()):
            training[int(r)] = max(training.get(int(r), 0.0), float(t))
    return [(durations[r], training.get(r, 0.0)) for r in sorted(durations)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose launch.py runs")
    args = parser.parse_args(argv)
    walls, overheads, outside = [], [], []
    for i in range(args.repeats):
        wall, accuracies, rounds = one_run(args.checkout.resolve())
        walls.append(wall)
        outside.append(wall - sum(d for d, _ in rounds))
        overheads += [(d - t, (d - t) / d) for d, t in rounds if d > 0]
        print(f"run {i + 1}: {wall:.1f}s, accuracy per round {', '.join(accuracies)}", flush=True)
        print("  rounds (duration / slowest training / overhead): "
              + "; ".join(f"{d:.1f} / {t:.1f} / {d - t:.1f}s" for d, t in rounds), flush=True)
    print(f"median wall time over {len(walls)} runs: {statistics.median(walls):.1f}s "
          f"(min {min(walls):.1f}s, max {max(walls):.1f}s)")
    if overheads:
        print(f"median round overhead: {statistics.median(o for o, _ in overheads):.2f}s "
              f"({100 * statistics.median(f for _, f in overheads):.0f}% of a round); median time outside the rounds "
              f"(start-up, shutdown): {statistics.median(outside):.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
