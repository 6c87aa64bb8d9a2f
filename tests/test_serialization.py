"""state_dict <-> bytes (F2), refusal of unsafe payloads (F11), and atomic_write_bytes."""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from model import SimpleCNN
from fedrest.files import atomic_write_bytes
from fedrest.serialization import UpdateRejected, bytes_to_state_dict, state_dict_to_bytes


def create_marker(path: str) -> int:
    """Side effect that a malicious payload tries to trigger while being unpickled."""
    Path(path).write_text("pwned")
    return 0


class Exploit:
    """Unpickling an instance calls ``create_marker(path)``: arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (create_marker, (self.path,))


class SystemExploit:
    """The classic ``os.system`` payload (the command only touches a file under tmp_path)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def _torch_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- round trip (F2)


def _model_state() -> "OrderedDict[str, torch.Tensor]":
    torch.manual_seed(0)
    net = SimpleCNN()
    net.bn1.num_batches_tracked.fill_(7)
    net.bn2.num_batches_tracked.fill_(123456789012)  # beyond float32's exact integers
    with torch.no_grad():
        net.bn1.running_var.uniform_(0.5, 2.0)
    return net.state_dict()


def test_simplecnn_round_trip_is_exact():
    original = _model_state()
    data = state_dict_to_bytes(original)
    assert isinstance(data, bytes) and len(data) > 4_000_000  # ~4.8 MB of float32 weights
    restored = bytes_to_state_dict(data)
    assert isinstance(restored, OrderedDict)
    assert list(restored) == list(original)
    for key, value in original.items():
        got = restored[key]
        assert got.dtype == value.dtype, key
        assert got.shape == value.shape, key
        assert got.device.type == "cpu"
        assert torch.equal(got, value), key
    nbt = restored["bn1.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and nbt.dim() == 0 and nbt.item() == 7
    assert restored["bn2.num_batches_tracked"].item() == 123456789012
    net = SimpleCNN()
    result = net.load_state_dict(restored, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert net.bn1.num_batches_tracked.item() == 7
    assert torch.equal(net.fc2.weight, original["fc2.weight"])


@pytest.mark.parametrize("tensor", [
    torch.tensor(3, dtype=torch.int64),
    torch.tensor(2.5, dtype=torch.float16),
    torch.tensor([True, False]),
    torch.arange(6, dtype=torch.int32).reshape(2, 3),
    torch.zeros(0, 4),
    torch.tensor([1.0, -0.0, 1e-30], dtype=torch.float64),
])
def test_round_trip_keeps_dtype_shape_values(tensor):
    restored = bytes_to_state_dict(state_dict_to_bytes({"t": tensor}))
    assert restored["t"].dtype == tensor.dtype and restored["t"].shape == tensor.shape
    assert torch.equal(restored["t"], tensor)


def test_non_contiguous_and_shared_views_round_trip():
    base = torch.arange(12.0).reshape(3, 4)
    view = base.t()  # non-contiguous (4, 3)
    row = base[0]  # shares storage with base
    data = state_dict_to_bytes({"t": view, "row": row})
    restored = bytes_to_state_dict(data)
    assert torch.equal(restored["t"], view) and restored["t"].is_contiguous()
    assert torch.equal(restored["row"], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert restored["row"].shape == (4,) and restored["t"].shape == (4, 3)


# ----------------------------------------------------------------------------- unsafe payloads (F11)


@pytest.mark.parametrize("exploit_class", [Exploit, SystemExploit])
def test_payloads_are_really_malicious(tmp_path, exploit_class):
    """Control: these payloads run code when loaded unsafely, so the refusals below mean something."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps({"w": exploit_class(marker)}))
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(_torch_save({"w": exploit_class(marker)})), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("exploit_class", [Exploit, SystemExploit])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_raw_malicious_pickle_refused_without_side_effect(tmp_path, exploit_class, protocol):
    marker = tmp_path / "marker"
    for payload in (exploit_class(marker), {"w": exploit_class(marker)}, [exploit_class(marker)]):
        with pytest.raises(UpdateRejected, match="raw pickle is never loaded"):
            bytes_to_state_dict(pickle.dumps(payload, protocol=protocol))
        assert not marker.exists()


@pytest.mark.parametrize("exploit_class", [Exploit, SystemExploit])
def test_malicious_torch_archive_refused_without_side_effect(tmp_path, exploit_class):
    marker = tmp_path / "marker"
    payloads = [
        {"w": exploit_class(marker)},
        OrderedDict([("fc.weight", torch.zeros(2)), ("fc.bias", exploit_class(marker))]),
        exploit_class(marker),
    ]
    for payload in payloads:
        with pytest.raises(UpdateRejected, match="weights-only"):
            bytes_to_state_dict(_torch_save(payload))
        assert not marker.exists()


def test_whole_pickled_module_refused():
    """Saving a whole model (not its state_dict) needs arbitrary globals: refused."""
    with pytest.raises(UpdateRejected):
        bytes_to_state_dict(_torch_save(torch.nn.Linear(2, 2)))


def _valid_bytes() -> bytes:
    return state_dict_to_bytes({"w": torch.arange(1000.0), "n": torch.tensor(1)})


@pytest.mark.parametrize("data", [
    b"",
    b"garbage bytes, not a torch archive",
    b"\x00" * 64,
    b"PK\x03\x04" + b"\x00" * 100,  # zip magic, nothing behind it
    pytest.param(None, id="truncated"),
    pytest.param("corrupted", id="corrupted-middle"),
])
def test_undecodable_bytes_refused(data):
    valid = _valid_bytes()
    if data is None:
        data = valid[: len(valid) // 2]
    elif data == "corrupted":
        data = valid[:200] + bytes(len(valid) - 400) + valid[-200:]
    with pytest.raises(UpdateRejected, match="not a weights-only torch state_dict|zip archive"):
        bytes_to_state_dict(data)


@pytest.mark.parametrize("payload, match", [
    ([torch.ones(2), torch.zeros(3)], "list"),
    ((torch.ones(2),), "tuple"),
    (torch.ones(2), "Tensor"),
    (42, "int"),
    ({"w": 1.5}, "float"),
    ({"w": [torch.ones(2)]}, "list"),
    ({"w": {"nested": torch.ones(2)}}, "dict"),
    ({"w": torch.ones(2), "step": 3}, "int"),
    ({1: torch.ones(2)}, "not a string"),
    ({("a", "b"): torch.ones(2)}, "not a string"),
])
def test_non_state_dict_payload_refused(payload, match):
    with pytest.raises(UpdateRejected, match=match):
        bytes_to_state_dict(_torch_save(payload))


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants:UserWarning")
def test_sparse_tensor_refused():
    with pytest.raises(UpdateRejected, match="dense"):
        bytes_to_state_dict(_torch_save({"w": torch.eye(3).to_sparse()}))


def test_plain_dict_accepted_and_order_kept():
    out = bytes_to_state_dict(_torch_save({"b": torch.ones(1), "a": torch.zeros(1)}))
    assert list(out) == ["b", "a"]
    assert torch.equal(out["b"], torch.ones(1))


# ----------------------------------------------------------------------------- atomic_write_bytes


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_atomic_write_creates_file_and_parents(tmp_path):
    target = tmp_path / "a" / "b" / "model.pt"
    payload = bytes(range(256)) * 100
    atomic_write_bytes(target, payload)
    assert target.read_bytes() == payload
    assert os.listdir(target.parent) == ["model.pt"]


def test_atomic_write_replaces_existing_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old content that is longer than the new one")
    atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"
    atomic_write_bytes(target, b"")
    assert target.read_bytes() == b""
    assert os.listdir(tmp_path) == ["model.pt"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "text is not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []
    assert os.listdir(tmp_path) == ["model.pt"]
