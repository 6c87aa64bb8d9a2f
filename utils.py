"""Devices, safe (de)serialisation of state_dicts, weighted FedAvg, atomic files and logging.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data", Algorithm 1): the new global model is w = sum_k (n_k / n) * w_k, where n_k is the number of
training examples of update k and n = sum_k n_k.

Rules of :func:`fedavg` and :class:`FedAvgAccumulator`:

- Every key of the state_dict is averaged, buffers included (BatchNorm running statistics too).
- Floating tensors: weighted mean computed in float64, then cast back to the reference dtype.
- Integer and bool tensors (BatchNorm's int64 0-d ``num_batches_tracked``): the same weighted mean in
  float64, rounded to the nearest integer (half to even), cast back to the reference dtype. For
  counters this is the expected count; for bool tensors it is a weighted majority vote.
- Every update must have exactly the reference keys, shapes and dtypes; otherwise
  :class:`UpdateRejected` names the first difference. Floating values must be finite.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping

import torch

import failpoints

log = logging.getLogger("fl.utils")

class DeviceUnavailable(RuntimeError):
    """The requested device (``--gpu``) is not usable on this machine."""


class UpdateRejected(ValueError):
    """A state_dict is not acceptable: undecodable, wrong keys/shapes/dtypes, or non-finite values."""


# ----------------------------------------------------------------------------- devices


def select_device(prefer: str | None) -> torch.device:
    """The torch device for ``prefer``: "gpu" (CUDA, required), "cpu", or None (CUDA when available).

    Raises
    ------
    DeviceUnavailable
        For "gpu" when CUDA is not available; the message says what torch reports.
    """
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer == "gpu":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"--gpu was given but CUDA is not available (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}; {torch.cuda.device_count()} devices visible). "
                "Use --cpu, or install a CUDA build of torch and check the driver with nvidia-smi.")
        return torch.device("cuda")
    if prefer is not None:
        raise ValueError(f"prefer must be 'gpu', 'cpu' or None, got {prefer!r}")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_description(device: torch.device) -> str:
    """A short human-readable name of ``device`` (GPU model for CUDA)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def set_cpu_threads(num_threads: int) -> None:
    """Set torch's intra-op CPU threads; 0 keeps torch's default (one per core)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


# ----------------------------------------------------------------------------- serialisation


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
    _check_archive(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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


def _check_archive(data: bytes) -> None:
    if not data.startswith(b"PK\x03\x04"):
        raise UpdateRejected("not a torch zip archive (torch.save's format); a raw pickle is never loaded")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        raise UpdateRejected(f"not a readable zip archive ({exc}); truncated?") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise UpdateRejected(f"archive entry {entry.filename[:100]!r} is compressed; torch.save stores entries "
                                 "uncompressed")
        if entry.file_size > len(data) or entry.header_offset + entry.file_size > len(data):
            raise UpdateRejected(f"archive entry {entry.filename[:100]!r} claims {entry.file_size} bytes, more "
                                 f"than the {len(data)} bytes received")


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


# ----------------------------------------------------------------------------- FedAvg


class FedAvgAccumulator:
    """Streaming sample-weighted average of state_dicts (FedAvg), O(one model) memory.

    Sums ``n_k * w_k`` in float64 as updates arrive, so the updates themselves need not be kept.
    The rules for dtypes are in this module's docstring.

    Parameters
    ----------
    reference : state_dict whose keys, shapes and dtypes every update must match (the global model).
    """

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        self._reference = OrderedDict((k, v.detach().to("cpu")) for k, v in reference.items())
        self._sums = OrderedDict((k, torch.zeros(v.shape, dtype=torch.float64))
                                 for k, v in self._reference.items())
        self.total_samples = 0
        self.num_updates = 0

    def add(self, update: Mapping[str, torch.Tensor], num_samples: int) -> None:
        """Add one update with weight ``num_samples`` (an int >= 1).

        Raises
        ------
        UpdateRejected
            If the update does not match the reference, or ``num_samples`` is not a positive int.
            Nothing is added then.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise UpdateRejected(f"num_samples must be an integer >= 1, got {num_samples!r}")
        check_compatible(update, self._reference)
        for key, total in self._sums.items():
            total.add_(update[key].detach().to("cpu", torch.float64), alpha=num_samples)
        self.total_samples += num_samples
        self.num_updates += 1

    def result(self) -> "OrderedDict[str, torch.Tensor]":
        """The weighted mean, each tensor in its reference dtype and shape.

        Raises
        ------
        ValueError
            If no update was added (there is nothing to average).
        """
        if self.num_updates == 0:
            raise ValueError("FedAvg of zero updates")
        out = OrderedDict()
        for key, total in self._sums.items():
            ref = self._reference[key]
            mean = total / self.total_samples
            if not (ref.is_floating_point() or ref.is_complex()):
                mean = torch.round(mean)
            out[key] = mean.to(ref.dtype)
        return out


def fedavg(updates: Iterable[tuple[Mapping[str, torch.Tensor], int]],
           reference: Mapping[str, torch.Tensor] | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Sample-weighted FedAvg of ``(state_dict, num_samples)`` pairs.

    Parameters
    ----------
    updates : pairs of a state_dict and its number of training examples n_k (int >= 1).
    reference : keys/shapes/dtypes to enforce; defaults to the first update.

    Returns
    -------
    OrderedDict with the reference's keys, shapes and dtypes.

    Raises
    ------
    UpdateRejected
        For a mismatched or non-finite update or a bad ``num_samples``.
    ValueError
        For an empty list of updates.
    """
    acc = None
    for state_dict, num_samples in updates:
        if acc is None:
            acc = FedAvgAccumulator(reference if reference is not None else state_dict)
        acc.add(state_dict, num_samples)
    if acc is None:
        raise ValueError("FedAvg of zero updates")
    return acc.result()


# ----------------------------------------------------------------------------- files and logs


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    Writes a temporary file in the same directory, fsyncs it, ``os.replace``s it over ``path``,
    then fsyncs the directory (where the platform allows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        failpoints.hit("atomic_write.before_replace")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or a new file) to disk, where the platform allows it."""
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def run_program(body, argv=None) -> int:
    """Run a long-running program's ``body(argv)`` and return its exit status.

    Until the body installs its own handlers, SIGTERM acts like Ctrl-C, and an interrupt during start-up
    (imports, data loading) ends the program quietly with status 0 instead of a traceback.
    """
    import signal

    def _raise(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
    try:
        return body(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 0


def setup_logging(log_file: str | os.PathLike | None, level: int = logging.INFO) -> None:
    """Configure the root logger once for an entry point: stdout, plus ``log_file`` when given."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings repeat what our loggers say
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
