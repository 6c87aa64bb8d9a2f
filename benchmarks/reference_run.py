"""The reference run: 3 workers, 5 rounds, E=1, B=32, one CPU thread each, the offline MNIST sample.

Runs ``launch.py`` as a user does (real coordinator and worker processes on 127.0.0.1) ``--repeats`` times, each
in a fresh directory, and prints every run's wall time and accuracies, then medians. Used to check that a change
leaves the built-in MNIST path as fast as before and its accuracies bit-identical (issue 14).

Per run, from the coordinator's run database (temp/demo/coordinator.sqlite3, whose history records carry wall-clock
times and each round's slowest local training, ``max_train_seconds``, as the worker measured it):

- start-up: from launch.py's start to round 1's opening (every process started, data loaded, nodes registered);
- per round: its duration (opening to commit) against its slowest worker's training; the difference is the
  round's overhead (model download, upload, aggregation, evaluation, files, commit, the next task);
- the round period: from a round's opening to the next one's (what the user waits per round);
- the rest: after the last round's commit until launch.py has stopped every process.

    .venv/bin/python benchmarks/reference_run.py [--repeats 3] [--workers 3] [--checkout PATH] [--baseline PATH]

``--workers 10`` is the 10-worker run (the same 4,000 training images in 10 partitions). ``--checkout`` runs the
``launch.py`` of another checkout (for example a ``git worktree`` of an earlier commit) with this interpreter;
``--baseline PATH`` runs that checkout's before each run of this one, alternately (a before/after comparison on
the same machine, in the same minutes: a shared machine's speed drifts), and prints both summaries.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    wall: float  # seconds of launch.py
    startup: float  # launch.py's start to round 1's opening, seconds
    accuracies: list  # the accuracy per round launch.py printed
    rounds: list  # (duration, slowest training) seconds per round
    periods: list  # seconds from each round's opening to the next one's
    tail: float  # the last round's commit to launch.py's exit, seconds


def one_run(checkout: Path, workers: int, rounds: int) -> Run:
    with tempfile.TemporaryDirectory() as work:
        started_wall, started = time.time(), time.perf_counter()
        out = subprocess.run([sys.executable, str(checkout / "launch.py"), "--workers", str(workers), "--rounds",
                              str(rounds), "--cpu", "--cpu-threads", "1", "--local-epochs", "1", "--batch-size",
                              "32", "--data-dir", str(ROOT / "data")],
                             cwd=work, capture_output=True, text=True, timeout=900)
        wall, ended_wall = time.perf_counter() - started, time.time()
        if out.returncode != 0:
            raise SystemExit(f"launch.py failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        db = sqlite3.connect(Path(work) / "temp" / "demo" / "coordinator.sqlite3")
        history = [json.loads(r[0]) for r in db.execute("SELECT record FROM history ORDER BY round")]
        db.close()
    match = re.search(r"accuracy per round:\s+(.*)", out.stdout)
    opened = [h["started_at"] for h in history]
    return Run(wall, opened[0] - started_wall, match.group(1).split(", ") if match else [],
               [(h["duration_s"], h["max_train_seconds"] or 0.0) for h in history],
               [b - a for a, b in zip(opened, opened[1:])], ended_wall - history[-1]["finished_at"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose launch.py runs")
    parser.add_argument("--baseline", type=Path, help="a checkout run alternately with --checkout, to compare")
    args = parser.parse_args(argv)
    checkouts = {"baseline": args.baseline, "this": args.checkout} if args.baseline else {"this": args.checkout}
    runs: dict[str, list[Run]] = {label: [] for label in checkouts}
    for i in range(args.repeats):
        for label, checkout in checkouts.items():
            run = one_run(checkout.resolve(), args.workers, args.rounds)
            runs[label].append(run)
            print(f"{label} run {i + 1}: {run.wall:.1f}s, start-up {run.startup:.2f}s, after the last round "
                  f"{run.tail:.2f}s, accuracy per round {', '.join(run.accuracies)}", flush=True)
            print("  rounds (duration / slowest training / overhead): "
                  + "; ".join(f"{d:.2f} / {t:.2f} / {d - t:.2f}s" for d, t in run.rounds), flush=True)
            print("  round periods (opening to next opening): " + ", ".join(f"{p:.2f}s" for p in run.periods),
                  flush=True)
    for label, checkout in checkouts.items():
        summarise(f"{label} ({checkout})", runs[label], args.workers, args.rounds)
    if len({tuple(r.accuracies) for label_runs in runs.values() for r in label_runs}) > 1:
        print("the accuracies differ between runs")
    else:
        print("the accuracies are the same in every run")
    return 0


def summarise(label: str, runs: list[Run], workers: int, rounds: int) -> None:
    """Medians over ``runs``: wall time, start-up, the round's duration, slowest training, overhead, period."""
    med = statistics.median
    overheads = [(d - t, (d - t) / d) for run in runs for d, t in run.rounds if d > 0]
    print(f"\n{label}: {workers} workers, {rounds} rounds, median of {len(runs)} runs:")
    print(f"  wall time {med(r.wall for r in runs):.1f}s (min {min(r.wall for r in runs):.1f}s, "
          f"max {max(r.wall for r in runs):.1f}s); start-up {med(r.startup for r in runs):.2f}s; after the last "
          f"round {med(r.tail for r in runs):.2f}s")
    print(f"  round: duration {med(d for r in runs for d, _ in r.rounds):.2f}s, slowest training "
          f"{med(t for r in runs for _, t in r.rounds):.2f}s, overhead {med(o for o, _ in overheads):.3f}s "
          f"({100 * med(f for _, f in overheads):.1f}% of a round; rounds 1..{rounds - 1}: "
          f"{100 * med(f for r in runs for d, t in r.rounds[:-1] for f in [(d - t) / d]):.1f}%, the last: "
          f"{100 * med((r.rounds[-1][0] - r.rounds[-1][1]) / r.rounds[-1][0] for r in runs):.1f}%)")
    if any(r.periods for r in runs):
        print(f"  round period {med(p for r in runs for p in r.periods):.2f}s")


if __name__ == "__main__":
    sys.exit(main())
