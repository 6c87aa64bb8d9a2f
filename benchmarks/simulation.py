"""Simulation benchmark: simulate.py with N virtual clients on this machine, against Flower's simulation engine.

The workload (issue 15): full Fashion-MNIST (Debian's dataset-fashion-mnist: apt-get install dataset-fashion-mnist),
Dirichlet(alpha=0.3) split, C=0.02, E=1, B=32, SimpleCNN, server evaluation of the 10,000 test images after every
round, 30 rounds. For each N of --clients it runs ``simulate.py`` (the process pool, one process per core) and
reports the wall time (program start to exit), the accuracy of every round, and the peak memory of the whole run
(the sum of the proportional set sizes, PSS, of simulate.py and every process below it, sampled every 0.2 s: shared
libraries count once), of the coordinator and of a client host (their peak PSS). A Dirichlet(0.3) split of 60,000
examples leaves some of 5,000 clients without an example (fedrest.partition refuses it); such an N runs with an IID
split, and the table says so.

With --flower PYTHON (a virtual environment with benchmarks/flower_requirements.txt) it runs the same workload on
Flower (benchmarks/flower_fashion.py) for the first N, right after simulate.py, and prints the ratio of the wall
times; with --ray, simulate.py --backend ray for the first N too (the same seeded run: the accuracies must equal the
pool's). Linux only (it reads /proc). Results: printed, and written to --out as JSON.

    .venv/bin/python benchmarks/simulation.py --clients 100,1000,5000 --flower .venv-flower/bin/python --ray
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process now."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            found[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return found


def _pss(pid: int) -> int:
    """The proportional set size of ``pid``, bytes: its private pages plus its share of the pages it shares (torch's
    libraries, mapped by every process, count once in a sum over processes, not once per process as in RSS)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


class MemorySampler(threading.Thread):
    """Every 0.2 s, the proportional set sizes (PSS) of ``root`` and its descendants: the peak of their sum, and
    each process's peak."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak_total, self.hwm, self.names = root, 0, {}, {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            parents = _parents()
            tree, frontier = {self.root}, [self.root]
            while frontier:
                parent = frontier.pop()
                children = [pid for pid, ppid in parents.items() if ppid == parent]
                tree.update(children)
                frontier.extend(children)
            sizes = {pid: _pss(pid) for pid in tree}
            self.peak_total = max(self.peak_total, sum(sizes.values()))
            for pid, size in sizes.items():
                self.hwm[pid] = max(self.hwm.get(pid, 0), size)
                if pid not in self.names:
                    try:
                        self.names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:
                        pass

    def peak_of(self, word: str) -> int:
        return max((self.hwm[p] for p, name in self.names.items() if word in name and p in self.hwm), default=0)


def measured(command: list[str], cwd: Path, timeout: float) -> tuple[float, str, MemorySampler]:
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({proc.returncode}):\n{out[-4000:]}")
    return wall, out, sampler


def split_for(num_clients: int, alpha: float) -> str:
    from fedrest.data import load_dataset
    from fedrest.partition import dirichlet_partition

    labels = load_dataset("fashion-mnist", str(ROOT / "data"), train=True, allow_download=False).labels.numpy()
    try:
        dirichlet_partition(labels, num_clients, alpha, 0)
    except ValueError:
        return "iid"
    return "dirichlet"


def run_ours(num_clients: int, args, split: str, backend: str = "pool") -> dict:
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, str(ROOT / "simulate.py"), "--clients", str(num_clients), "--rounds",
                   str(args.rounds), "--client-fraction", str(args.fraction), "--partition", split, "--alpha",
                   str(args.alpha), "--local-epochs", "1", "--batch-size", "32", "--dataset", "fashion-mnist",
                   "--data-dir", str(ROOT / "data"), "--cpu", "--backend", backend]
        command += ["--no-eval"] if args.no_eval else []
        wall, out, sampler = measured(command, Path(work), args.timeout)
        db = sqlite3.connect(Path(work) / "temp" / "simulation" / "coordinator.sqlite3")
        history = [json.loads(r[0]) for r in db.execute("SELECT record FROM history ORDER BY round")]
        db.close()
    return {"engine": f"fedrest ({backend})", "clients": num_clients, "split": split, "wall_s": round(wall, 1),
            "accuracy": [h["test_accuracy"] for h in history],
            "peak_memory_mb": round(sampler.peak_total / 2**20), "coordinator_peak_mb":
                round(sampler.peak_of("coordinator.py") / 2**20),
            "host_peak_mb": round(sampler.peak_of("fedrest.simulation") / 2**20)}


def run_flower(python: str, num_clients: int, args, split: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        command = [python, str(ROOT / "benchmarks" / "flower_fashion.py"), "--clients", str(num_clients),
                   "--rounds", str(args.rounds), "--fraction", str(args.fraction), "--partition", split, "--alpha",
                   str(args.alpha), "--data-dir", str(ROOT / "data")] + (["--no-eval"] if args.no_eval else [])
        wall, out, sampler = measured(command, Path(work), args.timeout)
    result = json.loads(out.strip().splitlines()[-1])
    return {"engine": f"flower {result['flwr']} (ray)", "clients": num_clients, "split": split,
            "wall_s": round(wall, 1), "accuracy": [r["accuracy"] for r in result["rounds"]],
            "peak_memory_mb": round(sampler.peak_total / 2**20), "coordinator_peak_mb": None, "host_peak_mb": None}


def show(results: list[dict]) -> None:
    print(f"\n{'engine':<22} {'N':>6} {'split':<9} {'wall s':>7} {'final acc':>9} {'peak MB (all)':>13} "
          f"{'coordinator MB':>14} {'host MB':>8}")
    for r in results:
        final = r["accuracy"][-1] if r["accuracy"] and r["accuracy"][-1] is not None else None
        print(f"{r['engine']:<22} {r['clients']:>6} {r['split']:<9} {r['wall_s']:>7.1f} "
              f"{'n/a' if final is None else f'{final:.4f}':>9} {r['peak_memory_mb']:>13} "
              f"{r['coordinator_peak_mb'] or '-':>14} {r['host_peak_mb'] or '-':>8}")
    for r in results:
        if r["accuracy"] and r["accuracy"][-1] is not None:
            print(f"  {r['engine']} N={r['clients']} accuracy per round: "
                  + ", ".join(f"{a:.4f}" for a in r["accuracy"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000,5000", help="comma-separated N (default: 100,1000,5000)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=0.02)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--flower", default=None, help="Python of a virtual environment with Flower (see above)")
    parser.add_argument("--ray", action="store_true", help="also run simulate.py --backend ray for the first N")
    parser.add_argument("--no-eval", action="store_true",
                        help="no server evaluation in either engine: the frameworks' own cost (no accuracies)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulation.json")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.clients.split(",")]
    results = []
    for i, n in enumerate(sizes):
        split = split_for(n, args.alpha)
        results.append(run_ours(n, args, split))
        show(results[-1:])
        if i == 0 and args.flower:
            results.append(run_flower(args.flower, n, args, split))
            show(results[-1:])
        if i == 0 and args.ray:
            results.append(run_ours(n, args, split, backend="ray"))
            show(results[-1:])
    print(f"\nsimulation benchmark: {args.rounds} rounds, C={args.fraction:g}, E=1, B=32, Fashion-MNIST, "
          f"{os.cpu_count()} cores")
    show(results)
    ours, = [r for r in results if r["engine"] == "fedrest (pool)" and r["clients"] == sizes[0]]
    for other in results:
        if other["engine"].startswith("flower"):
            print(f"wall time of fedrest / {other['engine']} at N={sizes[0]}: {ours['wall_s'] / other['wall_s']:.2f}")
        if other["engine"] == "fedrest (ray)":
            print(f"Ray backend / pool at N={sizes[0]}: {other['wall_s'] / ours['wall_s']:.2f} x the wall time "
                  f"(+{other['wall_s'] - ours['wall_s']:.1f} s); accuracies "
                  + ("equal" if other["accuracy"] == ours["accuracy"] else "DIFFER"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "fraction": args.fraction, "alpha": args.alpha,
                                    "cores": os.cpu_count(), "results": results}, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
