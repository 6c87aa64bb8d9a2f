"""Security (in process): tokens and roles, rotation and bans, limits, and hostile payloads with no side effect."""

from __future__ import annotations

import errno

import io
import json
import logging
import os
import pickle
import stat
import time
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedrest.server.app import create_app
from conftest import (ADMIN, API, JOIN_TOKEN, MONITOR, FakeClock, bearer,
                      filled_state_dict, fingerprint, make_config, post_update, register)
from fedrest.server.credentials import Credentials, hash_token, token_path
from fedrest.server.ratelimit import RateLimiter, retry_after_header
from fedrest.serialization import state_dict_to_bytes

JOIN = bearer(JOIN_TOKEN)




# ----------------------------------------------------------------------------- tokens and roles


def test_tokens_are_stored_as_digests_and_generated_ones_only_in_0600_files(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = make_config(tmp_path, token=None, monitor_token=None, admin_token=None)
    app = create_app(cfg, start_driver=False)
    creds = app.extensions["credentials"]
    assert sorted(creds.generated) == ["admin", "join", "monitor"]
    stored = json.loads((tmp_path / "temp" / "credentials.json").read_text())
    for kind in ("join", "monitor", "admin"):
        path = token_path(cfg.temp_dir, kind)
        token = path.read_text().strip()
        assert len(token) >= 40 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stored[kind] == hash_token(token) and token not in json.dumps(stored)
        assert token not in caplog.text
    # a restart keeps the digests (the files are not read back: deleting them changes nothing)
    join = token_path(cfg.temp_dir, "join").read_text().strip()
    token_path(cfg.temp_dir, "join").unlink()
    app.extensions["federation"].stop()
    again = create_app(cfg, start_driver=False)
    assert again.extensions["credentials"].generated == [] and again.extensions["credentials"].verify("join", join)
    assert not token_path(cfg.temp_dir, "join").exists()
    again.extensions["federation"].stop()


def test_each_token_opens_only_its_own_doors(client):
    node = register(client, "n1")
    status, metrics = f"{API}/status", "/metrics"
    for headers in (MONITOR, ADMIN):
        assert client.get(status, headers=headers).status_code == 200
        assert client.get(metrics, headers=headers).status_code == 200
    for headers in (JOIN, node["headers"], {}):
        assert client.get(status, headers=headers).status_code == 401
        assert client.get(metrics, headers=headers).status_code == 401
    body = {"name": "n2", "device": "cpu", "num_samples": 5}
    for headers in (MONITOR, ADMIN, node["headers"]):
        assert client.post(f"{API}/nodes", json=body, headers=headers).status_code == 401
        assert client.post(f"{API}/admin/tokens/join", headers=headers if headers is not ADMIN else JOIN
                           ).status_code == 401
    assert client.get(f"{API}/task", headers=MONITOR).status_code == 401
    assert client.get(f"{API}/model", headers=JOIN).status_code == 401


def test_a_node_cannot_act_as_another(client, fed):
    a, b = register(client, "a"), register(client, "b")
    fed.tick()
    assert client.post(f"{API}/nodes/{b['node_id']}/heartbeat", headers=a["headers"]).status_code == 403
    assert client.delete(f"{API}/nodes/{b['node_id']}", headers=a["headers"]).status_code == 403
    assert client.post(f"{API}/nodes/{b['node_id']}/heartbeat", headers=bearer("x" * 43)).status_code == 401
    # an upload is always the token holder's: a's token cannot put an update in b's name
    assert post_update(client, a, 1, filled_state_dict(1.0, 1), {"num_samples": 10}).status_code == 202
    assert list(fed.state.updates) == [a["node_id"]]
    assert fed.nodes[b["node_id"]].updates_submitted == 0


def test_rotation_replaces_a_token_at_once_and_keeps_nodes_working(client, tmp_path):
    node = register(client, "n1")
    answer = client.post(f"{API}/admin/tokens/join", headers=ADMIN).get_json()
    new_join = answer["token"]
    assert token_path(tmp_path / "temp", "join").read_text().strip() == new_join
    body = {"name": "n2", "device": "cpu", "num_samples": 5}
    assert client.post(f"{API}/nodes", json=body, headers=JOIN).status_code == 401
    assert client.post(f"{API}/nodes", json=body, headers=bearer(new_join)).status_code == 201
    assert client.post(f"{API}/nodes/{node['node_id']}/heartbeat", headers=node["headers"]).status_code == 200
    new_monitor = client.post(f"{API}/admin/tokens/monitor", headers=ADMIN).get_json()["token"]
    assert client.get(f"{API}/status", headers=MONITOR).status_code == 401
    assert client.get(f"{API}/status", headers=bearer(new_monitor)).status_code == 200
    assert client.post(f"{API}/admin/tokens/root", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("failing", ["fedrest.files.os.fsync", "fedrest.files.os.replace"])
def test_a_rotation_on_a_full_disk_is_507_and_the_old_token_still_works(client, tmp_path, monkeypatch, failing):
    """F21 for the credential writer: the files are written before the memory changes, so a full disk (at the
    token file's fsync, or at the digest file's rename) leaves the old token working and its file unchanged."""
    before = token_path(tmp_path / "temp", "join").read_bytes() if token_path(tmp_path / "temp", "join").exists() \
        else None
    digests = (tmp_path / "temp" / "credentials.json").read_bytes()

    def no_space(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(failing, no_space)
        answer = client.post(f"{API}/admin/tokens/join", headers=ADMIN)
    assert answer.status_code == 507 and answer.get_json()["error"] == "insufficient_storage"
    assert (tmp_path / "temp" / "credentials.json").read_bytes() == digests
    path = token_path(tmp_path / "temp", "join")
    assert (path.read_bytes() if path.exists() else None) == before
    assert [p.name for p in (tmp_path / "temp").glob(".*.tmp")] == []
    body = {"name": "n2", "device": "cpu", "num_samples": 5}
    assert client.post(f"{API}/nodes", json=body, headers=JOIN).status_code == 201  # the old token


def test_a_banned_node_loses_its_update_its_token_and_its_name_until_unbanned(make_app):
    app = make_app(min_nodes_to_start=2)
    client, fed = app.test_client(), app.extensions["federation"]
    good, bad = register(client, "good"), register(client, "bad")
    fed.tick()
    assert post_update(client, bad, 1, filled_state_dict(5.0, 1), {"num_samples": 10}).status_code == 202
    answer = client.post(f"{API}/admin/nodes/bad/ban", json={"reason": "poisoning"}, headers=ADMIN)
    assert answer.status_code == 200 and answer.get_json()["status"] == "banned"
    assert fed.state.participants == [good["node_id"]] and not fed.state.updates
    assert not list(fed.spool.directory.rglob("*.pt")) and fed.store.updates(1) == []
    assert client.get(f"{API}/task", headers=bad["headers"]).status_code == 401
    again = client.post(f"{API}/nodes", json={"name": "bad", "device": "cpu", "num_samples": 5}, headers=JOIN)
    assert again.status_code == 403 and again.get_json()["error"] == "banned"
    status = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert {n["name"]: n["status"] for n in status["nodes"]}["bad"] == "banned"
    assert post_update(client, good, 1, filled_state_dict(1.0, 1), {"num_samples": 10}).status_code == 202
    fed.tick()
    assert fed.model_version == 1 and float(fed.global_state["fc1.weight"][0, 0]) == 1.0  # only the good update
    # the ban survives a restart; unban lets the name register again
    fed.stop()
    app2 = make_app(min_nodes_to_start=2)
    client2 = app2.test_client()
    assert client2.post(f"{API}/nodes", json={"name": "bad", "device": "cpu", "num_samples": 5},
                        headers=JOIN).status_code == 403
    assert client2.delete(f"{API}/admin/nodes/bad/ban", headers=ADMIN).status_code == 200
    assert client2.post(f"{API}/nodes", json={"name": "bad", "device": "cpu", "num_samples": 5},
                        headers=JOIN).status_code == 200
    assert client2.post(f"{API}/admin/nodes/nobody/ban", headers=ADMIN).status_code == 404
    assert client2.post(f"{API}/admin/nodes/bad/ban", headers=MONITOR).status_code == 401


def test_registrations_beyond_max_nodes_are_refused(make_app):
    client = make_app(max_nodes=2).test_client()
    register(client, "a"), register(client, "b")
    answer = client.post(f"{API}/nodes", json={"name": "c", "device": "cpu", "num_samples": 5}, headers=JOIN)
    assert answer.status_code == 403 and answer.get_json()["error"] == "node_limit"
    register(client, "a", expected=200)  # a known name may still re-register


# ----------------------------------------------------------------------------- rate limits


def test_token_bucket_allows_bursts_then_the_rate_and_forgets_old_keys():
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3.0, clock=clock, max_keys=2)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)  # one token comes back every 1/rate seconds
    clock.advance(0.5)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("b") == 0.0 and limiter.acquire("c") == 0.0
    assert len(limiter) == 2  # "a", the least recently used, was forgotten
    assert retry_after_header(0.01) == "1" and retry_after_header(2.2) == "3"


def test_too_many_requests_get_429_with_retry_after(make_app):
    app = make_app(rate_limit=1.0)  # bursts of 5 per credential
    client = app.test_client()
    node = register(client, "n1")
    url = f"{API}/nodes/{node['node_id']}/heartbeat"
    codes = [client.post(url, headers=node["headers"]).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    refused = client.post(url, headers=node["headers"])
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.get_json()["error"] == "too_many_requests" and refused.get_json()["retry_after_s"] > 0
    other = register(client, "n2")  # another credential has its own bucket
    assert client.post(f"{API}/nodes/{other['node_id']}/heartbeat", headers=other["headers"]).status_code == 200
    status = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert status["requests_refused_total"] == {"too_many_requests": 2}

    per_address = make_app(address_rate_limit=1.0).test_client()
    codes = [per_address.get(f"{API}/health").status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]


# ----------------------------------------------------------------------------- hostile payloads


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def _zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (64 * 2**20))  # 64 MiB of zeros in ~64 KiB
        z.writestr("archive/version", b"3\n")
    return buffer.getvalue()


def _hostile_updates(marker) -> dict:
    valid = state_dict_to_bytes(filled_state_dict(1.0, 1))
    huge = filled_state_dict(1.0, 1)
    huge["fc1.weight"] = torch.empty(1).as_strided((2**30, 2**30), (0, 0))  # claims 2^60 elements
    numpy_inside = OrderedDict(filled_state_dict(1.0, 1))
    numpy_inside["fc1.bias"] = np.float64(1.0)
    buffer = io.BytesIO()
    torch.save({"fc1.weight": RunsCode(marker)}, buffer)
    return {
        "pickle through torch's format": buffer.getvalue(),
        "raw pickle": pickle.dumps(RunsCode(marker)),
        "zip bomb": _zip_bomb(),
        "truncated archive": valid[: len(valid) // 2],
        "tensor claiming a huge size": _save(huge),
        "numpy scalar inside": _save(numpy_inside),
        "string instead of a tensor": _save({**filled_state_dict(1.0, 1), "fc1.bias": "1.0"}),
        "empty": b"",
    }


def _save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_hostile_update_payloads_get_400_and_change_nothing(make_app, tmp_path):
    app = make_app(min_nodes_to_start=1)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, "attacker")
    fed.tick()
    marker = tmp_path / "pwned"
    for what, data in _hostile_updates(str(marker)).items():
        before = fingerprint(app)
        started = time.perf_counter()
        response = post_update(client, node, 1, None, {"num_samples": 10}, data=data)
        assert response.status_code == 400, (what, response.get_json())
        assert response.get_json()["error"] == "invalid_update", what
        assert time.perf_counter() - started < 10, what
        assert fingerprint(app) == before, what
        assert not marker.exists(), what


@pytest.mark.parametrize("body, status", [
    ({"name": "n", "device": "cpu", "num_samples": "100"}, 400),  # a string where a number belongs
    ({"name": "n", "device": "cpu", "num_samples": 1e3}, 400),
    ({"name": "n", "device": "cpu", "num_samples": True}, 400),
    ({"name": "n" * 129, "device": "cpu", "num_samples": 5}, 400),  # too long
    ({"name": "\ud800", "device": "cpu", "num_samples": 5}, 400),  # not unicode text
    ({"name": "a\x00b", "device": "cpu", "num_samples": 5}, 400),
    ({"name": "n", "device": "cpu", "num_samples": 5, "system_info": {"k": "v" * 5000}}, 400),
    ({"name": "n", "device": "cpu", "num_samples": 5, "system_info": []}, 400),
    ({"name": ["n"], "device": "cpu", "num_samples": 5}, 400),
])
def test_bad_registration_bodies_get_4xx_and_change_nothing(app, client, body, status):
    before = fingerprint(app)
    response = client.post(f"{API}/nodes", data=json.dumps(body), content_type="application/json", headers=JOIN)
    assert response.status_code == status and "error" in response.get_json()
    assert fingerprint(app) == before


def test_unicode_names_are_welcome(client):
    node = register(client, "узел-节点-🚀")
    assert node["name"] == "узел-节点-🚀"


def test_a_million_key_object_and_deep_nesting_are_refused_unread(app, client):
    before = fingerprint(app)
    million = "{" + ",".join(f'"k{i}":0' for i in range(1_000_000)) + "}"
    response = client.post(f"{API}/nodes", data=million, content_type="application/json", headers=JOIN)
    assert response.status_code == 413 and response.get_json()["error"] == "payload_too_large"
    deep = "[" * 50_000 + "]" * 50_000
    response = client.post(f"{API}/nodes", data=deep, content_type="application/json", headers=JOIN)
    assert response.status_code in (400, 413) and "error" in response.get_json()
    assert fingerprint(app) == before


@pytest.mark.parametrize("metadata", [
    '{"num_samples": "10"}', '{"num_samples": 10.5}', '{"num_samples": 10, "train_loss": "nan"}',
    '{"num_samples": 10, "train_loss": NaN}', '{"num_samples": 10, "train_accuracy": 2}', "[10]", "nul",
])
def test_bad_update_metadata_gets_400_and_changes_nothing(make_app, metadata):
    app = make_app(min_nodes_to_start=1)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, "n1")
    fed.tick()
    before = fingerprint(app)
    response = post_update(client, node, 1, filled_state_dict(1.0, 1), raw_metadata=metadata)
    assert response.status_code == 400 and response.get_json()["error"] == "bad_request"
    assert fingerprint(app) == before


def test_headers_that_claim_more_than_the_limit_are_refused_before_the_body_is_read(make_app):
    app = make_app(min_nodes_to_start=1, max_update_bytes=4096)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client, "n1")
    fed.tick()
    read = []

    class Body(io.BytesIO):
        def read(self, *args):
            read.append(args)
            return super().read(*args)

    response = client.post(f"{API}/rounds/1/updates", input_stream=Body(b"x" * 10), headers=node["headers"],
                           environ_overrides={"CONTENT_LENGTH": str(10**12),
                                              "CONTENT_TYPE": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and response.get_json()["limit_bytes"] == 4096
    assert read == []  # refused on the claimed size alone
    long_token = client.get(f"{API}/status", headers=bearer("t" * 10_000))
    assert long_token.status_code == 401


def test_credentials_compare_digests_in_constant_time_helper(tmp_path):
    creds = Credentials(tmp_path, {"join": "j" * 20, "monitor": "m" * 20, "admin": "a" * 20})
    assert creds.verify("join", "j" * 20) and not creds.verify("join", "m" * 20) and not creds.verify("join", None)
    assert not creds.verify("monitor", "j" * 20)


def test_a_token_given_once_and_then_not_is_not_silently_unfindable(tmp_path, caplog):
    """The join token came through FL_TOKEN on the first start (as launch.py gives it), and the next start has
    none: the coordinator keeps its digest, and says the token file does not hold it and how to get one."""
    Credentials(tmp_path, {"join": "j" * 20, "monitor": None, "admin": None})
    with caplog.at_level(logging.WARNING, logger="fl.credentials"):
        again = Credentials(tmp_path, {"join": None, "monitor": None, "admin": None})
    assert again.verify("join", "j" * 20) and again.generated == []
    assert not token_path(tmp_path, "join").exists()
    assert any("join token" in r.getMessage() and "admin.py rotate join" in r.getMessage() for r in caplog.records)
    assert not any("monitor token" in r.getMessage() for r in caplog.records)  # generated: it is in its file
