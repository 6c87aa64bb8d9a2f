"""A node's data as the training loop reads it: tensors in memory (the fast path) or a Dataset behind a DataLoader.

:func:`as_local_data` turns what a task's ``load_*_data`` returned into a :class:`LocalData`:

- a pair of tensors ``(x, y)`` -> :class:`TensorData`: mini-batches are cut by index from tensors held on the
  training device (for small datasets such as MNIST this is several times faster than a per-example pipeline);
- a ``torch.utils.data.Dataset`` of ``(x, y)`` pairs -> :class:`DatasetData`: decoded by a ``DataLoader`` with
  worker processes, ``pin_memory`` and ``non_blocking`` copies on CUDA. When every decoded example fits in
  CACHE_BYTES, the first pass over the data decodes it once into tensors (logged) and every later epoch and round
  reads those, as fast as the tensor path; otherwise each epoch streams through the DataLoader.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

log = logging.getLogger("fl.data")

BatchTransform = Callable[[torch.Tensor], torch.Tensor]  # applied to x on the device (e.g. uint8 -> normalised)
DECODE_BATCH = 256  # examples per DataLoader batch of the caching pass


class LocalData:
    """Examples ``(x, y)`` that the training and evaluation loops read in mini-batches.

    ``classes`` names the class of each label index when the data knows it (ImageFolder's folder names).
    """

    classes: list[str] | None = None

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def labels(self) -> torch.Tensor | None:
        """int64 (N,) class labels on the CPU, or None when the labels are not classes (regression)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def subset(self, indices: Sequence[int]) -> "LocalData":
        """The examples at ``indices``, same kind."""
        raise NotImplementedError  # pragma: no cover - abstract

    def batches(self, batch_size: int, device: torch.device,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) mini-batches on ``device``: a fresh random order from ``generator``, else in order."""
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def raw(self):
        """What a task's own ``train``/``evaluate`` receive: the ``(x, y)`` tensors, or the Dataset (a Subset)."""
        raise NotImplementedError  # pragma: no cover - abstract


class TensorData(LocalData):
    """Examples held as two tensors with the same first dimension N (moved to the device once, by :meth:`to`)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: list[str] | None = None,
                 transform: BatchTransform | None = None) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"data must be a pair of tensors (x, y), got ({type(x).__name__}, {type(y).__name__})")
        if x.shape[:1] != y.shape[:1]:
            raise ValueError(f"x has {x.shape[0] if x.dim() else 0} examples but y has "
                             f"{y.shape[0] if y.dim() else 0}")
        self.x, self.y, self.classes, self.transform = x, y, classes, transform

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def labels(self) -> torch.Tensor | None:
        if self.y.dtype.is_floating_point or self.y.dim() != 1:
            return None
        return self.y.detach().cpu().to(torch.long)

    def subset(self, indices) -> "TensorData":
        idx = torch.as_tensor(indices, dtype=torch.long).to(self.y.device)
        return TensorData(self.x[idx], self.y[idx], self.classes, self.transform)

    def to(self, device: torch.device) -> "TensorData":
        return TensorData(self.x.to(device), self.y.to(device), self.classes, self.transform)

    def batches(self, batch_size, device, generator=None):
        n = len(self)
        order = (torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)).to(
            self.x.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = self.x[idx].to(device, non_blocking=True), self.y[idx].to(device, non_blocking=True)
            yield (self.transform(x) if self.transform is not None else x), y

    @property
    def raw(self):
        return self.x, self.y


def default_data_workers() -> int:
    """DataLoader worker processes when DATA_WORKERS is not set: one core is left to training, at most 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class DatasetData(LocalData):
    """A ``Dataset`` of (x, y) read through a DataLoader; cached as :class:`TensorData` when it fits.

    Parameters
    ----------
    num_workers : DataLoader worker processes (0: decode in this process).
    cache_bytes : most bytes the decoded examples may take in memory to be cached (0: never cache).
    transform : applied to each batch's x on the device (after the copy), e.g. uint8 -> normalised float.
    """

    def __init__(self, dataset: Dataset, num_workers: int, cache_bytes: int, classes: list[str] | None = None,
                 transform: BatchTransform | None = None, description: str = "data") -> None:
        self.dataset, self.num_workers, self.cache_bytes = dataset, num_workers, cache_bytes
        self.classes = classes if classes is not None else getattr(dataset, "classes", None)
        self.transform, self.description = transform, description
        self._cache: TensorData | None = None
        self._cache_checked = False
        self._loaders: dict = {}  # (batch size, device type, shuffled) -> (DataLoader, its generator)

    def __len__(self) -> int:
        return len(self.dataset)

    def labels(self) -> torch.Tensor | None:
        targets = _targets(self.dataset)
        if targets is None:
            log.info("%s: reading every label once (the dataset has no .targets)", self.description)
            targets = torch.as_tensor([int(self.dataset[i][1]) for i in range(len(self.dataset))])
        return targets

    def subset(self, indices) -> "DatasetData":
        indices = [int(i) for i in indices]
        return DatasetData(Subset(self.dataset, indices), self.num_workers, self.cache_bytes, self.classes,
                           self.transform, self.description)

    @property
    def raw(self):
        return self.dataset

    def _loader(self, batch_size: int, device: torch.device, generator: torch.Generator | None) -> DataLoader:
        """A DataLoader kept for every later epoch (its worker processes persist); reseeded from ``generator``."""
        key = (batch_size, device.type, generator is not None)
        if key not in self._loaders:
            own = torch.Generator()
            self._loaders[key] = (DataLoader(self.dataset, batch_size=batch_size, shuffle=generator is not None,
                                             generator=own, num_workers=self.num_workers,
                                             pin_memory=device.type == "cuda",
                                             persistent_workers=self.num_workers > 0), own)
        loader, own = self._loaders[key]
        if generator is not None:
            own.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return loader

    def warm(self, device: torch.device) -> None:
        """Decode into the cache now (before the caller starts threads: DataLoader processes are forked)."""
        self._cached(device)

    def batches(self, batch_size, device, generator=None):
        cache = self._cached(device)
        if cache is not None:
            yield from cache.batches(batch_size, device, generator)
            return
        for x, y in self._loader(batch_size, device, generator):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield (self.transform(x) if self.transform is not None else x), y

    def _cached(self, device: torch.device) -> TensorData | None:
        """The decoded examples as tensors on ``device`` (decoded on the first call), or None if they do not fit."""
        if self._cache_checked:
            return self._cache
        self._cache_checked = True
        if self.cache_bytes <= 0 or len(self) == 0:
            return None
        x0, y0 = self.dataset[0]
        x0, y0 = torch.as_tensor(x0), torch.as_tensor(y0)
        estimate = len(self) * (x0.element_size() * x0.numel() + y0.element_size() * max(1, y0.numel()))
        if estimate > self.cache_bytes:
            log.info("%s: %d decoded examples would take %.0f MB, above CACHE_BYTES=%d: streaming them through "
                     "the DataLoader every epoch", self.description, len(self), estimate / 1e6, self.cache_bytes)
            return None
        started = time.perf_counter()
        xs = torch.empty((len(self), *x0.shape), dtype=x0.dtype)
        ys = torch.empty((len(self), *y0.shape), dtype=y0.dtype)
        at = 0
        for x, y in DataLoader(self.dataset, batch_size=DECODE_BATCH, num_workers=self.num_workers):
            xs[at:at + len(y)], ys[at:at + len(y)] = x, y
            at += len(y)
        self._cache = TensorData(xs, ys, self.classes, self.transform).to(device)
        log.info("%s: decoded %d examples once in %.1fs and cached them in memory (%.0f MB on %s); later epochs "
                 "read the cache", self.description, len(self), time.perf_counter() - started, estimate / 1e6,
                 device)
        return self._cache


def _targets(dataset: Dataset) -> torch.Tensor | None:
    """The int64 labels of ImageFolder-like datasets (``.targets``), through Subsets; None if unknown."""
    if isinstance(dataset, Subset):
        parent = _targets(dataset.dataset)
        return None if parent is None else parent[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    return torch.as_tensor(targets, dtype=torch.long)


def as_local_data(obj, *, where: str, num_workers: int, cache_bytes: int,
                  transform: BatchTransform | None = None) -> LocalData:
    """Wrap what a task's data loader returned (see the module docstring).

    Raises
    ------
    TypeError
        For anything but a pair of tensors, a Dataset, or a LocalData; the message names ``where``.
    ValueError
        For tensors whose first dimensions differ, or no examples.
    """
    if isinstance(obj, LocalData):
        data = obj
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        try:
            data = TensorData(obj[0], obj[1], transform=transform)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    elif isinstance(obj, Dataset) and hasattr(obj, "__len__"):
        data = DatasetData(obj, num_workers, cache_bytes, transform=transform, description=where)
    else:
        raise TypeError(f"{where} must return a pair of tensors (x, y) or a torch.utils.data.Dataset of (x, y) "
                        f"pairs, not {type(obj).__name__}")
    if len(data) == 0:
        raise ValueError(f"{where} returned no examples")
    return data
