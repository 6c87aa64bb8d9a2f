"""Thousands of nodes waiting for work: latency of health, heartbeat and status, and how fast a round reaches them.

Starts a real coordinator (``coordinator.py``, on 127.0.0.1, rate limits off, no evaluation) and registers N
simulated nodes. Each then waits the way a worker waits (``fedrest.worker_node``): a long poll
``GET /api/v1/task?wait=30`` asked again as soon as it is answered, and a heartbeat every HEARTBEAT_INTERVAL
seconds (10 s). The nodes run as coroutines in ``--processes`` load processes (on uvloop where installed, so that
the load generator leaves the coordinator more of the machine); each starts polling at a random moment of its
first ``--spread`` seconds (workers that did not all start in the same second; ``--spread 3`` shows a crowd that
did: its polls come back as a wave for the first few minutes). By default every request opens a
new connection (``--keep-alive``: a node keeps one connection for its polls and one for its heartbeats, as a
worker's two sessions do; the coordinator then holds two connections per node: 10,000 nodes need more than the
20,000 open files this machine allows a process, so run it under ``ulimit -n 65536``, as root or with a raised
hard limit).

While they wait, a prober times ``/health``, a heartbeat and ``/status`` (the monitor's call) every 0.1 s, each
on a new connection, for ``--measure`` seconds, and prints p50/p99/max. Then one more node registers: the
coordinator, started with MIN_NODES_TO_START=N+1 and Poisson client sampling (DP-FedAvg's, probability
``--fraction``; the only sampling that picks fewer than MIN_NODES_TO_START), opens round 1 for about fraction*N of
the waiting nodes; we time from that registration to each sampled node's "train" answer.

    .venv/bin/python benchmarks/many_nodes.py --nodes 10000 [--tls] [--keep-alive] [--fraction 0.1] [--silent 10]

Prints the figures the README quotes, the coordinator's peak RSS and CPU share, the load processes' CPU share, and
(Linux) how many connections overflowed the kernel's accept queue while the prober ran (each costs its client a
SYN retransmission: 1 s, then 3 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import (MONITOR, NETWORK_ERRORS, SOURCES, Http, client_tls, cpu_seconds,  # noqa: E402
                     listen_overflows, quantile, raise_file_limit, register, rss_mb, run_loop, start_coordinator,
                     stop_coordinator, wait_up)


# ----------------------------------------------------------------------------- the waiting nodes (load processes)


async def _node(port, tls, source, keep_alive, node, results, heartbeat_interval, spread, stop_at):
    poller = Http(port, tls, source, keep_alive)
    beater = Http(port, tls, source, keep_alive)

    async def heartbeats():
        await asyncio.sleep(random.uniform(0, heartbeat_interval))
        while time.time() < stop_at:
            try:
                status, _ = await beater.request("POST", f"/api/v1/nodes/{node['node_id']}/heartbeat", node["token"],
                                                 timeout=30)
                results["heartbeats"] += 1
                if status != 200:
                    results["errors"][f"heartbeat {status}"] = results["errors"].get(f"heartbeat {status}", 0) + 1
            except NETWORK_ERRORS as exc:
                key = f"heartbeat {type(exc).__name__}"
                results["errors"][key] = results["errors"].get(key, 0) + 1
            await asyncio.sleep(heartbeat_interval)

    beat = asyncio.ensure_future(heartbeats())
    await asyncio.sleep(random.uniform(0, spread))
    while time.time() < stop_at:
        try:
            status, answer = await poller.request("GET", "/api/v1/task?wait=30", node["token"], timeout=65)
        except NETWORK_ERRORS as exc:
            key = f"poll {type(exc).__name__}"
            results["errors"][key] = results["errors"].get(key, 0) + 1
            await asyncio.sleep(1)
            continue
        results["polls"] += 1
        if status != 200:
            results["errors"][f"poll {status}"] = results["errors"].get(f"poll {status}", 0) + 1
            await asyncio.sleep(1)
        elif answer and answer.get("action") == "train":
            results["train"].append(time.time())
            break  # a worker would train now; this one only says when it learnt of the round
    await beat


def _load_process(port, certfile, keep_alive, nodes, heartbeat_interval, spread, stop_at, out_queue):
    raise_file_limit()
    results = {"heartbeats": 0, "polls": 0, "errors": {}, "train": []}
    tls = client_tls(certfile)

    async def main():
        await asyncio.gather(*(_node(port, tls, SOURCES[i % len(SOURCES)], keep_alive, node, results,
                                     heartbeat_interval, spread, stop_at) for i, node in enumerate(nodes)))
    run_loop(main())
    results["cpu_s"] = sum(os.times()[:2])
    out_queue.put(results)


# ----------------------------------------------------------------------------- the coordinator and the prober


def _start_coordinator(tmp: Path, port: int, nodes: int, fraction: float, tls: bool, threads: int):
    return start_coordinator(tmp, port, [
        "--max-nodes", str(nodes + 1), "--min-nodes-to-start", str(nodes + 1), "--client-fraction", str(fraction),
        "--dp-noise-multiplier", "1.0", "--clip-norm", "10", "--communication-rounds", "1", "--round-timeout", "600",
        "--node-timeout", "120", "--server-threads", str(threads)], tls)


async def _probe(port, tls, probe_node, seconds: float) -> dict:
    timings = {"health": [], "heartbeat": [], "status": []}
    failures = {k: 0 for k in timings}
    calls = {"health": ("GET", "/api/v1/health", None),
             "heartbeat": ("POST", f"/api/v1/nodes/{probe_node['node_id']}/heartbeat", probe_node["token"]),
             "status": ("GET", "/api/v1/status", MONITOR)}
    end = time.time() + seconds
    while time.time() < end:
        for name, (method, path, token) in calls.items():
            t0 = time.perf_counter()
            try:
                status, _ = await Http(port, tls, "127.0.0.1", False).request(method, path, token, timeout=30)
                if status != 200:
                    failures[name] += 1
            except NETWORK_ERRORS:
                failures[name] += 1
            timings[name].append(time.perf_counter() - t0)
        await asyncio.sleep(0.1)
    return {name: {"n": len(v), "failed": failures[name], "p50_ms": 1000 * statistics.median(v),
                   "p99_ms": 1000 * quantile(v, 0.99), "max_ms": 1000 * max(v)} for name, v in timings.items()}


def run(args) -> dict:
    raise_file_limit()
    tmp = Path(tempfile.mkdtemp(prefix="fl-many-"))
    port = args.port
    coordinator = _start_coordinator(tmp, port, args.nodes, args.fraction, args.tls, args.threads)
    certfile = str(tmp / "tls" / "coordinator.crt") if args.tls else None
    tls = client_tls(certfile)
    try:
        asyncio.run(wait_up(port, tls))
        t0 = time.time()
        nodes = asyncio.run(register(port, tls, args.nodes, "node-"))
        print(f"registered {len(nodes)} nodes in {time.time() - t0:.1f} s", flush=True)
        stop_at = time.time() + args.warmup + args.measure + 20
        queue = mp.Queue()
        shares = [nodes[i::args.processes] for i in range(args.processes)]
        loaders = [mp.Process(target=_load_process, args=(port, certfile, args.keep_alive, share, 10.0, args.spread,
                                                           stop_at, queue)) for share in shares]
        for p in loaders:
            p.start()
        time.sleep(args.warmup)
        print(f"all {len(nodes)} nodes waiting; probing for {args.measure:g} s", flush=True)
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.silent)]  # no byte, no TLS hello
        cpu_before, t_measure, overflows = cpu_seconds(coordinator.pid), time.time(), listen_overflows()
        loaders_before = sum(cpu_seconds(p.pid) for p in loaders)
        probes = run_loop(_probe(port, tls, nodes[0], args.measure))
        cpu_share = (cpu_seconds(coordinator.pid) - cpu_before) / (time.time() - t_measure)
        loaders_share = (sum(cpu_seconds(p.pid) for p in loaders) - loaders_before) / (time.time() - t_measure)
        overflows = listen_overflows() - overflows
        for connection in silent:
            connection.close()
        rss_waiting = rss_mb(coordinator.pid)
        t_open = time.time()
        asyncio.run(register(port, tls, 1, "trigger-"))  # N+1 online: round 1 opens
        time.sleep(max(0.0, stop_at - time.time()))
        results = [queue.get(timeout=120) for _ in loaders]
        for p in loaders:
            p.join(10)
        train = sorted(t - t_open for r in results for t in r["train"])
        errors: dict = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        report = {"nodes": len(nodes), "tls": args.tls, "keep_alive": args.keep_alive, "threads": args.threads,
                  "silent_connections": args.silent,
                  "spread_s": args.spread, "probes": probes, "coordinator_cpu_cores": round(cpu_share, 2),
                  "load_processes_cpu_cores": round(loaders_share, 2), "accept_queue_overflows": overflows,
                  "heartbeats": sum(r["heartbeats"] for r in results),
                  "polls": sum(r["polls"] for r in results), "errors": errors,
                  "sampled": len(train), "reached_p50_s": statistics.median(train) if train else None,
                  "reached_max_s": train[-1] if train else None,
                  "coordinator_rss_mb": rss_waiting[0], "coordinator_peak_rss_mb": rss_mb(coordinator.pid)[1]}
        return report
    finally:
        stop_coordinator(coordinator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--fraction", type=float, default=0.1, help="client fraction of the round opened at the end")
    parser.add_argument("--tls", action="store_true", help="HTTPS (a certificate from make_cert.py)")
    parser.add_argument("--keep-alive", action="store_true", help="a node keeps a connection for its polls and one "
                        "for its heartbeats, as a worker does (default: a new connection per request)")
    parser.add_argument("--processes", type=int, default=2, help="load processes")
    parser.add_argument("--silent", type=int, default=0, help="TCP connections held open and silent (no request, "
                        "no TLS hello) while the prober times its requests")
    parser.add_argument("--threads", type=int, default=64, help="the coordinator's --server-threads")
    parser.add_argument("--spread", type=float, default=30.0, help="seconds over which the nodes' first polls are "
                        "spread (the wait they ask for: 30)")
    parser.add_argument("--warmup", type=float, default=45.0, help="seconds from the load's start to the probes")
    parser.add_argument("--measure", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    report = run(args)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    os._exit(0)


if __name__ == "__main__":
    main()
