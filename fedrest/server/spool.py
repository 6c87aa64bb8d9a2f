"""The update spool: the checks an upload passes, and where the accepted updates of the open round wait, as
files, until they are aggregated.

Layout: ``TEMP_DIR/updates/round_<r>/<node_id>.pt`` holds the bytes exactly as uploaded (and, for SCAFFOLD,
``<node_id>.control.pt`` the change of the node's control variate, committed before the update). An upload is written
and fsynced under a temporary name outside the federation's lock (:meth:`UpdateSpool.write`), then renamed
into place under the lock (:meth:`UpdateSpool.commit`) just before the row that refers to it commits; so a
file without a row can exist after a crash (removed at the next start), never a row without its file.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from typing import Mapping

import torch

from fedrest.aggregation import UpdateNormTooLarge, delta_norm
from fedrest.files import replace_durably, write_temporary
from fedrest.serialization import UpdateRejected, bytes_to_state_dict, check_compatible

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
    """The update files under ``directory`` (TEMP_DIR/updates)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @staticmethod
    def check(data: bytes, reference: Mapping[str, torch.Tensor], max_update_norm: float) -> float | None:
        """Check an uploaded update before it is stored; returns the L2 norm of its change from ``reference``
        (None when MAX_UPDATE_NORM is 0: not computed).

        Raises
        ------
        UpdateRejected
            Undecodable payload, keys/shapes/dtypes that differ from ``reference``, non-finite values, or
            (UpdateNormTooLarge) a change above ``max_update_norm``.
        """
        update = bytes_to_state_dict(data)
        check_compatible(update, reference)
        if max_update_norm <= 0:
            return None
        norm = delta_norm(update, reference)
        if norm > max_update_norm:
            raise UpdateNormTooLarge(f"the change from the global model has L2 norm {norm:.4g}, above "
                                     f"MAX_UPDATE_NORM={max_update_norm:g}")
        return norm

    @staticmethod
    def check_control(data: bytes, parameters: Mapping[str, torch.Tensor], max_norm: float = 0.0) -> None:
        """Check SCAFFOLD's change of a control variate: exactly the keys, shapes and dtypes of the model's
        ``parameters``, all finite, and an L2 norm of at most ``max_norm`` (MAX_UPDATE_NORM; 0: no bound).

        Raises
        ------
        UpdateRejected
            For undecodable bytes or a mismatch, UpdateNormTooLarge above ``max_norm`` (the message says
            "control variate").
        """
        try:
            change = bytes_to_state_dict(data)
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
            if not Path(update.path).exists():  # pragma: no cover - written and fsynced before its row commits
                log.error("round %d: stored update of %s is missing on disk; leaving it out", round_number,
                          update.node_id)
        return [u for u in updates if Path(u.path).exists()]

    def path(self, round_number: int, node_id: str, control: bool = False) -> Path:
        """The file of a node's update (``control``: of its control-variate change) in a round."""
        return self.directory / f"round_{round_number}" / f"{node_id}{'.control' if control else ''}.pt"

    def write(self, round_number: int, node_id: str, data: bytes, control: bool = False) -> Path:
        """Write and fsync ``data`` under a temporary name in the round's folder; returns that name."""
        return write_temporary(self.path(round_number, node_id, control), data)

    def commit(self, temporary: Path, round_number: int, node_id: str, control: bool = False) -> Path:
        """Rename a written update into place (the rename is fsynced too); returns its path."""
        final = self.path(round_number, node_id, control)
        replace_durably(temporary, final)
        return final

    @staticmethod
    def load(update: AcceptedUpdate):
        """The state_dict of a stored update. Raises OSError or UpdateRejected for a lost or damaged file."""
        with open(update.path, "rb") as f:
            return bytes_to_state_dict(f.read())

    @staticmethod
    def load_control(update: AcceptedUpdate):
        """The control-variate change stored with ``update`` (SCAFFOLD). Raises OSError or UpdateRejected for
        a lost or damaged file, or when the update has none."""
        if update.control_path is None:
            raise UpdateRejected("no control-variate change was stored with this update")
        with open(update.control_path, "rb") as f:
            return bytes_to_state_dict(f.read())

    def discard_round(self, round_number: int) -> None:
        """Remove every file of a round (aggregated, or an attempt that started again)."""
        shutil.rmtree(self.directory / f"round_{round_number}", ignore_errors=True)

    def remove_other_rounds(self, keep: int) -> None:
        """Remove the folders of every round but ``keep`` (left behind by a crash after a round's commit)."""
        for stale in self.directory.glob("round_*"):
            if stale.name != f"round_{keep}":
                shutil.rmtree(stale, ignore_errors=True)
