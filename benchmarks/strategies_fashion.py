"""Strategies on real non-IID data: full Fashion-MNIST, 20 workers with Dirichlet(0.5) label skew.

Each strategy runs as a user runs it, through ``launch.py`` (a real coordinator and 20 real worker processes on
127.0.0.1): client fraction C = 0.25 (5 workers a round), E = 1, B = 32, 40 rounds, SimpleCNN, SGD lr 0.01 with
momentum 0.9, seed 0. The coordinator evaluates every round's global model on the 10,000 test images. Prints the
test accuracy per round of each strategy and the rounds each needs to reach 85%, 88% and 90%, writes the
figures to ``OUT/strategies_fashion.json`` and draws the curves in ``OUT/strategies_fashion.png``.

    apt-get install dataset-fashion-mnist   # the full Fashion-MNIST (60,000 / 10,000), once
    .venv/bin/python benchmarks/strategies_fashion.py [--strategies fedavg,fedadam] [--rounds 40] [--out DIR]

For comparison: NIID-Bench (Li et al. 2022, "Federated Learning on Non-IID Data Silos: An Experimental Study")
reports FedAvg at 88.4% on Fashion-MNIST with Dirichlet(0.5) after 50 rounds of 10 local epochs.
Takes about 8 minutes a strategy on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedprox", "scaffold")
TARGETS = (0.85, 0.88, 0.90)


def run_strategy(strategy: str, args) -> dict:
    """One launch.py run; returns {"strategy", "wall_s", "accuracy": [per round]}."""
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, str(ROOT / "launch.py"), "--workers", str(args.workers), "--rounds",
                   str(args.rounds), "--cpu", "--dataset", "fashion-mnist", "--partition", "dirichlet", "--alpha",
                   str(args.alpha), "--client-fraction", str(args.client_fraction), "--local-epochs", "1",
                   "--batch-size", "32", "--seed", "0", "--strategy", strategy, *args.extra]
        started = time.perf_counter()
        out = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=4 * 3600)
        wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"{strategy}: launch.py failed ({out.returncode}):\n{out.stdout[-3000:]}")
    match = re.search(r"accuracy per round:\s+(.*)", out.stdout)
    accuracy = [None if a == "n/a" else float(a) for a in match.group(1).split(", ")]
    return {"strategy": strategy, "wall_s": round(wall, 1), "accuracy": accuracy}


def rounds_to(accuracy: list, target: float) -> int | None:
    """The first round (1-based) whose test accuracy is >= ``target``; None if none is."""
    return next((i + 1 for i, a in enumerate(accuracy) if a is not None and a >= target), None)


def table(results: list[dict]) -> str:
    head = "| strategy | final | best | " + " | ".join(f"rounds to {t:.0%}" for t in TARGETS) + " | wall |"
    lines = [head, "|" + "---|" * (5 + len(TARGETS) - 1)]
    for r in results:
        acc = [a for a in r["accuracy"] if a is not None]
        reach = " | ".join(str(rounds_to(r["accuracy"], t) or "-") for t in TARGETS)
        lines.append(f"| {r['strategy']} | {acc[-1]:.4f} | {max(acc):.4f} | {reach} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(range(1, len(r["accuracy"]) + 1), r["accuracy"], label=r["strategy"])
    for target in TARGETS:
        ax.axhline(target, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (10,000 images)")
    ax.set_ylim(0.5, 0.95)
    ax.set_title(f"Fashion-MNIST, {args.workers} workers, Dirichlet({args.alpha}), C={args.client_fraction}, "
                 "E=1, B=32")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--client-fraction", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("extra", nargs="*", help="more launch.py flags, after --")
    args = parser.parse_args(argv)
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        print(f"the full Fashion-MNIST is not in {FASHION}: apt-get install dataset-fashion-mnist")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    figures = args.out / "strategies_fashion.json"
    # runs of other strategies (an earlier invocation with other --strategies) are kept beside this one's
    results = json.loads(figures.read_text()) if figures.exists() else []
    for strategy in args.strategies.split(","):
        result = run_strategy(strategy, args)
        results = [r for r in results if r["strategy"] != strategy] + [result]
        print(f"{strategy}: {result['wall_s']:.0f}s, accuracy per round "
              + ", ".join("n/a" if a is None else f"{a:.4f}" for a in result["accuracy"]), flush=True)
        figures.write_text(json.dumps(results, indent=1))
    plot(results, args.out / "strategies_fashion.png", args)
    print(table(results))
    print(f"figures in {args.out / 'strategies_fashion.json'}, plot in {args.out / 'strategies_fashion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
