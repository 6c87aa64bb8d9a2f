"""Live matplotlib monitor of a federation, from ``GET /api/v1/status``.

    python monitor.py --coordinator-address HOST:PORT --token TOKEN [--interval S] [--once] [--save FILE.png]

Four panels: global test accuracy and loss per round; each round's duration split into the slowest
worker's training time and everything else (communication, waiting, aggregation; in the last round also the
evaluation, which otherwise runs while the next round trains); updates and samples per round; node states
(online / training / offline) over the time this monitor watched.
Without a display (no DISPLAY/WAYLAND_DISPLAY on Linux) it writes PNGs instead and says where;
``--once`` draws one figure and exits (a finished run is plotted from the coordinator's stored history).
While the coordinator is unreachable the title says so and polls back off. Ctrl-C exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from fedrest.monitoring import (add_monitor_arguments, is_loss, metric_names, node_counts, parse_monitor_args,
                                privacy_text, round_metrics)

DEFAULT_PNG = Path("logs") / "monitor.png"
SAVE_FORMATS = (".png", ".svg", ".pdf")


def has_display() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class NodeTimeline:
    """Counts of nodes by status at each poll: times (seconds since start) and three count lists."""

    def __init__(self) -> None:
        self.start = time.time()
        self.times: list[float] = []
        self.counts = {"online": [], "training": [], "offline": []}

    def add(self, status: dict) -> None:
        self.times.append(time.time() - self.start)
        counts = node_counts(status)
        for key in self.counts:
            self.counts[key].append(counts[key])


def draw(fig, status: dict | None, timeline: NodeTimeline, error: str | None = None,
         unreachable_since: float | None = None, refused: bool = False) -> None:
    """Redraw the four panels of ``fig`` from ``status`` (None: only the title)."""
    fig.clear()
    axes = fig.subplots(2, 2)
    (acc_ax, time_ax), (upd_ax, node_ax) = axes
    title = "federated training"
    if status is not None:
        title = (f"run {status['run_id']} — {status['state']} — round {status['round']}/{status['total_rounds']}"
                 f" — {sum(1 for n in status['nodes'] if n['status'] != 'offline')} nodes up")
        if privacy_text(status):
            title += f" — {privacy_text(status)}"
    if error is not None:
        since = datetime.fromtimestamp(unreachable_since).strftime("%H:%M:%S") if unreachable_since else "?"
        title += f"\nsince {since}: {error[:120]}" if refused else f"\ncoordinator unreachable since {since}"
    fig.suptitle(title, color="red" if error else "black")
    if status is None:
        return
    history = status["history"]
    rounds = [r["round"] for r in history]

    _draw_metrics(acc_ax, history, rounds)

    train = [r["max_train_seconds"] or 0.0 for r in history]
    other = [max(0.0, r["duration_s"] - t) for r, t in zip(history, train)]
    time_ax.set_title("round duration (s)")
    time_ax.bar(rounds, train, label="training (slowest worker)", color="tab:green")
    time_ax.bar(rounds, other, bottom=train, label="communication, waiting, aggregation (the last round: evaluation)",
                color="tab:gray")
    time_ax.set_xlabel("round")
    time_ax.legend(fontsize="small")

    upd_ax.set_title("updates and samples per round")
    upd_ax.bar(rounds, [r["num_updates"] for r in history], color="tab:purple")
    upd_ax.set_xlabel("round")
    upd_ax.set_ylabel("updates", color="tab:purple")
    samples_ax = upd_ax.twinx()
    samples_ax.plot(rounds, [r["num_samples"] for r in history], "o-", color="tab:orange")
    samples_ax.set_ylabel("samples", color="tab:orange")

    node_ax.set_title("nodes by status (seconds watched)")
    colors = {"online": "tab:green", "training": "tab:cyan", "offline": "tab:red"}
    if len(timeline.times) == 1:  # one snapshot: the counts now
        node_ax.set_title("nodes by status (now)")
        node_ax.bar(list(timeline.counts), [v[-1] for v in timeline.counts.values()],
                    color=[colors[k] for k in timeline.counts])
    elif timeline.times:
        node_ax.stackplot(timeline.times, *timeline.counts.values(), labels=list(timeline.counts),
                          colors=[colors[k] for k in timeline.counts], step="post")
        node_ax.legend(fontsize="small", loc="upper left")
        node_ax.set_xlabel("seconds")
    for ax in (acc_ax, time_ax, upd_ax):
        if rounds:
            ax.set_xticks(rounds if len(rounds) <= 20 else rounds[:: max(1, len(rounds) // 10)])
    fig.tight_layout()


def _draw_metrics(ax, history: list, rounds: list) -> None:
    """Every metric the task reports, per round: losses (and errors) on the right axis, the others on the left;
    federated evaluation dashed."""
    names = metric_names(history)
    ax.set_title("global model on the test set" if set(names) <= {"accuracy", "loss"} else "global model")
    ax.set_xlabel("round")
    right = ax.twinx()
    colors = iter(["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink",
                   "tab:olive", "tab:cyan", "tab:gray"] * 3)
    for name in names:
        axis = right if is_loss(name) else ax
        axis.plot(rounds, [round_metrics(r).get(name) for r in history], "s--" if "federated" in name else "o-",
                  color=next(colors), label=name)
    ax.set_ylabel(", ".join(n for n in names if not is_loss(n))[:60] or "metric")
    right.set_ylabel(", ".join(n for n in names if is_loss(n))[:60] or "loss")
    if len(names) > 2:
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize="small", loc="center right")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Live plots of a federated-learning run.")
    add_monitor_arguments(parser)
    parser.add_argument("--save", type=Path, default=None, help="write the figure to this PNG file on every refresh")
    args, poller = parse_monitor_args(parser, argv)
    if args.save is not None and args.save.suffix.lower() not in SAVE_FORMATS:
        parser.error(f"--save must name a {', '.join(SAVE_FORMATS)} file, got {args.save}")

    import matplotlib

    interactive = has_display() and not args.once
    if not interactive:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save = args.save
    if save is None and not interactive:
        save = DEFAULT_PNG
        if not args.once:
            print(f"no display: writing the figure to {save} every {args.interval:g}s")
    fig = plt.figure(figsize=(12, 8))
    timeline = NodeTimeline()
    try:
        while True:
            poll = poller.poll()
            if poll.status is not None:
                timeline.add(poll.status)
            elif args.once or poll.refused:  # nothing to draw from; a refused token or certificate will not heal
                print(poll.error if poll.refused else f"coordinator unreachable: {poll.error}", file=sys.stderr)
                return 1
            draw(fig, poll.status or poller.last_status, timeline, poll.error, poll.unreachable_since, poll.refused)
            if save is not None:
                try:
                    save.parent.mkdir(parents=True, exist_ok=True)
                    fig.savefig(save, dpi=100)
                except OSError as exc:
                    print(f"error: cannot write {save}: {exc}", file=sys.stderr)
                    return 2
            if args.once:
                if save is not None:
                    print(f"wrote {save}")
                return 0
            if interactive:
                plt.pause(poller.next_delay())
                if not plt.fignum_exists(fig.number):
                    return 0
            else:
                time.sleep(poller.next_delay())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
