"""Update uploads through Flask's test client: the cap on uploads in progress (503 busy, Retry-After), parts
streamed into the spool's incoming folder and nothing left there, the checks reading the update's file, and a
full disk (507, nothing left, nothing counted).

The worker waiting its turn against a real server is in test_serving.py.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import filled_state_dict, fingerprint, post_update, register, update_files
from fedrest.serialization import UpdateRejected, file_to_state_dict, state_dict_to_bytes
from fedrest.server.federation import Phase
from fedrest.server.http_errors import STORAGE_RETRY_AFTER_S
from fedrest.server.spool import UpdateSpool
from fedrest.server.store import RunStore
from fedrest.server.uploads import RETRY_AFTER_S, upload_cap


@pytest.fixture
def round_one(client, fed):
    node = register(client, "node-a", num_samples=100)
    fed.tick()
    assert (fed.phase, fed.round) == (Phase.TRAINING, 1)
    return node


def test_an_upload_over_the_cap_is_503_busy_with_retry_after_and_changes_nothing(app, client, fed, round_one,
                                                                                    caplog):
    slots = app.extensions["upload_slots"]
    held = [slots.try_acquire() for _ in range(slots.limit)]  # as many uploads in progress as the cap
    assert all(held) and slots.in_progress == slots.limit
    before = fingerprint(app)
    with caplog.at_level(logging.WARNING, "fl.federation"):
        response = post_update(client, round_one, 1, filled_state_dict(0.5, 1), {"num_samples": 10})
        again = post_update(client, round_one, 1, filled_state_dict(0.5, 1), {"num_samples": 10})
    assert (response.status_code, again.status_code) == (503, 503)
    body = response.get_json()
    assert body["error"] == "busy" and str(slots.limit) in body["message"]
    assert RETRY_AFTER_S[0] <= body["retry_after_s"] <= RETRY_AFTER_S[1]
    assert int(response.headers["Retry-After"]) == pytest.approx(body["retry_after_s"], abs=1)
    assert fingerprint(app) == before and fed.state.updates == {}
    assert fed.requests_refused_total["busy"] == 2 and slots.refused_total == 2
    assert sum("the cap (--max-uploads)" in r.getMessage() for r in caplog.records) == 1  # one warning, not one each
    assert slots.in_progress == slots.limit  # a refusal takes no slot

    slots.release()
    assert post_update(client, round_one, 1, filled_state_dict(0.5, 1), {"num_samples": 10}).status_code == 202
    assert slots.in_progress == slots.limit - 1  # the accepted upload gave its slot back
    assert list(fed.state.updates) == [round_one["node_id"]]


def test_a_stale_round_is_answered_409_without_taking_a_slot(app, client, round_one):
    slots = app.extensions["upload_slots"]
    for _ in range(slots.limit):
        slots.try_acquire()
    response = post_update(client, round_one, 5, filled_state_dict(0.5, 1), {"num_samples": 10})
    assert response.status_code == 409 and response.get_json()["error"] == "stale_round"


def test_upload_parts_stream_into_the_incoming_folder_and_none_is_left_behind(client, fed, cfg, round_one):
    incoming = Path(cfg.temp_dir) / "updates" / "incoming"
    bad = post_update(client, round_one, 1, data=b"PK\x03\x04 not really a zip", metadata={"num_samples": 10})
    assert bad.status_code == 400
    assert incoming.is_dir() and list(incoming.iterdir()) == []  # the part was written there, then removed
    update = filled_state_dict(0.75, 2)
    assert post_update(client, round_one, 1, update, {"num_samples": 10}).status_code == 202
    assert list(incoming.iterdir()) == []
    stored = update_files(cfg)
    assert [p.relative_to(Path(cfg.temp_dir) / "updates").as_posix() for p in stored] == \
        [f"round_1/{round_one['node_id']}.pt"]
    assert all(torch.equal(file_to_state_dict(stored[0])[k], update[k]) for k in update)


def test_federation_submit_update_takes_bytes_or_a_received_file(fed, client, round_one, tmp_path):
    node = fed.nodes[round_one["node_id"]]
    data = state_dict_to_bytes(filled_state_dict(0.1, 1))
    with pytest.raises(UpdateRejected):
        fed.submit_update(node, 1, {"num_samples": 5}, data[:1000])  # truncated: refused, nothing kept
    assert list(fed.spool.incoming.iterdir()) == []
    received = fed.spool.receive(data)
    assert received.parent == fed.spool.incoming and received.read_bytes() == data
    accepted = fed.submit_update(node, 1, {"num_samples": 5}, received)
    assert not received.exists() and Path(accepted.path).read_bytes() == data


def test_file_to_state_dict_refuses_what_bytes_to_state_dict_refuses(tmp_path):
    path = tmp_path / "update.pt"
    path.write_bytes(b"\x80\x04K\x01.")  # a raw pickle
    with pytest.raises(UpdateRejected, match="raw pickle is never loaded"):
        file_to_state_dict(path)
    path.write_bytes(state_dict_to_bytes({"w": torch.ones(3)})[:-30])
    with pytest.raises(UpdateRejected):
        file_to_state_dict(path)


@pytest.mark.parametrize("threads, wanted, cap", [(64, 16, 16), (4, 16, 2), (1024, 512, 512)])
def test_the_cap_is_at_most_half_the_request_threads(cfg, threads, wanted, cap):
    assert upload_cap(cfg.replace(server_threads=threads, max_uploads=wanted)) == cap


class _FullDisk:
    """A file whose writes fail as on a full disk (the rest is the real file's)."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)


def _fail_streaming(monkeypatch):
    real = tempfile.NamedTemporaryFile
    monkeypatch.setattr("fedrest.server.uploads.tempfile.NamedTemporaryFile", lambda **kw: _FullDisk(real(**kw)))


def _fail_fsync(monkeypatch):
    def no_space(_path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(UpdateSpool, "sync", staticmethod(no_space))


def _fail_commit(monkeypatch):
    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(RunStore, "add_update", no_space)


@pytest.mark.parametrize("failure", [_fail_streaming, _fail_fsync, _fail_commit],
                         ids=["while-streaming", "at-fsync", "at-the-commit"])
def test_a_full_disk_answers_507_leaves_no_file_counts_nothing_and_the_same_upload_succeeds_later(
        app, client, fed, cfg, round_one, monkeypatch, failure, caplog):
    """F21: ENOSPC while an update is stored is a JSON 507 with Retry-After, not a 500; no partial or moved file
    stays behind, the round has no update, and the worker's resend succeeds once there is space."""
    before = fingerprint(app)
    update = filled_state_dict(0.25, 3)
    with monkeypatch.context() as m:
        failure(m)
        with caplog.at_level(logging.ERROR, "fl.coordinator"):
            response = post_update(client, round_one, 1, update, {"num_samples": 10})
    assert response.status_code == 507, response.get_json()
    body = response.get_json()
    assert body["error"] == "insufficient_storage" and "disk is full" in body["message"]
    assert STORAGE_RETRY_AFTER_S[0] <= body["retry_after_s"] <= STORAGE_RETRY_AFTER_S[1]
    assert int(response.headers["Retry-After"]) == pytest.approx(body["retry_after_s"], abs=1)
    assert [r.exc_info for r in caplog.records if "cannot write to disk" in r.getMessage()] == [None]  # one line
    assert list((Path(cfg.temp_dir) / "updates").rglob("*.*")) == []  # no partial, temporary or moved file
    assert fed.state.updates == {} and fingerprint(app)[:-1] == before[:-1]  # [-1]: the spool's names (folders)
    assert fed.requests_refused_total["insufficient_storage"] == 1
    assert app.extensions["upload_slots"].in_progress == 0

    assert post_update(client, round_one, 1, update, {"num_samples": 10}).status_code == 202  # space is back
    assert list(fed.state.updates) == [round_one["node_id"]]


def test_a_failed_disk_is_503_and_other_os_errors_stay_500(app, client, round_one, monkeypatch):
    for code, status in ((errno.EIO, 503), (errno.EACCES, 500)):
        def failing(_path, code=code):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(UpdateSpool, "sync", staticmethod(failing))
        response = post_update(client, round_one, 1, filled_state_dict(0.5, 1), {"num_samples": 10})
        assert response.status_code == status
        assert response.get_json()["error"] == {503: "storage_error", 500: "internal_error"}[status]
