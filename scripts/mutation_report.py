"""The score of the last `make mutate` run, per module, from the results mutmut keeps under mutants/.

Usage: python scripts/mutation_report.py [--survivors] [--mutants DIR]

Score = killed / (mutants checked), where "killed" counts the mutants some test failed on (and those that
ran out of time: an infinite loop is a failure a user would see). A surviving mutant is a change to the
code that every test passed: either a test is missing, or the change does not change behaviour (equivalent;
CONTRIBUTING.md says how to mark those). `--survivors` lists them; `mutmut show NAME` prints the change.
Exit status: 0, or 2 when there is no run to report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code  # mutmut's own reading of a mutant's exit code

# mutmut's statuses in this report's columns
COLUMN_OF = {"caught by type check": "killed", "check was interrupted by user": "not checked",
             "skipped": "not checked", "segfault": "suspicious"}


def _status(code: int | None) -> str:
    status = status_by_exit_code[code]
    return COLUMN_OF.get(status, status)


def module_results(mutants: Path) -> dict[str, dict[str, int | None]]:
    """{module path: {mutant name: exit code or None}} from every ``*.py.meta`` file under ``mutants``."""
    results = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        results[module] = json.loads(meta.read_text())["exit_code_by_key"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--survivors", action="store_true", help="list every surviving mutant by name")
    parser.add_argument("--mutants", default="mutants", help="mutmut's working folder (default: mutants)")
    args = parser.parse_args(argv)
    results = module_results(Path(args.mutants))
    if not results:
        print(f"error: no mutation results under {args.mutants}/; run `make mutate` first", file=sys.stderr)
        return 2
    columns = ("killed", "timeout", "survived", "no tests", "suspicious", "not checked")
    print(f"{'module':44} {'mutants':>7} " + " ".join(f"{c:>11}" for c in columns) + f" {'score':>7}")
    totals: Counter = Counter()
    survivors = []
    for module, codes in results.items():
        counts = Counter(_status(code) for code in codes.values())
        totals.update(counts)
        survivors += [name for name, code in codes.items() if _status(code) in ("survived", "no tests")]
        print(_row(module, len(codes), counts, columns))
    print(_row("all", sum(totals.values()), totals, columns))
    if args.survivors:
        print(f"\n{len(survivors)} surviving mutants (`mutmut show NAME` prints the change):")
        print("\n".join(survivors))
    return 0


def _row(module: str, total: int, counts: Counter, columns: tuple[str, ...]) -> str:
    checked = total - counts["not checked"]
    caught = counts["killed"] + counts["timeout"]
    score = f"{100 * caught / checked:6.1f}%" if checked else "    n/a"
    return f"{module:44} {total:7d} " + " ".join(f"{counts[c]:11d}" for c in columns) + f" {score}"


if __name__ == "__main__":
    sys.exit(main())
