"""The reference run: 3 workers, 5 rounds, E=1, B=32, one CPU thread each, the offline MNIST sample.

Runs ``launch.py`` as a user does (real coordinator and worker processes on 127.0.0.1) ``--repeats`` times, each
in a fresh directory, and prints every run's wall time and accuracies, then the median wall time. Used to check
that a change leaves the built-in MNIST path as fast as before and its accuracies bit-identical.

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


def one_run(checkout: Path) -> tuple[float, list[str]]:
    """(wall seconds of launch.py, the accuracy per round it printed)."""
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, str(checkout / "launch.py"), "--workers", "3", "--rounds", "5",
                              "--cpu", "--cpu-threads", "1", "--local-epochs", "1", "--batch-size", "32",
                              "--data-dir", str(ROOT / "data")],
                             cwd=work, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"launch.py failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    match = re.search(r"accuracy per round:\s+(.*)", out.stdout)
    return wall, match.group(1).split(", ") if match else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose launch.py runs")
    args = parser.parse_args(argv)
    walls = []
    for i in range(args.repeats):
        wall, accuracies = one_run(args.checkout.resolve())
        walls.append(wall)
        print(f"run {i + 1}: {wall:.1f}s, accuracy per round {', '.join(accuracies)}", flush=True)
    print(f"median wall time over {len(walls)} runs: {statistics.median(walls):.1f}s "
          f"(min {min(walls):.1f}s, max {max(walls):.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
