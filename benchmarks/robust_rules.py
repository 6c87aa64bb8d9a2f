"""The robust rules over many updates: time and memory of the median and the trimmed mean as the coordinator runs
them (each update read from its file, spilled, combined a block of coordinates at a time).

Writes M updates of SimpleCNN (4.8 MB each: the initial model plus a different small change each, the way a round's
updates differ) as files, then runs each rule through the same combiner the coordinator uses
(``make_combiner(..., spill_dir=...)``) in a fresh process, and reads that process's peak resident memory
(ru_maxrss) against its memory before the rule. ``--check`` also runs the whole-tensor rules of
``fedrest.aggregation.rules`` on the same updates (for small M: they hold every update in float64) and says whether
the results are bit-identical.

    .venv/bin/python benchmarks/robust_rules.py --updates 100 200 500 [--check]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _write_updates(folder: Path, m: int) -> list[Path]:
    import torch

    from fedrest.serialization import state_dict_to_bytes
    from model import SimpleCNN

    torch.manual_seed(0)
    reference = SimpleCNN().state_dict()
    generator = torch.Generator().manual_seed(1)
    paths = []
    for i in range(m):
        update = {k: (v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + i)
                  for k, v in reference.items()}
        path = folder / f"node{i:05d}.pt"
        path.write_bytes(state_dict_to_bytes(update))
        paths.append(path)
    return paths


def _run_rule(rule: str, paths: list, spill_dir: str, check: bool, out) -> None:
    import torch

    from fedrest.aggregation import coordinate_median, make_combiner, trimmed_mean
    from fedrest.aggregation.combine import ClientUpdate
    from fedrest.serialization import file_to_state_dict
    from model import SimpleCNN

    torch.set_num_threads(1)
    torch.manual_seed(0)
    reference = SimpleCNN().state_dict()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    combiner = make_combiner(rule, trim_fraction=0.1, spill_dir=spill_dir)
    updates = [ClientUpdate(Path(p).stem, 100, (lambda p=p: file_to_state_dict(p))) for p in paths]
    t0 = time.perf_counter()
    result = combiner.combine(updates, reference)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"rule": rule, "updates": len(paths), "seconds": round(seconds, 1), "rss_before_mb": round(before),
              "peak_rss_mb": round(peak), "growth_mb": round(peak - before), "used": len(result.used)}
    if check:
        states = [file_to_state_dict(p) for p in paths]
        whole = (coordinate_median(states, reference) if rule == "median"
                 else trimmed_mean(states, reference, 0.1))
        report["bit_identical_to_whole_tensor_rule"] = all(torch.equal(whole[k], result.state_dict[k])
                                                           for k in reference)
    out.put(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--rules", nargs="+", default=["median", "trimmed_mean"])
    parser.add_argument("--check", action="store_true", help="compare with the whole-tensor rules (small M only)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    reports = []
    context = mp.get_context("spawn")  # a fresh process per rule: its peak memory is the rule's alone
    for m in args.updates:
        folder = Path(tempfile.mkdtemp(prefix="fl-robust-"))
        try:
            paths = [str(p) for p in _write_updates(folder, m)]
            for rule in args.rules:
                queue = context.Queue()
                process = context.Process(target=_run_rule, args=(rule, paths, str(folder / "spill"), args.check,
                                                                  queue))
                process.start()
                report = queue.get()
                process.join()
                print(json.dumps(report), flush=True)
                reports.append(report)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"{'rule':>13} {'updates':>8} {'seconds':>8} {'memory growth':>14}")
    for r in reports:
        print(f"{r['rule']:>13} {r['updates']:>8} {r['seconds']:>8} {r['growth_mb']:>11} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
