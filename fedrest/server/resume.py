"""Reading a stored run back (a restarted coordinator): its id, its global model, and where its rounds were."""

from __future__ import annotations

from typing import Mapping

import torch

from fedrest.serialization import UpdateRejected, bytes_to_state_dict, check_compatible
from fedrest.server.checkpoints import GlobalModels
from fedrest.server.round_state import RoundState
from fedrest.server.spool import AcceptedUpdate, UpdateSpool
from fedrest.server.store import RunStore, StoreError

ROUND_KEYS = ("phase", "round", "attempt", "participants", "round_started_wall", "model_version", "evaluators",
              "evaluations")


def read_stored_run(store: RunStore, global_models: GlobalModels, spool: UpdateSpool,
                    reference: Mapping[str, torch.Tensor], now_mono: float,
                    has_state: bool) -> tuple[str, dict, RoundState, dict]:
    """(run id, the global model's state_dict, the round state, the strategy's server state) of the run in
    ``store``; the open round gets a fresh deadline from ``now_mono``, and keeps its stored updates whose files
    exist. The server state is read when the strategy ``has_state`` ({} otherwise).

    Raises
    ------
    StoreError
        When the global model or server state the database names is missing, damaged, or does not fit
        ``reference`` (another model): the message says how to start a new run.
    """
    run_id, version = store.get("run_id"), store.get("model_version")
    try:
        state = bytes_to_state_dict(global_models.read(version))
        check_compatible(state, reference)
    except (OSError, UpdateRejected) as exc:
        raise StoreError(f"cannot resume run {run_id}: global model version {version} "
                         f"({global_models.path(version)}) is unreadable: {exc}. Start with --fresh for a new "
                         "run.") from None
    try:
        server_state = global_models.read_state(version) if has_state else {}
    except (OSError, UpdateRejected) as exc:
        raise StoreError(f"cannot resume run {run_id}: the server state of version {version} "
                         f"({global_models.state_path(version)}) is unreadable: {exc}. Start with --fresh for a "
                         "new run.") from None
    values = {k: store.get(k) for k in ROUND_KEYS}
    updates = spool.present(values["round"], [AcceptedUpdate(**r) for r in store.updates(values["round"])])
    return run_id, state, RoundState.from_values(values, updates, store.history(), now_mono), server_state
