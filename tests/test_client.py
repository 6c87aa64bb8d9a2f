"""client.CoordinatorClient: timeouts on every call (F16), retries, error mapping, and its wire format
against the real Flask app (requests' encoding is replayed through the Flask test client; no sockets
except for the refused-connection test)."""

from __future__ import annotations

import socket

import pytest
import requests
import torch

import fedrest.client as client_module
from fedrest.client import CoordinatorClient, CoordinatorError, CoordinatorUnreachable, base_url, make_session
from conftest import JOIN_TOKEN, MONITOR_TOKEN, filled_state_dict
from fedrest.serialization import bytes_to_state_dict, state_dict_to_bytes


class AppSession:
    """A stand-in for requests.Session that serves every call from a Flask app and records the kwargs."""

    def __init__(self, app) -> None:
        self.test_client = app.test_client()
        self.calls: list[dict] = []

    def request(self, method, url, headers=None, timeout=None, **kwargs):
        self.calls.append({"method": method, "url": url, "timeout": timeout, **kwargs})
        prepared = requests.Request(method, url, headers=headers, **kwargs).prepare()
        path = prepared.path_url  # path and query string
        body = prepared.body if isinstance(prepared.body, bytes) else (prepared.body or "").encode()
        answer = self.test_client.open(path, method=method, headers=dict(prepared.headers), data=body)
        response = requests.Response()
        response.status_code = answer.status_code
        response._content = answer.get_data()
        response.headers.update(answer.headers)
        response.url = url
        return response


@pytest.fixture
def session(app):
    return AppSession(app)


@pytest.fixture
def api(session):
    return CoordinatorClient("127.0.0.1:5000", session=session)


@pytest.mark.parametrize("address, url", [
    ("127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("http://host:80/", "http://host:80"),
    ("https://example.org:8443", "https://example.org:8443"),
    (" [::1]:5000 ", "http://[::1]:5000"),
    ("https://[2001:db8::5]:5000", "https://[2001:db8::5]:5000"),
])
def test_base_url(address, url):
    assert base_url(address) == url


@pytest.mark.parametrize("address", ["localhost", "ftp://host:21", "host:", "host:abc", "host:0", "host:70000",
                                     ":5000", "[nothost]:5000", "http://host/api:5000", "user@host:5000"])
def test_base_url_rejects(address):
    with pytest.raises(ValueError):
        base_url(address)


@pytest.mark.parametrize("address", ["::1:5000", "http://::1:5000", "2001:db8::5:5000"])
def test_an_ipv6_host_without_brackets_is_refused_with_the_bracketed_form(address):
    with pytest.raises(ValueError, match=r"needs brackets: http://\[.*\]:5000"):
        base_url(address)


def test_the_coordinators_own_address_hint_pastes_back():
    from utils import url_host

    for host in ("::1", "10.0.0.5", "2001:db8::5", "coordinator.lab"):
        assert base_url(f"https://{url_host(host)}:5000") == f"https://{url_host(host)}:5000"


def test_generated_tokens_never_read_as_a_flag(monkeypatch):
    from fedrest.server import credentials

    drawn = iter(["-RQK6" + "a" * 38, "-x" + "b" * 41, "ok" + "c" * 41])
    monkeypatch.setattr(credentials.secrets, "token_urlsafe", lambda n: next(drawn))
    assert credentials.new_token() == "ok" + "c" * 41  # the two starting with "-" were drawn again
    monkeypatch.undo()
    assert not any(credentials.new_token().startswith("-") for _ in range(2000))


def test_whole_flow_through_the_client(api, session, fed):
    """register -> task -> model -> update -> status, with exactly the encoding the worker sends."""
    answer, created = api.register("node-a", "cpu", 50, {"os": "test"}, JOIN_TOKEN)
    assert created and answer["name"] == "node-a"
    _, created_again = api.register("node-a", "cpu", 50, {}, JOIN_TOKEN)
    assert created_again is False
    answer, _ = api.register("node-a", "cpu", 50, {}, JOIN_TOKEN)
    api.token = answer["node_token"]
    assert api.heartbeat(answer["node_id"])["node_status"] == "online"
    assert api.task(wait=0)["action"] == "wait"
    fed.tick()
    task = api.task(wait=1)
    assert (task["action"], task["round"]) == ("train", 1)
    version, data = api.model()
    assert version == 0 and torch.equal(bytes_to_state_dict(data)["fc2.bias"], fed.global_state["fc2.bias"])
    update = filled_state_dict(2.0, 3)
    accepted = api.submit_update(1, {"num_samples": 50, "train_loss": 0.1, "train_accuracy": 0.5,
                                     "train_seconds": 2.0}, state_dict_to_bytes(update))
    assert accepted == {"accepted": True, "round": 1, "node_id": answer["node_id"], "num_samples": 50}
    with pytest.raises(CoordinatorError) as duplicate:
        api.submit_update(1, {"num_samples": 50}, state_dict_to_bytes(update))
    assert (duplicate.value.status, duplicate.value.error) == (409, "duplicate_update")
    fed.tick()
    assert api.model()[0] == 1
    status = CoordinatorClient("127.0.0.1:5000", token=MONITOR_TOKEN, session=session).status()
    assert status["history"][0]["num_samples"] == 50
    assert api.leave(answer["node_id"])["status"] == "offline"
    assert api.health()["status"] == "ok"


def test_every_call_has_connect_and_read_timeouts(api, session):
    """F16: no call may wait forever on a server that accepts and never answers."""
    answer, _ = api.register("node-a", "cpu", 50, {}, JOIN_TOKEN)
    api.token = answer["node_token"]
    api.health()
    api.heartbeat(answer["node_id"])
    api.task(wait=0.2)  # no round yet: the coordinator holds the poll for 0.2 s
    api.model()
    with pytest.raises(CoordinatorError):
        api.submit_update(1, {"num_samples": 1}, b"x")
    with pytest.raises(CoordinatorError):
        api.status()  # the node token is not the join token
    api.leave(answer["node_id"])
    assert len(session.calls) == 8
    for call in session.calls:
        connect, read = call["timeout"]
        assert 0 < connect <= client_module.CONNECT_TIMEOUT, call["url"]
        assert 0 < read <= client_module.UPLOAD_READ_TIMEOUT, call["url"]
    task_call = next(c for c in session.calls if c["url"].endswith("/task"))
    assert task_call["timeout"][1] == 0.2 + client_module.READ_TIMEOUT  # outlasts the long poll


def test_errors_become_coordinator_error_with_json_fields(api):
    with pytest.raises(CoordinatorError) as unauthorized:
        api.register("node-a", "cpu", 50, {}, "wrong-token-123")
    assert (unauthorized.value.status, unauthorized.value.error) == (401, "unauthorized")
    answer, _ = api.register("node-a", "cpu", 50, {}, JOIN_TOKEN)
    api.token = answer["node_token"]
    with pytest.raises(CoordinatorError) as unknown:
        api.heartbeat("ffffffffffffffff")
    assert (unknown.value.status, unknown.value.error) == (404, "unknown_node")
    assert "register again" in unknown.value.message
    assert unknown.value.body["error"] == "unknown_node"


def test_connection_refused_is_unreachable_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there
    api = CoordinatorClient(f"127.0.0.1:{port}", session=make_session(total_retries=0), connect_timeout=1.0)
    with pytest.raises(CoordinatorUnreachable, match=f"127.0.0.1:{port}"):
        api.health()


def test_session_retries_with_backoff():
    retry = make_session(total_retries=4).get_adapter("http://x:1").max_retries
    assert retry.total == 4 and retry.connect == 4 and retry.backoff_factor == 0.5
    assert set(retry.status_forcelist) == {429, 502, 503, 504}
    assert retry.allowed_methods is None  # uploads too: a repeat is answered 409 duplicate_update
    assert retry.get_backoff_time() == 0  # no sleep before the first retry


def test_an_answer_cut_in_the_middle_of_its_body_is_unreachable_not_a_crash():
    """A model download that breaks off (the coordinator died mid-answer) is an outage to wait out."""
    import socket
    import threading

    from fedrest.client import CoordinatorClient, CoordinatorUnreachable, make_session

    server = socket.create_server(("127.0.0.1", 0))

    def answer_half():
        for _ in range(3):  # the client's own retries may come back
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: 1000000\r\nX-Model-Version: 1\r\n\r\n" + b"x" * 1000)
            conn.close()

    thread = threading.Thread(target=answer_half, daemon=True)
    thread.start()
    client = CoordinatorClient(f"127.0.0.1:{server.getsockname()[1]}", token="t" * 10,
                               session=make_session(total_retries=0))
    try:
        with pytest.raises(CoordinatorUnreachable):
            client.model()
    finally:
        server.close()
        client.session.close()
