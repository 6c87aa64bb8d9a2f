"""What the scale benchmarks share: a small asyncio HTTP/1.1 client (thousands of simulated nodes in one process,
each request on a new connection or a kept one), a real coordinator started on 127.0.0.1, node registration, and
the coordinator's memory read from /proc (Linux)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOIN, MONITOR = "benchmark-join-token-0123", "benchmark-monitor-token-0123"
SOURCES = [f"127.0.0.{i}" for i in range(2, 18)]  # spread client ports over 16 loopback addresses
NETWORK_ERRORS = (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)


class Http:
    """One HTTP/1.1 connection at a time to the coordinator (reopened after the server closes it)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None, source: str = "127.0.0.1",
                 keep_alive: bool = False) -> None:
        self.port, self.tls, self.source, self.keep_alive = port, tls, source, keep_alive
        self.streams = None

    async def request(self, method: str, path: str, token: str | None = None, body: dict | None = None,
                      timeout: float = 60.0) -> tuple[int, dict | None]:
        """(status, JSON answer or None) of one request with an optional JSON ``body``."""
        data = b"" if body is None else json.dumps(body).encode()
        status, payload, _ = await self.send(method, path, token, data,
                                             "application/json" if body is not None else None, timeout)
        return status, json_of(payload)

    async def send(self, method: str, path: str, token: str | None, data: bytes, content_type: str | None,
                   timeout: float = 60.0) -> tuple[int, bytes, dict]:
        """(status, body, headers with lower-case names) of one request whose body is ``data``."""
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(data)}"]
        if token:
            head.append(f"Authorization: Bearer {token}")
        if content_type:
            head.append(f"Content-Type: {content_type}")
        if not self.keep_alive:
            head.append("Connection: close")
        try:
            return await asyncio.wait_for(self._exchange(("\r\n".join(head) + "\r\n\r\n").encode(), data), timeout)
        except BaseException:
            self.close()
            raise
        finally:
            if not self.keep_alive:
                self.close()

    async def _exchange(self, head: bytes, data: bytes) -> tuple[int, bytes, dict]:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.tls,
                                                         local_addr=(self.source, 0),
                                                         server_hostname="localhost" if self.tls else None)
        reader, writer = self.streams
        writer.write(head)
        if data:
            writer.write(data)
            await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("closed by the server")
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin1").partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await reader.readexactly(int(headers.get("content-length", 0)))
        if "close" in headers.get("connection", "").lower():
            self.close()
        return int(status_line.split()[1]), payload, headers

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def json_of(payload: bytes) -> dict | None:
    """A JSON object answer, decoded (None for anything else)."""
    return json.loads(payload) if payload[:1] == b"{" else None


def client_tls(certfile: str | None) -> ssl.SSLContext | None:
    """The clients' TLS context trusting ``certfile`` (None: plain HTTP)."""
    return ssl.create_default_context(cafile=certfile) if certfile else None


def raise_file_limit() -> None:
    """Let this process open as many descriptors as the hard limit allows (one per simulated connection)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_coordinator(tmp: Path, port: int, extra: list[str], tls: bool = False) -> subprocess.Popen:
    """``coordinator.py`` on 127.0.0.1:``port`` with its folders under ``tmp``, rate limits off, no evaluation, no
    checkpoints, the benchmark's tokens, and ``extra`` flags; its output goes to ``tmp/coordinator.out``."""
    args = [sys.executable, str(ROOT / "coordinator.py"), "--host", "127.0.0.1", "--port", str(port),
            "--temp-dir", str(tmp / "temp"), "--models-dir", str(tmp / "models"), "--logs-dir", str(tmp / "logs"),
            "--data-dir", str(tmp / "data"), "--no-eval", "--no-save-model", "--rate-limit", "0",
            "--address-rate-limit", "0", "--token", JOIN, "--monitor-token", MONITOR, *extra]
    if tls:
        subprocess.run([sys.executable, str(ROOT / "make_cert.py"), "--out-dir", str(tmp / "tls")], check=True,
                       capture_output=True)
        args += ["--certfile", str(tmp / "tls" / "coordinator.crt"), "--keyfile", str(tmp / "tls" / "coordinator.key")]
    log = open(tmp / "coordinator.out", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)


def stop_coordinator(coordinator: subprocess.Popen) -> None:
    """SIGTERM (the coordinator's clean stop), then kill after 30 s."""
    coordinator.send_signal(signal.SIGTERM)
    try:
        coordinator.wait(30)
    except subprocess.TimeoutExpired:
        coordinator.kill()


async def wait_up(port: int, tls) -> None:
    """Return once ``/health`` answers 200 (at most 120 s; then SystemExit)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            status, _ = await Http(port, tls).request("GET", "/api/v1/health", timeout=5)
            if status == 200:
                return
        except NETWORK_ERRORS:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("the coordinator did not start; see coordinator.out")


async def register(port: int, tls, count: int, prefix: str) -> list[dict]:
    """Register ``count`` nodes named ``<prefix><i>`` (32 at a time); returns their node_id and token."""
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
                except NETWORK_ERRORS:
                    await asyncio.sleep(1)
    await asyncio.gather(*(registrar(SOURCES[i % len(SOURCES)]) for i in range(32)))
    return nodes


def quantile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident memory now, its peak so far) of process ``pid``, MiB (VmRSS, VmHWM)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def run_loop(coroutine):
    """``asyncio.run(coroutine)`` on uvloop where it is installed (a load process then spends about half the CPU
    per request, and leaves it to the coordinator)."""
    try:
        from uvloop import new_event_loop
    except ImportError:
        new_event_loop = None
    if new_event_loop is None or not hasattr(asyncio, "Runner"):  # Python 3.10 has no Runner
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)


def listen_overflows() -> int:
    """Connections the kernel dropped so far because a listening socket's accept queue was full (Linux's
    TcpExt ListenOverflows, for the whole network namespace; 0 elsewhere)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2]):
        fields = dict(zip(names.split(), values.split()))
        if "ListenOverflows" in fields:
            return int(fields["ListenOverflows"])
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
