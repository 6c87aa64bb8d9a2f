"""The coordinator's server (fedrest.server.serving, long_polls) on 127.0.0.1: waiting workers hold no request
thread, a silent connection delays nobody (HTTP and HTTPS), oversized headers and silent bodies are cut."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import JOIN_TOKEN, ROOT, make_config, multipart_body, upload_form
from fedrest.client import CoordinatorClient, make_session
from fedrest.serialization import state_dict_to_bytes
from fedrest.server.app import create_app
from fedrest.server.long_polls import EARLIEST_ANSWER, LongPollFront
from fedrest.server.serving import bound_port, make_server

THREADS = 4  # request threads of the servers below: fewer than the pollers


@pytest.fixture
def serve(tmp_path):
    """serve(**config) -> (base URL, federation); the server and the driver are stopped after the test."""
    started = []

    def _serve(tls: bool = False, client_timeout: float = 30.0, **overrides):
        cfg = make_config(tmp_path, **overrides)
        app = create_app(cfg, start_driver=False)
        certfile = keyfile = None
        if tls:
            subprocess.run([sys.executable, str(ROOT / "make_cert.py"), "--out-dir", str(tmp_path / "tls")],
                           check=True, capture_output=True)
            certfile, keyfile = str(tmp_path / "tls" / "coordinator.crt"), str(tmp_path / "tls" / "coordinator.key")
        server = make_server(app, "127.0.0.1", 0, threads=THREADS, client_timeout=client_timeout,
                             certfile=certfile, keyfile=keyfile)
        threading.Thread(target=server.serve, daemon=True).start()
        federation = app.extensions["federation"]
        started.append((federation, server))
        scheme = "https" if tls else "http"
        return f"{scheme}://127.0.0.1:{bound_port(server)}", federation, certfile

    yield _serve
    for federation, server in started:
        federation.stop()
        server.stop()


def _node(url: str, name: str, ca_cert: str | None = None) -> CoordinatorClient:
    client = CoordinatorClient(url, session=make_session(ca_cert=ca_cert))
    answer, _ = client.register(name, "cpu", 100, {}, JOIN_TOKEN)
    client.token = answer["node_token"]
    client.node_id = answer["node_id"]
    return client


def _timed(call) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = call()
    return time.perf_counter() - t0, result


def test_more_idle_pollers_than_threads_while_health_heartbeat_and_an_upload_answer(serve):
    url, fed, _ = serve(client_fraction=0.01)
    trainer = _node(url, "trainer")  # MIN_NODES_TO_START=1: round 1 opens for the trainer alone
    fed.tick()
    assert fed.state.participants == [trainer.node_id]
    pollers = [_node(url, f"idle-{i}") for i in range(3 * THREADS)]
    pool = ThreadPoolExecutor(len(pollers))
    polls = [pool.submit(p.task, 20.0) for p in pollers]
    deadline = time.monotonic() + 10
    while sum(n.parked for n in fed.nodes.values()) < len(pollers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(n.parked for n in fed.nodes.values()) == len(pollers)  # all waiting, none in a thread
    assert all(n.polling == 0 for n in fed.nodes.values())

    health_s, health = _timed(lambda: requests.get(f"{url}/api/v1/health", timeout=10))
    beat_s, beat = _timed(lambda: pollers[0].heartbeat(pollers[0].node_id))
    data = state_dict_to_bytes(fed.global_state)
    upload_s, accepted = _timed(lambda: trainer.submit_update(1, {"num_samples": 100}, data))
    assert health.status_code == 200 and beat["node_status"] == "online" and accepted["accepted"] is True
    # A thread-per-request server with 4 threads answers none of them before the 20 s polls end.
    assert max(health_s, beat_s, upload_s) < 5, (health_s, beat_s, upload_s)
    assert not any(p.done() for p in polls)  # still parked
    fed.stop()  # a stopping coordinator answers every parked poll at once
    answers = [p.result(timeout=10) for p in polls]
    assert {a["action"] for a in answers} == {"wait"}
    pool.shutdown()


def test_a_parked_poll_gets_its_task_when_the_round_opens_and_the_wait_answer_at_its_deadline(serve):
    url, fed, _ = serve(min_nodes_to_start=2)
    fed.start()
    a = _node(url, "a")
    waited, answer = _timed(lambda: a.task(1.5))
    assert answer["action"] == "wait" and EARLIEST_ANSWER * 1.5 - 0.05 < waited < 5
    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(_timed, lambda: a.task(30.0))
        time.sleep(0.5)
        _node(url, "b")  # the second node: round 1 opens
        took, task = poll.result(timeout=35)
    assert task["action"] == "train" and task["round"] == 1
    assert took < 5  # not at the poll's 30 s deadline
    deadline = time.monotonic() + 2.0  # the parked count is told to the federation in batches (SETTLE_BATCH_S)
    while fed.nodes[a.node_id].parked and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fed.nodes[a.node_id].parked == 0


def test_a_poll_whose_client_went_away_is_forgotten(serve):
    url, fed, _ = serve()
    a = _node(url, "a")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{url}/api/v1/task", params={"wait": "30"}, timeout=(5, 1),
                      headers={"Authorization": f"Bearer {a.token}"})
    deadline = time.monotonic() + 5
    while fed.nodes[a.node_id].parked and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fed.nodes[a.node_id].parked == 0


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_silent_connection_delays_no_heartbeat(serve, tls):
    url, fed, ca_cert = serve(tls=tls)
    node = _node(url, "a", ca_cert)
    silent = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))  # no TLS hello, no request
    try:
        time.sleep(0.3)
        took, answer = _timed(lambda: node.heartbeat(node.node_id))
        fresh = _node(url, "b", ca_cert)  # a new connection, a new handshake
    finally:
        silent.close()
    assert answer["node_status"] == "online" and fresh.node_id != node.node_id
    assert took < 2, took  # cheroot froze HTTPS for its 30 s socket timeout


def test_headers_too_large_get_431_a_garbled_request_a_json_400_and_a_silent_body_is_cut(serve):
    url, fed, _ = serve(client_timeout=1.0)
    answer = requests.get(f"{url}/api/v1/health", headers={"X-Big": "x" * 70_000}, timeout=10)
    assert answer.status_code == 431 and answer.json()["error"] == "headers_too_large"
    port = int(url.rsplit(":", 1)[1])
    for garbled in (b"GARBAGE\r\n\r\n", b"POST /api/v1/nodes HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(garbled)
            head, _, body = raw.recv(4096).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, head
        assert json.loads(body)["error"] == "bad_request"  # JSON like every other error, not uvicorn's text
    node = _node(url, "a")
    fed.tick()  # round 1 opens for node a: its upload is read (a stale one is answered 409 before its body)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"POST /api/v1/rounds/1/updates HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + node.token.encode() + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\n")
        t0 = time.monotonic()
        reply = slow.recv(4096)
        took = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 4"), reply[:80]
    assert 0.9 < took < 8  # cut after CLIENT_TIMEOUT (1 s) of silence
    assert requests.get(f"{url}/api/v1/health", timeout=5).status_code == 200


def test_an_upload_over_the_cap_is_answered_503_and_its_worker_waits_its_turn(serve, tmp_path):
    url, fed, _ = serve(max_uploads=1, min_nodes_to_start=2)
    a, b = _node(url, "a"), _node(url, "b")
    fed.tick()
    assert sorted(fed.state.participants) == sorted([a.node_id, b.node_id])
    content_type, body = multipart_body(upload_form(fed.global_state, {"num_samples": 100}))
    incoming = tmp_path / "temp" / "updates" / "incoming"
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:  # a's upload, half sent: the slot
        slow.sendall(f"POST /api/v1/rounds/1/updates HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a.token}\r\n"
                     f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body[:len(body) // 2])
        deadline = time.monotonic() + 5
        while not any(incoming.glob(".upload-*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(incoming.glob(".upload-*"))  # a's part is streaming to disk
        refused = requests.post(f"{url}/api/v1/rounds/1/updates", data=body, timeout=10,
                                headers={"Authorization": f"Bearer {b.token}", "Content-Type": content_type})
        assert refused.status_code == 503 and refused.json()["error"] == "busy"
        assert 1 <= int(refused.headers["Retry-After"]) <= 4
        with ThreadPoolExecutor(1) as pool:  # the worker's client: it waits for Retry-After and sends again
            waiting = pool.submit(_timed, lambda: b.submit_update(1, {"num_samples": 100},
                                                                  state_dict_to_bytes(fed.global_state)))
            time.sleep(0.5)
            assert not waiting.done()
            slow.sendall(body[len(body) // 2:])
            assert slow.recv(4096).startswith(b"HTTP/1.1 202")
            took, accepted = waiting.result(timeout=30)
    assert accepted["accepted"] is True and took >= 0.9  # answered after its turn came
    assert sorted(fed.state.updates) == sorted([a.node_id, b.node_id])
    assert fed.requests_refused_total["busy"] >= 2 and list(incoming.iterdir()) == []


def test_a_parked_poll_answered_as_its_client_goes_away_ends_quietly(tmp_path, caplog):
    """A crowd of workers dropping at once: the answer of a parked poll meets a transport that is already closed
    (uvloop: "the handler is closed"). The poll ends without an error, not with a traceback per poll."""
    app = create_app(make_config(tmp_path), start_driver=False)
    client = app.test_client()
    token = client.post("/api/v1/nodes", headers={"Authorization": f"Bearer {JOIN_TOKEN}"},
                        json={"name": "a", "device": "cpu", "num_samples": 10}).get_json()["node_token"]
    front = LongPollFront(app, threads=2, client_timeout=5.0)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/api/v1/task", "raw_path": b"/api/v1/task", "query_string": b"wait=1", "root_path": "",
             "headers": [(b"host", b"x"), (b"authorization", f"Bearer {token}".encode())],
             "server": ("127.0.0.1", 5000), "client": ("127.0.0.1", 40000)}
    sent = []

    async def receive():
        await asyncio.sleep(3600)  # the client sends nothing more (its closing is not seen yet)

    async def send(message):
        sent.append(message["type"])
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def main():
        await asyncio.wait_for(front(scope, receive, send), 5.0)  # answered "wait" at its deadline (<= 1 s)
    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    front.close()
    app.extensions["federation"].stop()
    assert sent == ["http.response.start"]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
