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

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from monitor_common import add_monitor_arguments, parse_monitor_args

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


def render(status: dict | None, error: str | None = None, unreachable_since: float | None = None,
           height: int = 24, refused: bool = False) -> Group:
    """The dashboard for ``status`` (the last one seen, or None) as a rich renderable.

    ``height`` is the terminal's number of lines: the node table is clipped to fit, with "+N more".
    """
    parts = []
    if error is not None:
        since = datetime.fromtimestamp(unreachable_since).strftime("%H:%M:%S") if unreachable_since else "?"
        if refused:
            parts.append(Text(f"since {since}: {error}", style="bold red"))
        else:
            parts.append(Text(f"coordinator unreachable since {since}: {error}", style="bold red"))
    if status is None:
        if error is None:
            parts.append(Text("no status yet"))
        return Group(*parts)

    done = len(status["history"])
    total = status["total_rounds"]
    header = Table.grid(padding=(0, 1))
    header.add_column()
    header.add_column()
    header.add_row(Text(f"run {status['run_id']}  state: {status['state']}  round {status['round']}/{total}  "
                        f"model {status['model']}  dataset {status['dataset']}", style="bold"))
    header.add_row(Text(f"rounds done {done}/{total}"), ProgressBar(total=total, completed=done, width=30))
    current = status.get("current_round")
    if current:
        header.add_row(Text(f"round {current['round']}: {current['updates_received']}/"
                            f"{len(current['participants'])} updates, attempt {current['attempt']}"),
                       Text(f"elapsed {current['elapsed_s']:.0f}s of {current['timeout_s']:.0f}s deadline"))
    parts.append(Panel(header, title="federation", expand=True))

    history = status["history"]
    rows_for_nodes = max(1, height - 9 - (6 if history else 0) - (2 if current else 0))
    nodes = status["nodes"]
    table = Table(title=f"nodes ({len(nodes)})", expand=True)
    for column in ("name", "device", "status", "last seen", "rounds", "last loss", "samples"):
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    shown = nodes if len(nodes) <= rows_for_nodes else nodes[:rows_for_nodes - 1]
    for n in shown:
        table.add_row(n["name"], n["device"], Text(n["status"], style=STATUS_STYLE.get(n["status"], "")),
                      _ago(n["last_seen_s_ago"]), str(len(n["rounds_contributed"])),
                      _fmt(n.get("last_train_loss"), ".3f"), str(n["num_samples"]))
    if len(shown) < len(nodes):
        table.add_row(f"+{len(nodes) - len(shown)} more", "", "", "", "", "", "")
    parts.append(table)

    if history:
        accuracies = [r["test_accuracy"] for r in history]
        losses = [r["test_loss"] for r in history]
        last = history[-3:]
        trend = Table(title="test accuracy / loss", expand=True)
        trend.add_column("round")
        trend.add_column("accuracy")
        trend.add_column("loss")
        trend.add_column("updates")
        trend.add_column("seconds")
        for r in last:
            trend.add_row(str(r["round"]), _fmt(r["test_accuracy"], ".4f"), _fmt(r["test_loss"], ".4f"),
                          str(r["num_updates"]), f"{r['duration_s']:.1f}")
        trend.caption = f"accuracy {sparkline(accuracies)}   loss {sparkline(losses)}"
        parts.append(trend)
    return Group(*parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Terminal dashboard of a federated-learning run.")
    add_monitor_arguments(parser)
    args, poller = parse_monitor_args(parser, argv)
    if args.once:
        poll = poller.poll()
        console = Console(no_color=True, highlight=False, width=int(os.environ.get("COLUMNS", "100")))
        console.print(render(poll.status, poll.error, poll.unreachable_since, height=10_000, refused=poll.refused))
        return 0 if poll.status is not None else 1
    console = Console()
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                poll = poller.poll()
                live.update(render(poll.status or poller.last_status, poll.error, poll.unreachable_since,
                                   height=console.size.height, refused=poll.refused), refresh=True)
                time.sleep(poller.next_delay())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
