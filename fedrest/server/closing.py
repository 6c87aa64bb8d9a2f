"""Closing a round, outside the federation's lock: aggregate the stored updates, evaluate, write the files.

:func:`close_round` runs the strategy over the round's stored updates (in the canonical order, loading one
file at a time); :func:`write_round_files` writes the new global model's resume copy before the federation
commits the round (:mod:`.checkpoints` says why). The coordinator's evaluation of the new global model and the
user's checkpoint (which carries the test metrics) come after the commit, while the next round trains
(:func:`follow_up`); only the run's last round, which no round follows, is evaluated before its commit.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from config import Config
from fedrest import failpoints
from fedrest.aggregation import ClientUpdate, Strategy
from fedrest.serialization import state_dict_to_bytes
from fedrest.server.checkpoints import GlobalModels, save_checkpoint
from fedrest.server.evaluation import Evaluator, metrics_of
from fedrest.server.rounds import RoundRecord
from fedrest.server.spool import AcceptedUpdate, UpdateSpool
from fedrest.tasks.fingerprint import TaskIdentity

log = logging.getLogger("fl.federation")


@dataclass
class ClosedRound:
    """The outcome of :func:`close_round` (times in seconds)."""

    state_dict: "dict[str, torch.Tensor]"
    state_bytes: bytes  # the serialised state_dict, as workers download it
    used: list  # the AcceptedUpdates aggregated, canonical order
    aggregation_s: float
    evaluation_s: float
    test_metrics: dict  # name -> value of the coordinator's evaluation ({} when there is none)
    server_state: dict  # the strategy's state after this round (adopted at the commit; {}: none)

    @property
    def test_loss(self) -> float | None:
        return self.test_metrics.get("loss")

    @property
    def test_accuracy(self) -> float | None:
        return self.test_metrics.get("accuracy")

    def record(self, number: int, started_at: float, num_participants: int) -> RoundRecord:
        """The round's history record; ``finished_at`` and ``duration_s`` are set at the commit."""
        used = self.used
        return RoundRecord(
            round=number, test_loss=self.test_loss, test_accuracy=self.test_accuracy, num_updates=len(used),
            num_samples=sum(u.num_samples for u in used), num_participants=num_participants,
            node_ids=[u.node_id for u in used], started_at=started_at, finished_at=0.0, duration_s=0.0,
            aggregation_s=self.aggregation_s, evaluation_s=self.evaluation_s,
            mean_train_loss=_mean(u.train_loss for u in used),
            max_train_seconds=max((u.train_seconds for u in used if u.train_seconds is not None), default=None),
            test_metrics=dict(self.test_metrics))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def close_round(number: int, updates: list[AcceptedUpdate], reference: Mapping[str, torch.Tensor],
                strategy: Strategy, spool: UpdateSpool, evaluator: Evaluator | None, config: Config,
                num_clients: int = 1, noise_seed: int = 0) -> ClosedRound | None:
    """Aggregate round ``number``'s stored ``updates`` (files in ``spool``) onto ``reference`` and, with an
    ``evaluator``, evaluate the result (pass None to evaluate later: :func:`follow_up`); ``num_clients`` is N
    (the federation's nodes: SCAFFOLD's, DP-FedAvg's), ``noise_seed`` seeds DP-FedAvg's noise.

    An update whose file cannot be read is left out (logged). Returns None when none could be read.
    """
    t0 = time.perf_counter()
    by_node = {u.node_id: u for u in updates}
    clients = [ClientUpdate(u.node_id, u.num_samples, lambda u=u: spool.load(u),
                            (lambda u=u: spool.load_control(u)) if u.control_path else None) for u in updates]
    result = strategy.aggregate(clients, reference, num_clients, noise_seed)
    for node_id, reason in result.skipped:  # the stored file was lost or damaged on disk
        log.error("round %d: cannot read the stored update of %s (%s); leaving it out", number, node_id, reason)
    for node_id, reason in result.control_skipped:
        log.error("round %d: cannot read the control-variate change of %s (%s); counted as 0", number, node_id,
                  reason)
    if result.state_dict is None:
        return None
    if strategy.private is not None:
        private = strategy.private
        log.info("round %d: DP-FedAvg of %d clipped changes; the noise adds std %.3g to every coordinate of the "
                 "new model (z*S/(q*N) with N=%d nodes: more nodes, less noise)", number, len(result.used),
                 private.noise_std / (private.sampling_rate * max(1, num_clients)), num_clients)
    elif result.clipped:
        log.info("round %d: clipped %d of %d updates to CLIP_NORM=%g", number, result.clipped,
                 len(result.used), config.clip_norm)
    if result.capped:
        log.info("round %d: lowered the FedAvg weight of %s to MAX_SHARE=%g of the round", number,
                    ", ".join(result.capped), config.max_share)
    t1 = time.perf_counter()
    test_metrics = _evaluate(number, result.state_dict, evaluator)
    t2 = time.perf_counter() if evaluator is not None else t1  # 0 s: no evaluation here (none, or later)
    return ClosedRound(result.state_dict, state_dict_to_bytes(result.state_dict),
                       [by_node[k] for k in result.used], t1 - t0, t2 - t1, test_metrics, result.server_state)


def _evaluate(number: int, state_dict, evaluator: Evaluator | None) -> dict[str, float]:
    """The evaluator's metrics of the new global model; non-finite values are left out (logged)."""
    if evaluator is None:
        return {}
    try:
        metrics = metrics_of(evaluator(state_dict))
    except Exception:  # noqa: BLE001 - a pluggable evaluator (the user's task) must not stop the run; logged
        log.exception("round %d: evaluation failed; the round is recorded without test metrics", number)
        return {}
    diverged = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if diverged:
        log.warning("round %d: the global model's test %s (the model diverged); recorded as unknown", number,
                    ", ".join(f"{k} is {v}" for k, v in diverged.items()))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def write_round_files(number: int, closed: ClosedRound, record: RoundRecord, global_models: GlobalModels,
                      config: Config, task: TaskIdentity, has_state: bool = False,
                      user_checkpoint: bool = True) -> None:
    """Write the server state (when the strategy ``has_state``) and the resume copy of the new global model
    (version ``number``), then (``user_checkpoint``) the user's checkpoint, whose failure is logged, not raised.
    Raises OSError when the server state or the resume copy cannot be written."""
    if has_state:
        global_models.write_state(number, closed.server_state)
    global_models.write(number, closed.state_bytes)
    failpoints.hit("aggregate.before_checkpoint")
    if user_checkpoint:
        _save_user_checkpoint(number, closed.state_dict, record.test_metrics, config, task)
    failpoints.hit("aggregate.before_commit")


def _save_user_checkpoint(number: int, state_dict, test_metrics: dict, config: Config, task: TaskIdentity) -> None:
    """MODELS_DIR/global_model_round_<number>.pt and global_model.pt (with SAVE_MODEL); a failure is logged."""
    if not config.save_model:
        return
    try:
        save_checkpoint(config.models_dir, number, state_dict, task, test_metrics, config.public_dict())
    except OSError as exc:
        log.error("round %d: could not save the global model in %s: %s", number, config.models_dir, exc)


def follow_up(number: int, state_dict: Mapping[str, torch.Tensor], evaluator: Evaluator | None, config: Config,
              task: TaskIdentity) -> tuple[dict[str, float], float]:
    """After round ``number``'s commit: evaluate its global model ``state_dict`` (with an ``evaluator``) and write
    the user's checkpoint with the metrics. Returns (the test metrics, {} without an evaluator; the evaluation's
    seconds). Repeating it (after a restart) writes the same files: the evaluation is deterministic."""
    started = time.perf_counter()
    metrics = _evaluate(number, state_dict, evaluator)
    seconds = time.perf_counter() - started if evaluator is not None else 0.0
    failpoints.hit("follow_up.before_checkpoint")
    _save_user_checkpoint(number, state_dict, metrics, config, task)
    failpoints.hit("follow_up.before_store")
    return metrics, seconds


def log_round_done(record: RoundRecord, total_rounds: int, evaluating: bool = True) -> None:
    """The round's "done" line: its test metrics, or (``evaluating`` after the commit) that they come later."""
    tested = "evaluating the new global model" if record.evaluation_pending and evaluating else _tested(record)
    log.info("round %d/%d done: %d update%s, %d samples, %s, %.1fs", record.round, total_rounds, record.num_updates,
             "" if record.num_updates == 1 else "s", record.num_samples, tested, record.duration_s)


def log_evaluated(record: RoundRecord, total_rounds: int) -> None:
    """The line that gives a round's test metrics after its commit (:func:`follow_up`)."""
    log.info("round %d/%d global model: %s (evaluated in %.2fs)", record.round, total_rounds, _tested(record),
             record.evaluation_s)


def _tested(record: RoundRecord) -> str:
    acc_text = "n/a" if record.test_accuracy is None else f"{record.test_accuracy:.4f}"
    loss_text = "n/a" if record.test_loss is None else f"{record.test_loss:.4f}"
    return f"test accuracy {acc_text}, test loss {loss_text}"
