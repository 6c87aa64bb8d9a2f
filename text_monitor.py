"""Terminal dashboard of a federation, drawn with rich from ``GET /api/v1/status``.

    python text_monitor.py --coordinator-address HOST:PORT --token TOKEN [--interval S] [--once]

Shows the run's state and round (a progress bar over rounds, the current round's elapsed time against
its deadline), a table of nodes, and the last rounds' test accuracy and loss with a trend line.
``--once`` prints one plain snapshot (for scripts and logs). While the coordinator is unreachable it
says so and retries with backoff. Ctrl-C exits with status 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedrest.monitoring import (add_monitor_arguments, metric_names, node_counts, parse_monitor_args,
                                privacy_text, round_metrics)

SPARK = "▁▂▃▄▅▆▇█"
STATUS_STYLE = {"online": "green", "training": "cyan", "offline": "red"}


def sparkline(values: list[float]) -> str:
    """One character per value, scaled between the values' min and max."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in values)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


NODE_TABLE_LINES = 3  # title, column names, rule
TREND_LINES = 7  # title, column names, rule, three rounds, sparkline caption
TREND_ROUNDS = 3


def _node_table(nodes: list, rows: int, counts: dict | None = None) -> Table:
    """The node table in at most ``rows`` rows, the last one saying "+N more" when they do not all fit;
    ``counts`` (:func:`node_counts`) titles it, and says how many more there are when ``nodes`` are the featured
    ones only."""
    total = len(nodes) if counts is None else counts["total"]
    title = f"nodes ({total})" if counts is None else (
        f"nodes ({total}: " + ", ".join(f"{counts[k]} {k}" for k in ("online", "training", "offline", "banned")
                                        if counts[k]) + ")")
    table = Table(title=title, box=box.SIMPLE_HEAD, expand=True, pad_edge=False,
                  show_edge=False, padding=(0, 1))
    table.add_column("name", no_wrap=True, ratio=3, overflow="fold")
    table.add_column("device", no_wrap=True, ratio=2, overflow="ellipsis")
    for column in ("status", "seen", "rounds", "local acc", "samples"):
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    shown = nodes if len(nodes) <= rows else nodes[:rows - 1]
    for n in shown:
        table.add_row(n["name"], n["device"], Text(n["status"], style=STATUS_STYLE.get(n["status"], "")),
                      _ago(n["last_seen_s_ago"]), str(len(n["rounds_contributed"])),
                      _fmt(n.get("last_train_accuracy"), ".3f"), str(n["num_samples"]))
    if len(shown) < total:
        table.add_row(f"+{total - len(shown)} more", "", "", "", "", "", "")
    return table


def _trend_table(history: list, width: int = 100) -> Table:
    """The last TREND_ROUNDS rounds' metrics (every name the task reports, as many as fit), with sparklines."""
    names = metric_names(history) or (["accuracy", "loss"] if any(r.get("evaluation_pending") for r in history)
                                      else [])  # round 1 done, its evaluation still running: the columns already
    shown = names[:max(2, min(len(names), (width - 40) // 12))]
    title = "global model on the test set" if all(n in ("accuracy", "loss") for n in names) else "global model"
    trend = Table(title=title, box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False, padding=(0, 1))
    for column in ("round", *shown, "updates", "samples", "seconds"):
        trend.add_column(column, no_wrap=True, overflow="ellipsis")
    for r in history[-TREND_ROUNDS:]:
        metrics = round_metrics(r)
        trend.add_row(str(r["round"]), *(_fmt(metrics.get(n), ".4f") for n in shown), str(r["num_updates"]),
                      str(r["num_samples"]), f"{r['duration_s']:.1f}")
    trend.caption = "   ".join(f"{n} {sparkline([round_metrics(r).get(n) for r in history])}" for n in shown[:3])
    return trend


def render(status: dict | None, error: str | None = None, unreachable_since: float | None = None,
           height: int = 24, refused: bool = False, full_errors: bool = False, width: int = 100) -> Group:
    """The dashboard for ``status`` (the last one seen, or None) as a rich renderable.

    ``height`` is the terminal's number of lines: the node table is cut to fit, its last row saying
    "+N more"; the whole picture then fits in ``height`` - 1 lines (one is left for the cursor).
    ``full_errors`` wraps an error over several lines instead of cutting it to one (for ``--once``). ``width`` (the
    terminal's columns) decides how many of the task's metrics the trend table shows.
    """
    parts = []
    if error is not None:
        since = datetime.fromtimestamp(unreachable_since).strftime("%H:%M:%S") if unreachable_since else "?"
        text = f"since {since}: {error}" if refused else f"coordinator unreachable since {since}: {error}"
        parts.append(Text(text, style="bold red", no_wrap=not full_errors,
                          overflow="fold" if full_errors else "ellipsis"))
    if status is None:
        if error is None:
            parts.append(Text("no status yet"))
        return Group(*parts)

    history = status["history"]
    done, total = len(history), status["total_rounds"]
    parts.append(Text(f"run {status['run_id']} · {status['state']} · round {status['round']}/{total} · "
                      f"{status['model']}/{status.get('task', status['dataset'])}", style="bold", no_wrap=True,
                      overflow="ellipsis"))
    bar = Table.grid(padding=(0, 1))
    privacy = privacy_text(status)
    bar.add_row(ProgressBar(total=total, completed=done, width=30),
                Text(f"{done}/{total} rounds done" + (f" · {privacy}" if privacy else ""), no_wrap=True,
                     overflow="ellipsis"))
    parts.append(bar)
    current = status.get("current_round")
    answers = "evaluations of the new model" if status["state"] == "evaluating" else "updates"
    parts.append(Text(f"round {current['round']} (attempt {current['attempt']}): {current['updates_received']}/"
                      f"{current.get('num_participants', len(current['participants']))} {answers} · "
                      f"{current['elapsed_s']:.0f}s of a {current['timeout_s']:.0f}s deadline"
                      + (f" · aggregation failed ({current['aggregation_error']}), again in "
                         f"{current['aggregation_retry_in_s']:.0f}s" if current.get("aggregation_error") else "")
                      if current else "", no_wrap=True, overflow="ellipsis"))

    fixed = len(parts) + NODE_TABLE_LINES + (TREND_LINES if history else 0) + 1  # parts: error? + header
    parts.append(_node_table(status["nodes"], rows=max(1, height - fixed), counts=node_counts(status)))
    if history:
        parts.append(_trend_table(history, width))
    return Group(*parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Terminal dashboard of a federated-learning run.")
    add_monitor_arguments(parser)
    args, poller = parse_monitor_args(parser, argv)
    if args.once:
        poll = poller.poll()
        console = Console(no_color=True, highlight=False, width=int(os.environ.get("COLUMNS", "100")))
        console.print(render(poll.status, poll.error, poll.unreachable_since, height=10_000, refused=poll.refused,
                             full_errors=True, width=console.width))
        return 0 if poll.status is not None else 1
    console = Console()
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                poll = poller.poll()
                if poll.refused and poll.status is None:  # a refused token or certificate will not heal by itself
                    live.stop()
                    print(f"error: {poll.error}", file=sys.stderr)
                    return 1
                live.update(render(poll.status or poller.last_status, poll.error, poll.unreachable_since,
                                   height=console.size.height, refused=poll.refused, width=console.size.width),
                            refresh=True)
                time.sleep(poller.next_delay())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
