"""Thousands of nodes waiting for work: latency of health, heartbeat and status, and how fast a round reaches them.

Starts a real coordinator (``coordinator.py``, on 127.0.0.1, rate limits off, no evaluation) and registers N
simulated nodes. Each then waits the way a worker waits (``fedrest.worker_node``): a long poll
``GET /api/v1/task?wait=30`` asked again as soon as it is answered, and a heartbeat every HEARTBEAT_INTERVAL
seconds (10 s). The nodes run as coroutines in ``--processes`` load processes; by default every request opens a
new connection (``--keep-alive``: a node keeps one connection for its polls, as a worker's session does; its
heartbeats always use new connections, so that 10,000 nodes fit the 20,000 descriptors a process may open here).

While they wait, a prober times ``/health``, a heartbeat and ``/status`` (the monitor's call) every 0.1 s, each
on a new connection, for ``--measure`` seconds, and prints p50/p99/max. Then one more node registers: the
coordinator, started with MIN_NODES_TO_START=N+1 and Poisson client sampling (DP-FedAvg's, probability
``--fraction``; the only sampling that picks fewer than MIN_NODES_TO_START), opens round 1 for about fraction*N of
the waiting nodes; we time from that registration to each sampled node's "train" answer.

    .venv/bin/python benchmarks/many_nodes.py --nodes 10000 [--tls] [--keep-alive] [--fraction 0.1]

Prints the figures the README quotes and the coordinator's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOIN, MONITOR = "benchmark-join-token-0123", "benchmark-monitor-token-0123"
SOURCES = [f"127.0.0.{i}" for i in range(2, 18)]  # spread client ports over 16 loopback addresses


# ----------------------------------------------------------------------------- a small HTTP/1.1 client


class Http:
    """One HTTP/1.1 connection at a time to the coordinator (reopened after the server closes it)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None, source: str, keep_alive: bool) -> None:
        self.port, self.tls, self.source, self.keep_alive = port, tls, source, keep_alive
        self.streams = None

    async def request(self, method: str, path: str, token: str | None = None, body: dict | None = None,
                      timeout: float = 60.0) -> tuple[int, dict | None]:
        data = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(data)}"]
        if token:
            head.append(f"Authorization: Bearer {token}")
        if body is not None:
            head.append("Content-Type: application/json")
        if not self.keep_alive:
            head.append("Connection: close")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + data
        try:
            return await asyncio.wait_for(self._exchange(raw), timeout)
        except BaseException:
            self.close()
            raise
        finally:
            if not self.keep_alive:
                self.close()

    async def _exchange(self, raw: bytes) -> tuple[int, dict | None]:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.tls,
                                                         local_addr=(self.source, 0),
                                                         server_hostname="localhost" if self.tls else None)
        reader, writer = self.streams
        writer.write(raw)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("closed by the server")
        length, close = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                close = True
        payload = await reader.readexactly(length)
        if close:
            self.close()
        status = int(status_line.split()[1])
        return status, (json.loads(payload) if payload[:1] == b"{" else None)

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def _client_tls(certfile: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=certfile) if certfile else None


# ----------------------------------------------------------------------------- the waiting nodes (load processes)


async def _node(port, tls, source, keep_alive, node, results, heartbeat_interval, stop_at):
    poller = Http(port, tls, source, keep_alive)
    beater = Http(port, tls, source, False)

    async def heartbeats():
        await asyncio.sleep(random.uniform(0, heartbeat_interval))
        while time.time() < stop_at:
            try:
                status, _ = await beater.request("POST", f"/api/v1/nodes/{node['node_id']}/heartbeat", node["token"],
                                                 timeout=30)
                results["heartbeats"] += 1
                if status != 200:
                    results["errors"][f"heartbeat {status}"] = results["errors"].get(f"heartbeat {status}", 0) + 1
            except (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError) as exc:
                key = f"heartbeat {type(exc).__name__}"
                results["errors"][key] = results["errors"].get(key, 0) + 1
            await asyncio.sleep(heartbeat_interval)

    beat = asyncio.ensure_future(heartbeats())
    await asyncio.sleep(random.uniform(0, 3))
    while time.time() < stop_at:
        try:
            status, answer = await poller.request("GET", "/api/v1/task?wait=30", node["token"], timeout=65)
        except (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError) as exc:
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


def _load_process(port, certfile, keep_alive, nodes, heartbeat_interval, stop_at, out_queue):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = {"heartbeats": 0, "polls": 0, "errors": {}, "train": []}
    tls = _client_tls(certfile)

    async def main():
        await asyncio.gather(*(_node(port, tls, SOURCES[i % len(SOURCES)], keep_alive, node, results,
                                     heartbeat_interval, stop_at) for i, node in enumerate(nodes)))
    asyncio.run(main())
    out_queue.put(results)


# ----------------------------------------------------------------------------- the coordinator and the prober


def _start_coordinator(tmp: Path, port: int, nodes: int, fraction: float, tls: bool, threads: int):
    args = [sys.executable, str(ROOT / "coordinator.py"), "--host", "127.0.0.1", "--port", str(port),
            "--temp-dir", str(tmp / "temp"), "--models-dir", str(tmp / "models"), "--logs-dir", str(tmp / "logs"),
            "--data-dir", str(tmp / "data"), "--no-eval", "--no-save-model", "--rate-limit", "0",
            "--address-rate-limit", "0", "--max-nodes", str(nodes + 1), "--min-nodes-to-start", str(nodes + 1),
            "--client-fraction", str(fraction), "--dp-noise-multiplier", "1.0", "--clip-norm", "10",
            "--communication-rounds", "1", "--round-timeout", "600", "--node-timeout", "120",
            "--token", JOIN, "--monitor-token", MONITOR, "--server-threads", str(threads)]
    if tls:
        subprocess.run([sys.executable, str(ROOT / "make_cert.py"), "--out-dir", str(tmp / "tls")], check=True,
                       capture_output=True)
        args += ["--certfile", str(tmp / "tls" / "coordinator.crt"), "--keyfile", str(tmp / "tls" / "coordinator.key")]
    log = open(tmp / "coordinator.out", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)


async def _wait_up(port, tls) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            status, _ = await Http(port, tls, "127.0.0.1", False).request("GET", "/api/v1/health", timeout=5)
            if status == 200:
                return
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("the coordinator did not start; see coordinator.out")


async def _register(port, tls, count: int, prefix: str) -> list[dict]:
    nodes, queue = [], list(range(count))

    async def registrar(source):
        http = Http(port, tls, source, True)
        while queue:
            i = queue.pop()
            for _ in range(5):
                try:
                    status, answer = await http.request("POST", "/api/v1/nodes", JOIN, {
                        "name": f"{prefix}{i}", "device": "cpu", "num_samples": 100, "system_info": {}}, timeout=60)
                    if status in (200, 201):
                        nodes.append({"node_id": answer["node_id"], "token": answer["node_token"]})
                        break
                except (OSError, asyncio.TimeoutError, ConnectionError):
                    await asyncio.sleep(1)
    await asyncio.gather(*(registrar(SOURCES[i % len(SOURCES)]) for i in range(32)))
    return nodes


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
            except (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                failures[name] += 1
            timings[name].append(time.perf_counter() - t0)
        await asyncio.sleep(0.1)
    return {name: {"n": len(v), "failed": failures[name], "p50_ms": 1000 * statistics.median(v),
                   "p99_ms": 1000 * _quantile(v, 0.99), "max_ms": 1000 * max(v)} for name, v in timings.items()}


def _quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def run(args) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="fl-many-"))
    port = args.port
    coordinator = _start_coordinator(tmp, port, args.nodes, args.fraction, args.tls, args.threads)
    certfile = str(tmp / "tls" / "coordinator.crt") if args.tls else None
    tls = _client_tls(certfile)
    try:
        asyncio.run(_wait_up(port, tls))
        t0 = time.time()
        nodes = asyncio.run(_register(port, tls, args.nodes, "node-"))
        print(f"registered {len(nodes)} nodes in {time.time() - t0:.1f} s", flush=True)
        stop_at = time.time() + args.warmup + args.measure + 20
        queue = mp.Queue()
        shares = [nodes[i::args.processes] for i in range(args.processes)]
        loaders = [mp.Process(target=_load_process, args=(port, certfile, args.keep_alive, share, 10.0, stop_at,
                                                           queue)) for share in shares]
        for p in loaders:
            p.start()
        time.sleep(args.warmup)
        print(f"all {len(nodes)} nodes waiting; probing for {args.measure:g} s", flush=True)
        probes = asyncio.run(_probe(port, tls, nodes[0], args.measure))
        rss_waiting = _rss_mb(coordinator.pid)
        t_open = time.time()
        asyncio.run(_register(port, tls, 1, "trigger-"))  # N+1 online: round 1 opens
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
                  "probes": probes, "heartbeats": sum(r["heartbeats"] for r in results),
                  "polls": sum(r["polls"] for r in results), "errors": errors,
                  "sampled": len(train), "reached_p50_s": statistics.median(train) if train else None,
                  "reached_max_s": train[-1] if train else None,
                  "coordinator_rss_mb": rss_waiting[0], "coordinator_peak_rss_mb": _rss_mb(coordinator.pid)[1]}
        return report
    finally:
        coordinator.send_signal(signal.SIGTERM)
        try:
            coordinator.wait(30)
        except subprocess.TimeoutExpired:
            coordinator.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--fraction", type=float, default=0.1, help="client fraction of the round opened at the end")
    parser.add_argument("--tls", action="store_true", help="HTTPS (a certificate from make_cert.py)")
    parser.add_argument("--keep-alive", action="store_true", help="a node's polls reuse its connection")
    parser.add_argument("--processes", type=int, default=2, help="load processes")
    parser.add_argument("--threads", type=int, default=64, help="the coordinator's --server-threads")
    parser.add_argument("--warmup", type=float, default=20.0)
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
