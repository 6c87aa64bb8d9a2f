"""Safe (de)serialisation of state_dicts: torch's zip format in, weights-only ``torch.load`` out.

Bytes that come from the network are checked before torch sees them (:func:`bytes_to_state_dict`), and a
decoded state_dict is checked against the global model (:func:`check_compatible`) before it is used.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import BinaryIO, Mapping

import torch


class UpdateRejected(ValueError):
    """A state_dict is not acceptable: undecodable, wrong keys/shapes/dtypes, or non-finite values.

    ``error`` is the machine-readable reason the coordinator answers (subclasses name theirs).
    """

    error = "invalid_update"


def state_dict_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a state_dict with ``torch.save`` (tensors moved to CPU, made contiguous).

    Returns the bytes of torch's zip format; shapes, dtypes and values survive exactly,
    0-d tensors included.
    """
    return torch_save_bytes(OrderedDict((k, v.detach().to("cpu").contiguous()) for k, v in state_dict.items()))


def torch_save_bytes(obj) -> bytes:
    """``torch.save(obj)`` into bytes (torch's zip format), for tensors, dicts and plain values."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# What torch.load may raise on bytes that are not a valid weights-only archive.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError,
                AttributeError, IndexError, OverflowError, UnicodeDecodeError, zipfile.BadZipFile,
                MemoryError, OSError, NotImplementedError, AssertionError)


def bytes_to_state_dict(data: bytes) -> "OrderedDict[str, torch.Tensor]":
    """Decode bytes from :func:`state_dict_to_bytes`; never runs code from the payload.

    Only ``torch.load(..., weights_only=True)`` is used (torch's restricted unpickler: tensors,
    containers and plain values; any other global is refused), always onto the CPU.

    Before torch sees the bytes they must be torch's zip format (not the legacy raw pickle), with every
    entry stored uncompressed (as ``torch.save`` writes them) and no entry claiming more bytes than the
    payload holds: a zip bomb or a truncated archive is refused without being inflated.

    Raises
    ------
    UpdateRejected
        If the bytes are not such a torch archive, hold anything the restricted unpickler refuses,
        or are not a mapping of str to dense tensors.
    """
    return _decode(io.BytesIO(data), len(data))


def file_to_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """:func:`bytes_to_state_dict` for a file (an upload streamed to disk, a spooled update), with the same
    checks: torch reads the tensors from the file one record at a time, so the memory it costs is the
    state_dict's own size, not that plus a copy of the bytes.

    Raises
    ------
    UpdateRejected
        As :func:`bytes_to_state_dict`.
    OSError
        When the file cannot be opened or read.
    """
    with open(path, "rb") as stream:
        return _decode(stream, os.fstat(stream.fileno()).st_size)


def _decode(stream: BinaryIO, size: int) -> "OrderedDict[str, torch.Tensor]":
    _check_archive(stream, size)
    stream.seek(0)
    try:
        obj = torch.load(stream, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as exc:
        raise UpdateRejected(f"not a weights-only torch state_dict: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    if not isinstance(obj, Mapping):
        raise UpdateRejected(f"payload is a {type(obj).__name__}, expected a state_dict (mapping)")
    result = OrderedDict()
    for key, value in obj.items():
        if not isinstance(key, str):
            raise UpdateRejected(f"state_dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized:
            raise UpdateRejected(f"state_dict[{key!r}] is a {type(value).__name__}, expected a dense tensor")
        result[key] = value
    return result


def _check_archive(stream: BinaryIO, size: int) -> None:
    if stream.read(4) != b"PK\x03\x04":
        raise UpdateRejected("not a torch zip archive (torch.save's format); a raw pickle is never loaded")
    stream.seek(0)
    try:
        with zipfile.ZipFile(stream) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        raise UpdateRejected(f"not a readable zip archive ({exc}); truncated?") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise UpdateRejected(f"archive entry {entry.filename[:100]!r} is compressed; torch.save stores entries "
                                 "uncompressed")
        if entry.file_size > size or entry.header_offset + entry.file_size > size:
            raise UpdateRejected(f"archive entry {entry.filename[:100]!r} claims {entry.file_size} bytes, more "
                                 f"than the {size} bytes received")


def check_compatible(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Check that ``update`` has exactly the keys, shapes and dtypes of ``reference``, all finite.

    Raises
    ------
    UpdateRejected
        Naming the first missing/unexpected key, shape or dtype mismatch, or non-finite tensor.
    """
    missing = [k for k in reference if k not in update]
    unexpected = [k for k in update if k not in reference]
    if missing or unexpected:
        raise UpdateRejected(f"keys differ from the global model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    for key, ref in reference.items():
        value = update[key]
        if value.shape != ref.shape:
            raise UpdateRejected(f"{key}: shape {tuple(value.shape)} differs from the global "
                                 f"model's {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            raise UpdateRejected(f"{key}: dtype {value.dtype} differs from the global model's {ref.dtype}")
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value).all()):
                raise UpdateRejected(f"{key}: holds NaN or infinite values")
