"""The update spool: the checks an upload passes, and where the accepted updates of the open round wait, as
files, until they are aggregated.

Layout: ``TEMP_DIR/updates/round_<r>/<node_id>.pt`` holds the bytes exactly as uploaded (and, for SCAFFOLD,
``<node_id>.control.pt`` the change of the node's control variate, committed before the update). An upload in
progress streams into a temporary file of ``TEMP_DIR/updates/incoming`` (:mod:`.uploads`), is checked from there
and fsynced outside the federation's lock (:meth:`UpdateSpool.check`, :meth:`UpdateSpool.sync`), then renamed
into its round's folder under the lock (:meth:`UpdateSpool.commit`) just before the row that refers to it
commits; so a file without a row can exist after a crash (removed at the next start), never a row without its
file.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from typing import Mapping

import torch

from fedrest.aggregation import UpdateNormTooLarge, delta_norm
from fedrest.files import replace_durably, write_temporary
from fedrest.serialization import UpdateRejected, check_compatible, file_to_state_dict

log = logging.getLogger("fl.federation")


@dataclass
class AcceptedUpdate:
    """An update accepted for the open round (``path``: its file in the spool)."""

    node_id: str
    num_samples: int
    path: str
    train_loss: float | None
    train_accuracy: float | None
    train_seconds: float | None
    received_at: float  # wall clock, seconds since the epoch
    control_path: str | None = None  # SCAFFOLD: the file of the change of the node's control variate


class UpdateSpool:
    """The update files under ``directory`` (TEMP_DIR/updates; it and :attr:`incoming` are created here)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.incoming.mkdir(parents=True, exist_ok=True)

    @property
    def incoming(self) -> Path:
        """The folder of the uploads in progress (on the rounds' filesystem: a rename moves one into place)."""
        return self.directory / "incoming"

    def receive(self, data: bytes | Path) -> Path:
        """The file in :attr:`incoming` that holds ``data``: bytes are written (and fsynced) into a new
        temporary file; a Path (an upload already streamed there) is returned as it is."""
        if isinstance(data, (bytes, bytearray)):
            return write_temporary(self.incoming / "upload", data)
        return Path(data)

    @staticmethod
    def check(data: Path, reference: Mapping[str, torch.Tensor], max_update_norm: float) -> float | None:
        """Check an uploaded update (its file) before it is stored; returns the L2 norm of its change from
        ``reference`` (None when MAX_UPDATE_NORM is 0: not computed). Memory: one decoded copy of the update.

        Raises
        ------
        UpdateRejected
            Undecodable payload, keys/shapes/dtypes that differ from ``reference``, non-finite values, or
            (UpdateNormTooLarge) a change above ``max_update_norm``.
        """
        update = file_to_state_dict(data)
        check_compatible(update, reference)
        if max_update_norm <= 0:
            return None
        norm = delta_norm(update, reference)
        if norm > max_update_norm:
            raise UpdateNormTooLarge(f"the change from the global model has L2 norm {norm:.4g}, above "
                                     f"MAX_UPDATE_NORM={max_update_norm:g}")
        return norm

    @staticmethod
    def check_control(data: Path, parameters: Mapping[str, torch.Tensor], max_norm: float = 0.0) -> None:
        """Check SCAFFOLD's change of a control variate (its file): exactly the keys, shapes and dtypes of the model's
        ``parameters``, all finite, and an L2 norm of at most ``max_norm`` (MAX_UPDATE_NORM; 0: no bound).

        Raises
        ------
        UpdateRejected
            For undecodable bytes or a mismatch, UpdateNormTooLarge above ``max_norm`` (the message says
            "control variate").
        """
        try:
            change = file_to_state_dict(data)
            check_compatible(change, parameters)
        except UpdateRejected as exc:
            raise UpdateRejected(f"control variate: {exc}") from None
        norm = delta_norm(change, {k: torch.zeros_like(v) for k, v in parameters.items()})
        if max_norm > 0 and norm > max_norm:
            raise UpdateNormTooLarge(f"control variate: the change has L2 norm {norm:.4g}, above "
                                     f"MAX_UPDATE_NORM={max_norm:g}")

    @staticmethod
    def present(round_number: int, updates: list) -> list:
        """The stored ``updates`` (AcceptedUpdates of a resumed round) whose files exist; the others are logged."""
        for update in updates:
            if not Path(update.path).exists():  # written and fsynced before its row commits, unless removed by hand
                log.error("round %d: stored update of %s is missing on disk; leaving it out", round_number,
                          update.node_id)
        return [u for u in updates if Path(u.path).exists()]

    def path(self, round_number: int, node_id: str, control: bool = False) -> Path:
        """The file of a node's update (``control``: of its control-variate change) in a round."""
        return self.directory / f"round_{round_number}" / f"{node_id}{'.control' if control else ''}.pt"

    @staticmethod
    def sync(temporary: Path) -> None:
        """fsync a received file (before :meth:`commit`, outside the lock). Raises OSError."""
        with open(temporary, "rb+") as f:  # Windows flushes only a file opened for writing
            os.fsync(f.fileno())

    def commit(self, temporary: Path, round_number: int, node_id: str, control: bool = False) -> Path:
        """Rename a received, synced file into its round's folder (the rename is fsynced too); returns its path."""
        final = self.path(round_number, node_id, control)
        final.parent.mkdir(parents=True, exist_ok=True)
        replace_durably(temporary, final)
        return final

    @staticmethod
    def load(update: AcceptedUpdate):
        """The state_dict of a stored update. Raises OSError or UpdateRejected for a lost or damaged file."""
        return file_to_state_dict(update.path)

    @staticmethod
    def load_control(update: AcceptedUpdate):
        """The control-variate change stored with ``update`` (SCAFFOLD). Raises OSError or UpdateRejected for
        a lost or damaged file, or when the update has none."""
        if update.control_path is None:
            raise UpdateRejected("no control-variate change was stored with this update")
        return file_to_state_dict(update.control_path)

    def discard_round(self, round_number: int) -> None:
        """Remove every file of a round (aggregated, or an attempt that started again)."""
        shutil.rmtree(self.directory / f"round_{round_number}", ignore_errors=True)

    def remove_other_rounds(self, keep: int) -> None:
        """Remove the folders of every round but ``keep`` (left behind by a crash after a round's commit)."""
        for stale in self.directory.glob("round_*"):
            if stale.name != f"round_{keep}":
                shutil.rmtree(stale, ignore_errors=True)
