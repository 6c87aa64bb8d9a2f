"""Many update uploads at once: the coordinator's peak memory while it receives them, and how the cap on
uploads in progress (MAX_UPLOADS, 503 busy with Retry-After) spreads them out.

Starts a real coordinator (``coordinator.py`` on 127.0.0.1, FedAvg, C=1, one round, no evaluation) for N nodes,
registers them, and lets each fetch its task and the global model the way a worker does. Then all N send their
update (the global model itself: a 4.8 MB SimpleCNN state_dict) at the same moment, each on its own connection,
from one asyncio process; an upload answered 503 is sent again after its Retry-After, as the worker's retry
policy does. The coordinator's resident memory is read from /proc every 20 ms; its peak (VmHWM) covers the
intake and the round's aggregation of the N updates.

    .venv/bin/python benchmarks/uploads.py --nodes 50 200 500

Prints, per N: every upload accepted or not, the 503 answers, seconds until the last 202, the coordinator's
memory before the uploads, its peak, and after the round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import (NETWORK_ERRORS, SOURCES, Http, json_of, raise_file_limit, register, rss_mb,  # noqa: E402
                     start_coordinator, stop_coordinator, wait_up)


def _multipart(data: bytes) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n"
            f"{json.dumps({'num_samples': 100})}\r\n--{boundary}\r\nContent-Disposition: form-data; "
            f"name=\"state_dict\"; filename=\"update.pt\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    return f"multipart/form-data; boundary={boundary}", body + data + f"\r\n--{boundary}--\r\n".encode()


async def _upload(port, node, source, round_number, content_type, body, counts) -> float:
    """Send one update until it is accepted; returns the time of its 202 (or inf)."""
    for _ in range(200):
        try:
            status, payload, headers = await Http(port, None, source).send(
                "POST", f"/api/v1/rounds/{round_number}/updates", node["token"], body, content_type, timeout=300)
            answer = json_of(payload)
        except NETWORK_ERRORS as exc:
            counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(1 + random.random())
            continue
        if status == 202:
            return time.perf_counter()
        counts[str(status)] = counts.get(str(status), 0) + 1
        if status == 503:
            await asyncio.sleep(float((answer or {}).get("retry_after_s", headers.get("retry-after", 2))))
        else:
            counts[f"final {status} {(answer or {}).get('error')}"] = 1
            return float("inf")
    return float("inf")


async def _round(port, nodes) -> tuple[int, bytes]:
    """Wait until round 1 is open for every node (their task polls); returns (round, the global model's bytes)."""
    http = Http(port, None, keep_alive=True)
    for node in nodes:
        while True:
            status, task = await http.request("GET", "/api/v1/task?wait=30", node["token"], timeout=60)
            if status == 200 and task["action"] == "train":
                break
            await asyncio.sleep(0.2)
    status, model, _ = await Http(port, None).send("GET", "/api/v1/model", nodes[0]["token"], b"", None)
    assert status == 200, status
    return task["round"], model


def _sample_rss(pid: int, stop: threading.Event, samples: list) -> None:
    while not stop.is_set():
        try:
            samples.append(rss_mb(pid)[0])
        except (OSError, KeyError):
            return
        time.sleep(0.02)


def run_one(n: int, port: int, max_uploads: int | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fl-uploads-"))
    extra = ["--max-nodes", str(n), "--min-nodes-to-start", str(n), "--client-fraction", "1",
             "--communication-rounds", "1", "--round-timeout", "900", "--node-timeout", "600"]
    if max_uploads is not None:
        extra += ["--max-uploads", str(max_uploads)]
    coordinator = start_coordinator(tmp, port, extra)
    try:
        asyncio.run(wait_up(port, None))
        nodes = asyncio.run(register(port, None, n, "node-"))
        round_number, model = asyncio.run(_round(port, nodes))
        content_type, body = _multipart(model)
        before = rss_mb(coordinator.pid)[0]
        counts: dict = {}
        samples: list = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(coordinator.pid, stop, samples), daemon=True)
        sampler.start()

        async def all_uploads():
            t0 = time.perf_counter()
            done = await asyncio.gather(*(_upload(port, node, SOURCES[i % len(SOURCES)], round_number,
                                                  content_type, body, counts) for i, node in enumerate(nodes)))
            return t0, done
        t0, done = asyncio.run(all_uploads())
        accepted = sum(t != float("inf") for t in done)
        deadline = time.time() + 300
        while time.time() < deadline:  # the round closes and aggregates the n updates
            status, health = asyncio.run(Http(port, None).request("GET", "/api/v1/health"))
            if health and health["state"] in ("finished", "waiting_for_nodes") or (health and health["round"] > 1):
                break
            time.sleep(0.2)
        time.sleep(1)
        stop.set()
        after, peak = rss_mb(coordinator.pid)
        return {"uploads": n, "update_bytes": len(model), "accepted": accepted,
                "answers_503": counts.get("503", 0), "other_errors": {k: v for k, v in counts.items() if k != "503"},
                "seconds_to_last_202": round(max(done) - t0, 2) if accepted == n else None,
                "rss_before_mb": round(before), "peak_rss_mb": round(max(peak, max(samples, default=0))),
                "rss_after_round_mb": round(after), "round_state": health["state"] if health else None}
    finally:
        stop_coordinator(coordinator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--max-uploads", type=int, help="the coordinator's --max-uploads (default: its default)")
    parser.add_argument("--port", type=int, default=5078)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    raise_file_limit()
    reports = []
    for n in args.nodes:
        report = run_one(n, args.port, args.max_uploads)
        print(json.dumps(report), flush=True)
        reports.append(report)
    print(f"{'uploads':>8} {'accepted':>9} {'503s':>6} {'s to last 202':>14} {'RSS before':>11} {'peak RSS':>9} "
          f"{'after round':>12}")
    for r in reports:
        print(f"{r['uploads']:>8} {r['accepted']:>9} {r['answers_503']:>6} {str(r['seconds_to_last_202']):>14} "
              f"{r['rss_before_mb']:>8} MB {r['peak_rss_mb']:>6} MB {r['rss_after_round_mb']:>9} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
