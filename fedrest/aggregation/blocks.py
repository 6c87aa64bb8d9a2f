"""Coordinate blocks: the robust rules over many updates in O(updates x block) memory.

The median and the trimmed mean (:mod:`.rules`) need every update's value of a coordinate at once. Holding the m
updates of a round, then stacking a tensor of all of them in float64, costs about 3 x m x the model (500 updates of a
4.8 MB model: more than 7 GB). Instead each update, as it is added (after its checks and clipping), is appended to one
spill file: its tensors' raw bytes in the global model's key order. The rule then reads, for one block of
coordinates of one tensor at a time, that block of every update (a seek and a read per update) into an
(m, block) float64 array, sorts it along the updates, combines it, and writes the block's part of the result.

Memory: the block array, its sorted copy and the sort's indices, 24 x m x block bytes, with the block sized to
``budget_bytes`` (default BLOCK_BYTES), plus one result model. Disk: one model's bytes per update, in a temporary
file deleted when the round's rule is done (or at the next start, after a crash).

Results are bit-identical to the whole-tensor rules (:func:`.rules.coordinate_median`, :func:`.rules.trimmed_mean`):
a coordinate's result depends only on its m values, sorted, and is computed by the same functions
(:func:`.rules.median_of_sorted`, :func:`.rules.trimmed_mean_of_sorted`), which work column by column.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import torch

from fedrest.aggregation.fedavg import cast_like

BLOCK_BYTES = 256 * 1024 * 1024  # the (m, block) float64 array, its sorted copy and the sort's indices
StateDict = Mapping[str, torch.Tensor]


class SpilledUpdates:
    """The updates of a round, appended one after another to a temporary file in ``directory`` (None: the
    system's temporary folder) in ``reference``'s layout; read back a block of coordinates of every update at once.

    Raises OSError when the file cannot be created or written (a full disk).
    """

    def __init__(self, reference: StateDict, directory: str | os.PathLike | None = None) -> None:
        self.layout: "OrderedDict[str, tuple[int, torch.dtype, int]]" = OrderedDict()  # key -> (offset, dtype, numel)
        offset = 0
        for key, ref in reference.items():
            self.layout[key] = (offset, ref.dtype, ref.numel())
            offset += ref.numel() * ref.element_size()
        self.record_bytes = offset
        self.count = 0
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix=".spill-", suffix=".tmp", dir=directory)
        self._file = os.fdopen(fd, "w+b")

    def append(self, state_dict: StateDict) -> None:
        """Add one update (its keys, shapes and dtypes those of the reference)."""
        self._file.seek(self.count * self.record_bytes)
        for key in self.layout:
            self._file.write(_raw_bytes(state_dict[key]))
        self.count += 1

    def block(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Coordinates [start, stop) of the flattened ``key`` of every update: an (m, stop - start) float64 tensor,
        row i from the i-th update appended."""
        offset, dtype, _ = self.layout[key]
        itemsize = torch.empty((), dtype=dtype).element_size()
        out = torch.empty((self.count, stop - start), dtype=torch.float64)
        buffer = bytearray((stop - start) * itemsize)
        self._file.flush()
        for i in range(self.count):
            self._file.seek(i * self.record_bytes + offset + start * itemsize)
            if self._file.readinto(buffer) != len(buffer):
                raise OSError(f"spill file {self.path} is shorter than expected")
            out[i] = torch.frombuffer(buffer, dtype=dtype).to(torch.float64)
        return out

    def close(self) -> None:
        """Delete the file."""
        self._file.close()
        Path(self.path).unlink(missing_ok=True)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def blockwise(spilled: SpilledUpdates, reference: StateDict, combine_sorted: Callable[[torch.Tensor], torch.Tensor],
              budget_bytes: int = BLOCK_BYTES) -> "OrderedDict[str, torch.Tensor]":
    """Apply a coordinate-wise rule to the spilled updates, one block at a time.

    Parameters
    ----------
    combine_sorted : (m, b) float64 tensor, sorted along dim 0 -> (b,) float64 result of each coordinate.
    budget_bytes : memory for one block (24 bytes per value of the block array: it, its sorted copy, indices).

    Returns the result in ``reference``'s keys, shapes and dtypes (integers rounded half to even,
    :func:`.fedavg.cast_like`). Raises ValueError when no update was spilled.
    """
    m = spilled.count
    if m == 0:
        raise ValueError("no updates to combine")
    width = max(1, budget_bytes // (24 * m))
    out = OrderedDict()
    for key, ref in reference.items():
        numel = spilled.layout[key][2]
        flat = torch.empty(numel, dtype=torch.float64)
        for start in range(0, numel, width):
            stop = min(numel, start + width)
            values, _ = torch.sort(spilled.block(key, start, stop), dim=0)
            flat[start:stop] = combine_sorted(values)
            del values
        out[key] = cast_like(flat.reshape(ref.shape), ref)
    return out
