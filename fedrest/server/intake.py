"""What the federation takes in from workers: updates (with SCAFFOLD's control-variate change beside them),
federated evaluations, and the refusals of updates that did not pass the checks.

Functions of a :class:`~fedrest.server.federation.Federation` (``fed``; its methods delegate here), called
without its lock held: the checks, decoding and fsyncs run outside the lock, the commit under it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

from fedrest.serialization import UpdateRejected
from fedrest.server.registry import Node
from fedrest.server.spool import AcceptedUpdate

log = logging.getLogger("fl.federation")


class MissingControlVariate(UpdateRejected):
    """(400) A SCAFFOLD round's update came without the change of the worker's control variate."""

    error = "missing_control_variate"


def submit_update(fed, node: Node, round_number: int, metadata: Mapping, data: bytes | Path,
                  control: bytes | Path | None = None) -> AcceptedUpdate:
    """Check and durably store one update. Nothing is changed unless it is accepted.

    The file is checked and fsynced, then renamed into the round's folder and the update's row commits; only then
    does this return (and the API answer 202), so an acknowledged update survives a crash of the coordinator.

    Parameters
    ----------
    metadata : validated metadata: ``num_samples`` (int >= 1) and optional ``train_loss``, ``train_accuracy``,
        ``train_seconds`` (floats).
    data : the serialised state_dict: its file in the spool's ``incoming`` folder (an upload streamed there; it is
        moved into place when accepted, removed when not), or bytes (written there first).
    control : SCAFFOLD's serialised change of the worker's control variate, the same way (required when the
        strategy uses control variates, ignored otherwise): the model's parameters' keys, shapes and dtypes, finite.

    Raises
    ------
    Conflict
        Stale round, duplicate submission, or a node that is not a participant.
    UpdateRejected
        As :meth:`UpdateSpool.check` (undecodable, mismatched, non-finite, change above MAX_UPDATE_NORM), and
        for a missing or bad control-variate change.
    """
    with fed.changed:
        fed.state.check_can_submit(node.node_id, round_number)
        reference = fed.global_state
    uses_control = fed.strategy.uses_control_variates
    received = [fed.spool.receive(data)] + ([fed.spool.receive(control)] if uses_control and control else [])
    try:
        norm = fed.spool.check(received[0], reference, fed.config.max_update_norm)
        _check_control(fed, received[1] if len(received) > 1 else None, reference)
        for path in received:
            fed.spool.sync(path)
        with fed.changed, fed.store.transaction():
            fed.state.check_can_submit(node.node_id, round_number)
            accepted = _commit(fed, node, round_number, metadata, received)
            received = []  # moved into place
            log.info("round %d: update %d/%d from %s (%d samples, change norm %s)", round_number,
                     len(fed.state.updates), len(fed.state.participants), node.name, accepted.num_samples,
                     "not checked" if norm is None else f"{norm:.3g}")
    finally:
        for path in received:
            path.unlink(missing_ok=True)
    return accepted


def _commit(fed, node: Node, round_number: int, metadata: Mapping, received: list[Path]) -> AcceptedUpdate:
    """Move a checked update (and its control-variate change) into place and commit its row; under the lock."""
    moved = []  # the control file is committed before the update: it exists when the update does
    try:
        if len(received) > 1:
            moved.append(fed.spool.commit(received[1], round_number, node.node_id, control=True))
        moved.append(fed.spool.commit(received[0], round_number, node.node_id))
        accepted = AcceptedUpdate(node.node_id, int(metadata["num_samples"]), str(moved[-1]),
                                  metadata.get("train_loss"), metadata.get("train_accuracy"),
                                  metadata.get("train_seconds"), time.time(),
                                  str(moved[0]) if len(moved) > 1 else None)
        record = node.record()
        record.update(updates_submitted=node.updates_submitted + 1, last_train_loss=accepted.train_loss,
                      last_train_accuracy=accepted.train_accuracy)
        fed.store.add_update(round_number, node.node_id, asdict(accepted), record)
    except BaseException:  # not committed: no file of it stays in the round's folder
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    fed.state.updates[node.node_id] = accepted
    fed.state.refused.pop(node.node_id, None)
    node.updates_submitted += 1
    node.last_train_loss, node.last_train_accuracy = accepted.train_loss, accepted.train_accuracy
    fed.touch(node)
    fed.changed.notify_all()
    return accepted


def _check_control(fed, control: Path | None, reference) -> None:
    """Check the control-variate change sent with an update (when the strategy uses control variates)."""
    if not fed.strategy.uses_control_variates:
        return
    if control is None:
        raise MissingControlVariate("the scaffold strategy needs the change of the control variate (file part "
                                    "'control_variate') beside the update")
    fed.spool.check_control(control, fed.strategy.parameters_of(reference), fed.config.max_update_norm)


def submit_evaluation(fed, node: Node, round_number: int, num_samples: int, metrics: dict) -> None:
    """Store ``node``'s federated evaluation of global model ``round_number`` (``num_samples`` held-out
    examples, at most the number it registered). Raises :class:`Conflict` unless it was asked for it
    (:meth:`RoundState.add_evaluation`)."""
    with fed.changed, fed.store.transaction():
        fed.state.add_evaluation(node.node_id, round_number, min(num_samples, node.eval_samples), metrics)
        fed.store.put({"evaluations": fed.state.evaluations})
        fed.touch(node)
        fed.changed.notify_all()


def record_refusal(fed, node: Node, round_number: int, refusal: UpdateRejected) -> None:
    """Count a refused update (:class:`UpdateRejected`, by its ``error``), and log it.

    When the node is a participant of the open round that still owes an answer, the refusal is its answer: the
    round stops waiting for it and it is not asked to train again in this attempt (the same work would be
    refused again). Refusals for other rounds only count.
    """
    with fed.changed:
        fed.updates_refused_total[refusal.error] = fed.updates_refused_total.get(refusal.error, 0) + 1
        counts = round_number == fed.state.round and fed.state.owes_answer(node.node_id)
        if counts:
            fed.state.refused[node.node_id] = str(refusal)
            fed.changed.notify_all()
    log.warning("round %d: refused the update of %s (%s: %s)%s", round_number, node.name, refusal.error,
                refusal, "" if counts else "; not a pending participant")
