"""The round driver: the one place that applies the round state machine's decisions, and its thread.

:meth:`RoundDriver.tick` takes the federation's lock, gathers the facts, asks :func:`rounds.decide` what to do,
carries it out and stores it (:class:`~fedrest.server.store.RunStore`); when a round closes it aggregates,
evaluates and writes the round's files outside the lock (:mod:`.closing`), then commits the round under the
lock. The driver has no lock of its own: it uses the federation's (``federation.changed``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict

from fedrest import failpoints
from fedrest.aggregation.private_mean import round_noise_seed
from fedrest.server import closing
from fedrest.server.rounds import (Action, Decision, Phase, RoundRecord, Settings, after_round, decide, federated_mean,
                                   sample_participants)
from fedrest.server.spool import AcceptedUpdate
from fedrest.server.store import StoreBusy

log = logging.getLogger("fl.federation")

WAITING_LOG_EVERY = 10.0  # seconds between "waiting for nodes" log lines
# Seconds between ticks when nothing changed (a change ticks at once): what waits on the clock alone (deadlines,
# nodes timing out) is seen this late at most. A tick reads every node's liveness: about 10 ms at 10,000 nodes.
IDLE_TICK_S = 0.5
AGGREGATION_RETRY_S = (5.0, 300.0)  # the wait after a failed aggregation, doubled at each failure up to the second
# What aggregating a round may raise that is not a bug: the disk (full, gone), memory, torch on odd data.
AGGREGATION_ERRORS = (OSError, MemoryError, RuntimeError, ValueError)


class RoundDriver:
    """Advances the rounds of ``federation`` (a :class:`~fedrest.server.federation.Federation`)."""

    def __init__(self, federation) -> None:
        self.fed = federation
        self._aggregating = False
        self._num_clients = 1  # SCAFFOLD's N of the round being aggregated
        self._last_wait_log = -math.inf
        self._thread: threading.Thread | None = None
        self.failures = 0  # failed aggregations of the round in AGGREGATING, in a row
        self.failure: tuple[str, float] | None = None  # (why the last one failed, monotonic time of the next try)
        self._failed_attempt: int | None = None  # a round whose failed attempt's files go after the next commit
        self._last_busy_log = -math.inf
        self._evaluated: tuple | None = None  # (round, test metrics, seconds) of the last follow-up's evaluation

    def tick(self) -> None:
        """Advance the state machine by at most one step; aggregates outside the lock when a round closes."""
        if self._owes_follow_up():  # a restart (or an error) came between a round's commit and its evaluation
            self._follow_up()
        with self.fed.changed:
            st = self.fed.state
            if st.phase == Phase.AGGREGATING:  # after a restart or a failure in the middle of aggregation: again
                if self._aggregating or (self.failure is not None and self.fed.clock() < self.failure[1]):
                    return
                log.info("round %d: aggregating the %d stored updates again%s", st.round, len(st.updates),
                         f" (attempt {self.failures + 1})" if self.failures else " after a restart")
            else:
                try:
                    if not self._apply(self.fed.clock()):
                        return
                except StoreBusy as exc:  # nothing changed: the next tick decides again
                    self._store_busy(exc)
                    return
            self._aggregating = True
            number, updates, reference = st.round, list(st.updates.values()), self.fed.global_state
            num_participants = len(st.participants)
            self._num_clients = self.fed.registry.count_clients()
            self.fed.changed.notify_all()
        try:
            self._aggregate(number, num_participants, updates, reference)
        except AGGREGATION_ERRORS as exc:
            self._aggregation_failed(number, exc)
        else:
            self.failures, self.failure = 0, None
        finally:
            self._aggregating = False
        if self._owes_follow_up():  # the round just committed: its evaluation while the next one trains
            self._follow_up()

    def _aggregation_failed(self, number: int, exc: BaseException) -> None:
        """Log why aggregating round ``number`` failed and when it is tried again (a doubling wait); the round
        stays in aggregation with its stored updates."""
        self.failures += 1
        delay = min(AGGREGATION_RETRY_S[1], AGGREGATION_RETRY_S[0] * 2 ** (self.failures - 1))
        why = f"{type(exc).__name__}: {exc}"[:500]
        hint = " (free space where TEMP_DIR and MODELS_DIR are)" if isinstance(exc, OSError) else ""
        with self.fed.changed:
            self.failure = (why, self.fed.clock() + delay)
            self.fed.changed.notify_all()
        log.error("round %d: aggregation failed (%s)%s; trying again in %.0fs (failure %d in a row)", number, why,
                  hint, delay, self.failures)

    def _store_busy(self, exc: StoreBusy) -> None:
        """Say (at most every WAITING_LOG_EVERY seconds) that the round waits for the database."""
        now = self.fed.clock()
        if now - self._last_busy_log >= WAITING_LOG_EVERY:
            self._last_busy_log = now
            log.warning("round %d: %s; the round goes on once it is free", self.fed.state.round, exc)

    def _apply(self, now: float) -> bool:
        """Decide (:func:`rounds.decide`) and carry the decision out and store it; True: aggregate now.

        Raises :class:`StoreBusy` (before anything changed) when another process holds the database."""
        st, c = self.fed.state, self.fed.config
        online = self.fed.registry.online(now)
        decision = decide(st.facts(now, online, c.round_timeout),
                          Settings(c.min_nodes_to_start, c.min_updates, c.round_timeout,
                                   release_empty=self.fed.privacy is not None))
        if decision.action == Action.NOTHING:
            self._log_waiting(now, online)
            return False
        with self.fed.store.transaction():  # its write lock first: if another process holds it, nothing changes
            aggregate = self._carry_out(decision, now)
        self._discard_failed_attempt()
        return aggregate

    def _carry_out(self, decision: Decision, now: float) -> bool:
        """Carry ``decision`` out and store it (in the caller's transaction); True: aggregate now."""
        st = self.fed.state
        if decision.action == Action.AGGREGATE:
            if decision.missing:
                log.warning("round %d: closing with %d of %d updates (%s); missing: %s", st.round, len(st.updates),
                            len(st.participants), decision.reason,
                            ", ".join(self.fed.nodes[i].name for i in decision.missing))
            st.phase = Phase.AGGREGATING
            self.fed.store.put(st.values())
            return True
        if decision.action == Action.CLOSE_EVALUATION:
            self._close_evaluation(decision, now)
            return False
        if decision.action == Action.OPEN:
            self._open_round(st.round + 1, 1, now, decision.reason)
        else:
            self._restart(decision, now)
        self.fed.store.start_round(st.values())
        self.fed.changed.notify_all()
        return False

    def _log_waiting(self, now: float, online: set[str]) -> None:
        """Every WAITING_LOG_EVERY seconds: who the run waits for (nodes to start a round, or updates)."""
        st, c = self.fed.state, self.fed.config
        if now - self._last_wait_log < WAITING_LOG_EVERY or now < st.not_before:
            return
        self._last_wait_log = now
        if st.phase == Phase.WAITING:
            log.info("waiting for nodes: %d online, %d needed to start round %d", len(online),
                     c.min_nodes_to_start, st.round + 1)
        elif st.phase == Phase.TRAINING:
            owing = [self.fed.nodes[i].name for i in st.participants if st.owes_answer(i)]
            log.info("round %d: %d of %d updates; waiting for %s (deadline in %.0fs)", st.round, len(st.updates),
                     len(st.participants), ", ".join(owing[:10]) + (f" and {len(owing) - 10} more" if len(owing) > 10
                                                                    else ""), st.deadline(c.round_timeout) - now)

    def _restart(self, decision: Decision, now: float) -> None:
        """A round that closed with fewer than MIN_UPDATES updates: back off, start again, or wait for nodes."""
        st = self.fed.state
        log.warning("round %d: %s with %d of MIN_UPDATES=%d updates; starting it again", st.round,
                    decision.reason, len(st.updates), self.fed.config.min_updates)
        if decision.action == Action.BACK_OFF:
            st.refused_streak += 1
            log.error("round %d: the coordinator refused %d of the updates (%s); check the training settings "
                      "(e.g. --learning-rate), MAX_UPDATE_NORM and MAX_UPDATE_BYTES; next attempt in %.0fs", st.round,
                      len(st.refused), "; ".join(sorted(set(st.refused.values())))[:500], decision.delay)
            st.not_before = now + decision.delay
        if decision.action == Action.REOPEN:
            self._open_round(st.round, st.attempt + 1, now, f"attempt {st.attempt + 1}")
        else:  # BACK_OFF, WAIT_FOR_NODES: the next round to open is this one again
            st.round -= 1
            self._wait_for_nodes()

    def _open_round(self, number: int, attempt: int, now: float, reason: str, announce: bool = True) -> str:
        """Open round ``number`` (attempt ``attempt``) with sampled online nodes; the caller stores it. Returns
        the "started" log line (logged here unless ``announce`` is False: then after the caller's commit)."""
        online = self.fed.registry.online_ids(now)
        self.fed.state.open(number, attempt, online, self.fed.config, now, time.time(), self.fed.privacy_key)
        if attempt > 1:  # the files of the attempt that failed: removed once their rows are gone (the commit)
            self._failed_attempt = number
        self._last_wait_log = now  # the next "waiting for" line comes WAITING_LOG_EVERY seconds from now
        participants = self.fed.state.participants
        started = (f"round {number}/{self.fed.config.communication_rounds} started ({reason}) with "
                   f"{len(participants)} of {len(online)} online nodes: "
                   + ", ".join(self.fed.nodes[i].name for i in participants[:10])
                   + (f" and {len(participants) - 10} more" if len(participants) > 10 else ""))
        if announce:
            log.info("%s", started)
        return started

    def _discard_failed_attempt(self) -> None:
        """Remove the update files of an attempt that started again, after the commit that dropped their rows."""
        if self._failed_attempt is not None:
            self.fed.spool.discard_round(self._failed_attempt)
            self._failed_attempt = None

    def _wait_for_nodes(self) -> None:
        self.fed.state.wait_for_nodes()
        self._last_wait_log = -math.inf

    def _aggregate(self, number: int, num_participants: int, updates: list[AcceptedUpdate], reference) -> None:
        """Close round ``number``: aggregate, write the resume copy, commit (the next round opens), then evaluate
        the new global model and write the user's checkpoint while that round trains (:meth:`_follow_up`). The
        run's last round is evaluated before its commit: no round follows it, and the run is finished only with
        its metrics."""
        fed = self.fed
        noise_seed = round_noise_seed(fed.privacy_key, number) if fed.privacy_key is not None else 0
        last = number >= fed.rounds_to_run
        closed = closing.close_round(number, updates, reference, fed.strategy, fed.spool,
                                     fed.evaluator if last else None, fed.config, self._num_clients, noise_seed)
        if closed is None:
            with self.fed.changed, self.fed.store.transaction():
                log.error("round %d: no stored update could be read; starting the round again", number)
                self._open_round(number, self.fed.state.attempt + 1, self.fed.clock(), "stored updates unreadable")
                self.fed.store.start_round(self.fed.state.values())
                self.fed.changed.notify_all()
            self._discard_failed_attempt()
            return
        record = closed.record(number, self.fed.state.started_wall, num_participants)
        record.evaluation_pending = not last and (fed.evaluator is not None or fed.config.save_model)
        closing.write_round_files(number, closed, record, self.fed.global_models, self.fed.config, self.fed.task,
                                  self.fed.strategy.has_state, user_checkpoint=last)
        while True:  # the round is aggregated and its files written: only its commit waits for the database
            try:
                with self.fed.changed, self.fed.store.transaction():
                    self._commit_round(number, closed, record)
                break
            except StoreBusy as exc:
                self._store_busy(exc)
                if self.fed.stopping.wait(exc.retry_after_s):
                    return  # stored as aggregating: a restart aggregates the round again
        self.fed.spool.discard_round(number)
        self.fed.global_models.keep_only(number)
        failpoints.hit("round.after_commit")

    def _owes_follow_up(self) -> bool:
        with self.fed.changed:
            history = self.fed.state.history
            return bool(history) and history[-1].evaluation_pending

    def _follow_up(self) -> None:
        """Evaluate the last committed global model and write the user's checkpoint (:func:`closing.follow_up`),
        then store the metrics in its history row; the round that follows trains meanwhile. Until the row is
        stored the record stays pending: a restart (or, after a database error, the next tick) does it again,
        with the same metrics (the evaluation is deterministic; within this process it is not repeated)."""
        fed = self.fed
        with fed.changed:
            record, state_dict = fed.state.history[-1], fed.global_state
        if self._evaluated is None or self._evaluated[0] != record.round:
            self._evaluated = (record.round, *closing.follow_up(record.round, state_dict, fed.evaluator, fed.config,
                                                                fed.task))
        _, metrics, seconds = self._evaluated
        done = dataclasses.replace(record, test_metrics=dict(metrics), test_loss=metrics.get("loss"),
                                   test_accuracy=metrics.get("accuracy"), evaluation_s=seconds,
                                   evaluation_pending=False)
        while True:
            try:
                with fed.changed, fed.store.transaction():
                    fed.store.put_history(done.round, asdict(done))
                    fed.state.history[-1] = done
                    fed.changed.notify_all()
                break
            except StoreBusy as exc:
                self._store_busy(exc)
                if fed.stopping.wait(exc.retry_after_s):
                    return  # stored as pending: a restart evaluates again
        if fed.evaluator is not None:
            closing.log_evaluated(done, fed.config.communication_rounds)

    def _commit_round(self, number: int, closed: closing.ClosedRound, record: RoundRecord) -> None:
        """Make round ``number``'s aggregate the global model and open what comes next, in one transaction."""
        st, c = self.fed.state, self.fed.config
        self.fed.global_state, self.fed.global_bytes = closed.state_dict, closed.state_bytes
        self.fed.strategy.state = closed.server_state
        st.model_version = number
        if self.fed.privacy is not None:
            record.epsilon = self.fed.privacy.epsilon(number)
        record.finished_at = time.time()
        record.duration_s = record.finished_at - st.started_wall
        st.history.append(record)
        contributors = {}
        for u in closed.used:
            node = self.fed.nodes.get(u.node_id)
            if node is not None:
                node.rounds_contributed.append(number)
                contributors[node.node_id] = node.record()
        st.updates = OrderedDict()
        st.refused_streak = 0
        now = self.fed.clock()
        evaluators = self._evaluators(number, now)
        if evaluators:
            st.start_evaluation(evaluators, now)
            started = (f"round {number}: {len(evaluators)} nodes evaluate the new global model on their held-out "
                       "data: " + ", ".join(self.fed.nodes[i].name for i in evaluators[:10])
                       + (f" and {len(evaluators) - 10} more" if len(evaluators) > 10 else ""))
        else:
            started = self._next_round(number, now)
        self.fed.store.finish_round(number, asdict(record), st.values(), contributors)
        closing.log_round_done(record, c.communication_rounds, evaluating=self.fed.evaluator is not None)
        self._announce(number, started)

    def _evaluators(self, number: int, now: float) -> list[str]:
        """The online nodes asked to evaluate global model ``number``: a fraction CLIENT_FRACTION (at least one)
        of those holding a held-out part, sampled reproducibly from (SEED, round) apart from training's draws."""
        holders = [i for i in self.fed.registry.online_ids(now) if self.fed.nodes[i].eval_samples > 0]
        c = self.fed.config
        return sample_participants(holders, c.client_fraction, 1, c.seed, number, 0) if holders else []

    def _next_round(self, number: int, now: float) -> str | None:
        """After round ``number`` (and its evaluation): finish, open the next round or wait for nodes; returns the
        "started" line to log after the caller's commit."""
        c = self.fed.config
        action = after_round(number, self.fed.rounds_to_run, len(self.fed.registry.online(now)),
                             c.min_nodes_to_start)
        if action == Action.FINISH and number < c.communication_rounds:
            log.warning("round %d: the privacy budget DP_EPSILON_BUDGET=%g is reached (epsilon %.4g; one more round "
                        "would make it %.4g); the run is finished", number, c.dp_epsilon_budget,
                        self.fed.privacy.epsilon(number), self.fed.privacy.epsilon(number + 1))
        if action == Action.FINISH:
            self.fed.state.phase, self.fed.state.participants = Phase.FINISHED, []
        elif action == Action.OPEN:
            return self._open_round(number + 1, 1, now, "previous round done", announce=False)
        else:
            self._wait_for_nodes()
        return None

    def _announce(self, number: int, started: str | None) -> None:
        if started:
            log.info("%s", started)
        if self.fed.state.phase == Phase.FINISHED:
            log.info("all %d rounds done; telling workers to stop", number)
        self.fed.changed.notify_all()

    def _close_evaluation(self, decision: Decision, now: float) -> None:
        """Combine the federated evaluations of global model ``round`` into its history record, then go on."""
        st = self.fed.state
        number, record = st.round, st.history[-1]
        results = [(e["num_samples"], e["metrics"]) for e in st.evaluations.values()]
        record.federated_metrics, record.federated_num_samples = federated_mean(results)
        record.federated_num_nodes = len(results)
        log.info("round %d: federated evaluation by %d of %d nodes on %d examples%s: %s", number, len(results),
                 len(st.evaluators), record.federated_num_samples,
                 f" ({decision.reason}; missing {len(decision.missing)})" if decision.missing else "",
                 ", ".join(f"{k} {v:.4f}" for k, v in record.federated_metrics.items()) or "no metrics")
        st.evaluators, st.evaluations = [], {}
        started = self._next_round(number, now)
        self.fed.store.finish_round(number, asdict(record), st.values(), {})
        self._announce(number, started)

    def start(self) -> None:
        """Start the driver thread that calls :meth:`tick` (every IDLE_TICK_S, or at once on a change)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._drive, name="round-driver", daemon=True)
            self._thread.start()

    def _drive(self) -> None:
        while not self.fed.stopping.is_set():
            with self.fed.changed:
                seen = self.fed.changed.generation
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - last resort: the driver thread must outlive any bug
                log.exception("the round driver failed; trying again in 1 s")
                self.fed.stopping.wait(1.0)
            with self.fed.changed:  # a change during the tick (a round's last update while the one before was
                if self.fed.changed.generation == seen:  # evaluated) is not waited for: tick again at once
                    self.fed.changed.wait(IDLE_TICK_S)

    def join(self, timeout: float) -> None:
        """Wait for the driver thread to end (after ``federation.stopping`` is set), at most ``timeout`` s."""
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

