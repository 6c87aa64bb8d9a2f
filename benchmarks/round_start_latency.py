"""How fast a waiting worker learns that a round opened (the long poll of GET /api/v1/task).

Serves a real coordinator (serving.make_server, as coordinator.py does: the long poll parked without a thread)
on 127.0.0.1 (no evaluation), and repeats: node A long-polls ``/task?wait=30``; node B registers, which brings
the federation to MIN_NODES_TO_START=2 and opens a round; we time from B's registration request to A's poll
answer "train". Prints the median and maximum.

    .venv/bin/python benchmarks/round_start_latency.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedrest.client import CoordinatorClient, make_session  # noqa: E402
from config import Config  # noqa: E402
from coordinator import create_app  # noqa: E402
from fedrest.server.serving import bound_port, make_server  # noqa: E402

TOKEN = "benchmark-token-0123"


def one_trial(tmp: str) -> float:
    cfg = Config(data_dir=f"{tmp}/data", models_dir=f"{tmp}/models", logs_dir=f"{tmp}/logs", temp_dir=f"{tmp}/temp",
                 no_eval=True, save_model=False, min_nodes_to_start=2, token=TOKEN, communication_rounds=1)
    app = create_app(cfg)
    server = make_server(app, "127.0.0.1", 0, threads=8, client_timeout=30)
    threading.Thread(target=server.serve, daemon=True).start()
    address = f"127.0.0.1:{bound_port(server)}"
    try:
        a = CoordinatorClient(address, session=make_session())
        answer, _ = a.register("a", "cpu", 100, {}, TOKEN)
        a.token = answer["node_token"]
        got: dict = {}

        def poll():
            got["task"] = a.task(wait=30)
            got["t"] = time.perf_counter()

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.3)  # A is now inside its long poll
        b = CoordinatorClient(address, session=make_session())
        t0 = time.perf_counter()
        b.register("b", "cpu", 100, {}, TOKEN)
        poller.join(35)
        assert got["task"]["action"] == "train", got
        return got["t"] - t0
    finally:
        app.extensions["federation"].stop()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    latencies = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            latencies.append(one_trial(tmp))
    ms = [1000 * x for x in latencies]
    print(f"round-start latency over {len(ms)} trials: median {statistics.median(ms):.1f} ms, "
          f"max {max(ms):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
