"""The two files a round leaves, and why they differ.

- **The resume copy** (``TEMP_DIR/global/model_v<v>.pt``, :class:`GlobalModels`): the global model after
  ``v`` rounds, as the bare state_dict bytes that workers download. It is the coordinator's own state: written
  before the round's commit that refers to it, read back (weights-only, checked against the model) by a
  restarted coordinator, and only the version the database names is kept. Nothing else goes into it because
  everything else about the round (metrics, settings, history) is in the database, committed with it.
- **The server state** (``TEMP_DIR/global/server_state_v<v>.pt``, :meth:`GlobalModels.write_state`): a
  strategy's state after ``v`` rounds (server momentum, Adam moments), a weights-only ``{name: tensor}`` file,
  written beside the resume copy before the same commit and kept for the same version, so that a restarted
  coordinator continues the run with the same bits.
- **The user's checkpoint** (``MODELS_DIR/global_model_round_<r>.pt`` and ``global_model.pt``,
  :func:`save_checkpoint`): a self-describing file for people and scripts, kept for every round unless
  ``--no-save-model``: the state_dict with the model name, round, test metrics and the run's settings, so that
  it can be loaded and used without the coordinator (:func:`load_checkpoint`). A failure to write it is logged
  and does not stop the run.

Both are written with the one atomic writer (:mod:`fedrest.files`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Mapping

import torch

from fedrest import failpoints
from fedrest.files import atomic_write_bytes
from fedrest.serialization import bytes_to_state_dict, state_dict_to_bytes, torch_save_bytes
from fedrest.tasks.fingerprint import TaskIdentity

CHECKPOINT_FORMAT = "fl-checkpoint-v1"


class GlobalModels:
    """The resume copies of the global model under ``directory`` (TEMP_DIR/global)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, version: int) -> Path:
        return self.directory / f"model_v{version}.pt"

    def write(self, version: int, data: bytes) -> None:
        """Store the serialised global model of ``version`` (atomic, fsynced)."""
        atomic_write_bytes(self.path(version), data)

    def read(self, version: int) -> bytes:
        """The bytes of ``version``. Raises OSError when the file is missing or unreadable."""
        return self.path(version).read_bytes()

    def privacy_key(self) -> bytes:
        """The run's secret DP key (32 random bytes in ``dp_key``, mode 0600, made on first use): it seeds
        DP-FedAvg's client sampling and noise, so that a resumed round draws the same and nobody else can.
        Raises OSError when it cannot be read or written."""
        path = self.directory / "dp_key"
        if not path.exists():
            atomic_write_bytes(path, secrets.token_bytes(32))
        return path.read_bytes()

    def state_path(self, version: int) -> Path:
        return self.directory / f"server_state_v{version}.pt"

    def write_state(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        """Store the strategy's server state after ``version`` rounds (atomic, fsynced)."""
        atomic_write_bytes(self.state_path(version), state_dict_to_bytes(state))

    def read_state(self, version: int) -> "dict[str, torch.Tensor]":
        """The server state after ``version`` rounds ({} for version 0: no round has made one).

        Raises
        ------
        OSError
            When the file is missing or unreadable.
        UpdateRejected
            When it is not a weights-only {name: tensor} file (:func:`bytes_to_state_dict`).
        """
        return dict(bytes_to_state_dict(self.state_path(version).read_bytes())) if version else {}

    def keep_only(self, version: int) -> None:
        """Delete every other version (after the commit that names ``version``)."""
        keep = {self.path(version), self.state_path(version)}
        for old in [*self.directory.glob("model_v*.pt"), *self.directory.glob("server_state_v*.pt")]:
            if old not in keep:
                old.unlink(missing_ok=True)


def save_checkpoint(models_dir: str | os.PathLike, number: int, state_dict: Mapping[str, torch.Tensor],
                    task: TaskIdentity, test_metrics: dict, settings: dict) -> None:
    """Write round ``number``'s checkpoint as ``global_model_round_<number>.pt`` and ``global_model.pt``.

    Raises
    ------
    OSError
        When a file cannot be written (the earlier files stay whole).
    """
    checkpoint = {"format": CHECKPOINT_FORMAT, "task": task.name, "model_name": task.model_name,
                  "classes": task.classes, "round": number, "state_dict": state_dict,
                  "test_loss": test_metrics.get("loss"), "test_accuracy": test_metrics.get("accuracy"),
                  "test_metrics": dict(test_metrics), "config": settings}
    data = torch_save_bytes(checkpoint)
    models = Path(models_dir)
    atomic_write_bytes(models / f"global_model_round_{number}.pt", data)
    failpoints.hit("checkpoint.between_files")
    atomic_write_bytes(models / "global_model.pt", data)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by the coordinator (weights-only, never runs code).

    Returns a dict with ``format``, ``task`` (its name), ``model_name``, ``classes`` (the name of each class
    index, or None), ``round``, ``state_dict``, ``test_metrics`` (with ``test_loss`` and ``test_accuracy`` also
    at the top) and ``config``. Checkpoints of earlier versions have no ``task``, ``classes``, ``test_metrics``.

    Raises
    ------
    ValueError
        If the file is not such a checkpoint.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return obj
