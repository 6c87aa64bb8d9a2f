"""A worker's SCAFFOLD control variate c_i, kept on its own disk so that a restarted worker keeps it.

File: ``TEMP_DIR/workers/<node name>/control_variate.pt``, a ``torch.save`` of ``{"run_id": str, "round": int,
"control_variate": {parameter name: tensor}}``, written atomically (fsynced temporary, then rename) and read
with ``torch.load(weights_only=True)``. A control variate belongs to one run: a file of another run (or none)
means c_i = 0, as at the start of a run (Karimireddy et al. 2020, Algorithm 1, line 1).

It is written once the coordinator has accepted the round's update (the 202 answer, or 409 duplicate for an
upload that had arrived): the coordinator's c then counts this worker's change. A worker killed between the
answer and the write starts its next round from its previous c_i (one round's change lost; the method still
converges, as with a client that was not sampled).
"""

from __future__ import annotations

import io
import pickle
import logging
from pathlib import Path
from typing import Mapping

import torch

from fedrest.files import atomic_write_bytes

log = logging.getLogger("fl.worker")

FILE_NAME = "control_variate.pt"


class LocalControlVariate:
    """The control-variate file of one worker (``directory``: TEMP_DIR/workers/<name>)."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / FILE_NAME

    def load(self, run_id: str | None, parameters: Mapping[str, torch.Tensor]) -> "dict[str, torch.Tensor]":
        """c_i of run ``run_id``, one tensor per entry of ``parameters`` (its shapes and dtypes, on the CPU);
        zeros when there is no file, it is of another run, or it does not fit ``parameters`` (logged)."""
        zeros = {k: torch.zeros_like(v, device="cpu") for k, v in parameters.items()}
        if not self.path.exists():
            return zeros
        try:
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            tensors = stored["control_variate"]
            fits = set(tensors) == set(zeros) and all(tensors[k].shape == v.shape for k, v in zeros.items())
        except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:  # damaged
            log.warning("cannot read the control variate in %s (%s); starting from 0", self.path, exc)
            return zeros
        if stored.get("run_id") != run_id:
            log.info("the control variate in %s is of run %s, not %s; starting from 0", self.path,
                     stored.get("run_id"), run_id)
            return zeros
        if not fits:
            log.warning("the control variate in %s does not fit this model; starting from 0", self.path)
            return zeros
        log.info("control variate of run %s after round %s read from %s", run_id, stored.get("round"), self.path)
        return {k: tensors[k].to(zeros[k].dtype) for k in zeros}

    def save(self, run_id: str | None, round_number: int, control: Mapping[str, torch.Tensor]) -> None:
        """Write c_i after round ``round_number`` of run ``run_id`` (atomically, fsynced). Raises OSError."""
        buffer = io.BytesIO()
        torch.save({"run_id": run_id, "round": int(round_number),
                    "control_variate": {k: v.detach().cpu().contiguous() for k, v in control.items()}}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())


__all__ = ["FILE_NAME", "LocalControlVariate"]
