"""Shared fixtures: a fresh coordinator app per test (no driver thread), its test client, and helpers.

Tests drive the round state machine themselves with ``federation.tick()``; nothing runs in the
background unless a test starts it.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import pytest
import torch
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedrest.server.app import create_app  # noqa: E402
from config import Config  # noqa: E402
from fedrest.server.federation import Federation  # noqa: E402
from model import SimpleCNN  # noqa: E402
from fedrest.serialization import state_dict_to_bytes  # noqa: E402

JOIN_TOKEN = "test-join-token-0123"
MONITOR_TOKEN = "test-monitor-token-0123"
ADMIN_TOKEN = "test-admin-token-0123"
API = "/api/v1"


def make_config(tmp_path: Path, **overrides) -> Config:
    """A Config whose four directories lie under ``tmp_path``; ``overrides`` are applied on top."""
    values = dict(
        data_dir=str(tmp_path / "data"), models_dir=str(tmp_path / "models"),
        logs_dir=str(tmp_path / "logs"), temp_dir=str(tmp_path / "temp"),
        no_eval=True, min_nodes_to_start=1, token=JOIN_TOKEN, monitor_token=MONITOR_TOKEN,
        admin_token=ADMIN_TOKEN, round_timeout=5.0, rate_limit=0, address_rate_limit=0,
    )
    values.update(overrides)
    return Config(**values)


class FakeClock:
    """A monotonic clock that only moves when a test says so (seconds)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


MONITOR = bearer(MONITOR_TOKEN)
ADMIN = bearer(ADMIN_TOKEN)


def register(client, name: str = "node-a", num_samples: int = 100, device: str = "cpu",
             token: str | None = JOIN_TOKEN, expected: int = 201) -> dict:
    """Register ``name`` through the API; returns the answer plus ``headers`` (the node's Bearer header)."""
    headers = bearer(token) if token is not None else {}
    response = client.post(f"{API}/nodes", headers=headers,
                           json={"name": name, "device": device, "num_samples": num_samples,
                                 "system_info": {"test": True}})
    assert response.status_code == expected, response.get_json()
    answer = response.get_json()
    answer["headers"] = bearer(answer["node_token"])
    return answer


def upload_form(state_dict: Mapping[str, torch.Tensor] | None = None, metadata=None,
                *, data: bytes | None = None, raw_metadata: str | None = None, control: bytes | None = None) -> dict:
    """The fields of an update upload: ``metadata`` (JSON text) and the file part ``state_dict`` (and
    ``control_variate`` when ``control`` bytes are given: SCAFFOLD).

    ``data`` replaces the serialised ``state_dict``; ``raw_metadata`` replaces the JSON of ``metadata``.
    Leave both ``state_dict`` and ``data`` None to omit the file part; pass ``metadata=False`` to omit
    the metadata field.
    """
    form = {}
    if metadata is not False:
        form["metadata"] = raw_metadata if raw_metadata is not None else json.dumps(
            metadata if metadata is not None else {"num_samples": 10})
    if data is None and state_dict is not None:
        data = state_dict_to_bytes(state_dict)
    if data is not None:
        form["state_dict"] = FileStorage(io.BytesIO(data), filename="state_dict.pt",
                                         content_type="application/octet-stream")
    if control is not None:
        form["control_variate"] = FileStorage(io.BytesIO(control), filename="control_variate.pt",
                                              content_type="application/octet-stream")
    return form


def multipart_body(form: Mapping) -> tuple[str, bytes]:
    """(Content-Type header, body bytes) of ``form`` as multipart/form-data.

    Encoded in memory: the test client's own encoder spools bodies over 500 kB to a temporary file
    that it never closes (a ResourceWarning, an error under filterwarnings=error).
    """
    boundary, body = encode_multipart(form)
    return f"multipart/form-data; boundary={boundary}", body


def post_update(client, node: dict | None, round_number: int, state_dict=None, metadata=None, *,
                headers: dict | None = None, **kwargs):
    """POST an update for ``node`` (an answer of :func:`register`) to round ``round_number``.

    ``headers`` replaces the node's Authorization header; ``kwargs`` go to :func:`upload_form`.
    """
    content_type, body = multipart_body(upload_form(state_dict, metadata, **kwargs))
    return client.post(f"{API}/rounds/{round_number}/updates",
                       headers=headers if headers is not None else node["headers"],
                       data=body, content_type=content_type)


def filled_state_dict(value: float, num_batches_tracked: int,
                      reference: Mapping[str, torch.Tensor] | None = None) -> "OrderedDict[str, torch.Tensor]":
    """A SimpleCNN-shaped state_dict with every float tensor = ``value`` and every integer one =
    ``num_batches_tracked`` (dtypes and shapes of ``reference``)."""
    reference = reference if reference is not None else SimpleCNN().state_dict()
    out = OrderedDict()
    for key, ref in reference.items():
        fill = value if ref.is_floating_point() else num_batches_tracked
        out[key] = torch.full_like(ref, fill)
    return out


def update_files(cfg: Config) -> list[Path]:
    """Every file stored under TEMP_DIR/updates (accepted updates and temporary files)."""
    root = Path(cfg.temp_dir) / "updates"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def fingerprint(app) -> tuple:
    """Everything a refused request must leave as it was (liveness and refusal counters aside): the round, the
    global model, participants, accepted updates, history, nodes (token digests, bans), the shared tokens'
    digests and the files of the update spool. No driver thread runs in these tests, so nothing else moves."""
    fed, creds = app.extensions["federation"], app.extensions["credentials"]
    return (fed.phase, fed.round, fed.state.attempt, fed.model_version, fed.global_bytes,
            tuple(fed.state.participants), tuple(fed.state.updates), len(fed.state.history),
            tuple((n.node_id, n.name, n.token_hash, n.banned, n.num_samples, n.device, n.updates_submitted,
                   json.dumps(n.system_info)) for n in fed.nodes.values()),
            tuple(sorted(creds.digests().items())), sorted(p.name for p in fed.spool.directory.rglob("*")))


@pytest.fixture
def cfg(tmp_path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def make_app(tmp_path) -> Callable:
    """Factory: ``make_app(**config_overrides, evaluator=None, clock=time.monotonic)`` -> an app without a
    driver thread.

    Every federation it made is stopped at teardown.
    """
    made = []

    def _make(evaluator=None, clock=time.monotonic, explicit=None, **overrides):
        app = create_app(make_config(tmp_path, **overrides), start_driver=False, evaluator=evaluator, clock=clock,
                         explicit=explicit)
        app.config["TESTING"] = True
        made.append(app)
        return app

    yield _make
    for app in made:
        app.extensions["federation"].stop()


@pytest.fixture
def app(cfg):
    app = create_app(cfg, start_driver=False)
    app.config["TESTING"] = True
    yield app
    app.extensions["federation"].stop()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def fed(app) -> Federation:
    return app.extensions["federation"]


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked_app(app, fake_clock):
    """``app`` whose federation runs on ``fake_clock`` (the federation is rebuilt with that clock)."""
    old = app.extensions["federation"]
    old.stop()
    app.extensions["federation"] = Federation(old.config, old.global_state, clock=fake_clock)
    yield app
    app.extensions["federation"].stop()
