"""Update uploads through Flask's test client: the cap on uploads in progress (503 busy, Retry-After), parts
streamed into the spool's incoming folder and nothing left there, and the checks reading the update's file.

The worker waiting its turn against a real server is in test_serving.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import filled_state_dict, fingerprint, post_update, register, update_files
from fedrest.serialization import UpdateRejected, file_to_state_dict, state_dict_to_bytes
from fedrest.server.federation import Phase
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
