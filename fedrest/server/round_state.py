"""The round's bookkeeping: phase, round number, attempt, participants, the updates and refusals of the open
round, the model version and the history. Lock-free; the federation changes it under its lock and stores
:meth:`RoundState.values` in the same transaction (:mod:`.store`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Collection

from config import Config
from fedrest.server.errors import Conflict
from fedrest.server.rounds import Phase, RoundFacts, RoundRecord, poisson_participants, sample_participants
from fedrest.server.spool import AcceptedUpdate
from fedrest.tasks.fingerprint import TaskIdentity


@dataclass
class RoundState:
    """Where the run is. Times: ``*_mono`` the coordinator's monotonic clock, ``*_wall`` seconds since the epoch.

    ``round`` is the round in progress (training or aggregating) or the last one finished; ``model_version`` the
    number of rounds aggregated into the global model. ``refused`` maps a participant whose update for the open
    attempt was refused to the reason. ``not_before`` is the monotonic time before which no round opens (the
    back-off after an attempt whose updates were all refused, ``refused_streak`` of them in a row).
    """

    phase: Phase = Phase.WAITING
    round: int = 0
    attempt: int = 0
    participants: list = field(default_factory=list)
    updates: "OrderedDict[str, AcceptedUpdate]" = field(default_factory=OrderedDict)
    refused: dict = field(default_factory=dict)
    started_mono: float = 0.0  # deadline base; a restart gives the open round a fresh deadline
    started_wall: float = 0.0  # when the round's first attempt opened
    model_version: int = 0
    history: list = field(default_factory=list)
    not_before: float = -math.inf
    refused_streak: int = 0
    evaluators: list = field(default_factory=list)  # nodes asked to evaluate global model ``round`` (evaluating)
    evaluations: dict = field(default_factory=dict)  # node id -> {"num_samples": n, "metrics": {...}}

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("participants", "evaluators"):  # lists for order and storage, sets for O(1) lookups
            super().__setattr__(f"_{name}_set", frozenset(value))

    @classmethod
    def from_values(cls, values: dict, updates, history, now_mono: float) -> "RoundState":
        """The state a stored run left (:meth:`values`, its updates and history rows); the open round gets a
        fresh deadline from ``now_mono``."""
        return cls(Phase(values["phase"]), values["round"], values["attempt"], list(values["participants"]),
                   OrderedDict((u.node_id, u) for u in updates), {}, now_mono, values["round_started_wall"],
                   values["model_version"], [RoundRecord(**r) for r in history],
                   evaluators=list(values.get("evaluators") or []), evaluations=dict(values.get("evaluations") or {}))

    def values(self) -> dict:
        """The run keys stored with every change of the round."""
        return {"phase": self.phase.value, "round": self.round, "attempt": self.attempt,
                "participants": self.participants, "round_started_wall": self.started_wall,
                "model_version": self.model_version, "evaluators": self.evaluators, "evaluations": self.evaluations}

    @property
    def in_round(self) -> bool:
        return self.phase in (Phase.TRAINING, Phase.AGGREGATING, Phase.EVALUATING)

    def expected_answers(self) -> list:
        """The nodes the open phase waits for: participants while training, evaluators while evaluating."""
        return {Phase.TRAINING: self.participants, Phase.EVALUATING: self.evaluators}.get(self.phase, [])

    def owes_evaluation(self, node_id: str) -> bool:
        return self.phase == Phase.EVALUATING and node_id in self._evaluators_set and node_id not in self.evaluations

    def start_evaluation(self, evaluators: list, now_mono: float) -> None:
        """Ask ``evaluators`` to evaluate global model ``round`` (it has just been committed)."""
        self.phase, self.participants, self.evaluators, self.evaluations = Phase.EVALUATING, [], evaluators, {}
        self.started_mono = now_mono

    def add_evaluation(self, node_id: str, round_number: int, num_samples: int, metrics: dict) -> None:
        """Record ``node_id``'s federated evaluation of global model ``round_number``.

        Raises :class:`Conflict` (``stale_round``, ``duplicate_evaluation``, ``not_evaluator``) unless it was asked."""
        if self.phase != Phase.EVALUATING or round_number != self.round:
            raise Conflict("stale_round", f"global model {round_number} is not being evaluated; the current round is "
                           f"{self.round} ({self.phase.value})", current_round=self.round, state=self.phase.value)
        if node_id in self.evaluations or node_id not in self._evaluators_set:
            error = "duplicate_evaluation" if node_id in self.evaluations else "not_evaluator"
            raise Conflict(error, f"node {node_id} was not asked for (another) evaluation of global model "
                           f"{round_number}", current_round=self.round, state=self.phase.value)
        self.evaluations[node_id] = {"num_samples": num_samples, "metrics": dict(metrics)}

    def deadline(self, round_timeout: float) -> float:
        return self.started_mono + round_timeout

    def owes_answer(self, node_id: str) -> bool:
        """A participant of the open round that has neither an accepted nor a refused update."""
        return (self.phase == Phase.TRAINING and node_id in self._participants_set and node_id not in self.updates
                and node_id not in self.refused)

    def facts(self, now: float, online: Collection[str], round_timeout: float) -> RoundFacts:
        """The facts :func:`rounds.decide` reads."""
        evaluating = self.phase == Phase.EVALUATING
        return RoundFacts(phase=self.phase, now=now, participants=tuple(self.expected_answers()),
                          updates=frozenset(self.evaluations if evaluating else self.updates),
                          refused=frozenset(self.refused),
                          online=frozenset(online), deadline=self.deadline(round_timeout),
                          not_before=self.not_before, refused_streak=self.refused_streak)

    def open(self, number: int, attempt: int, online: list[str], config: Config, now_mono: float,
             now_wall: float, sampling_key: bytes | None = None) -> None:
        """Open round ``number`` (attempt ``attempt``) with nodes sampled from ``online`` (with a secret
        ``sampling_key``: DP-FedAvg's Poisson sampling, which may draw none)."""
        self.round, self.attempt, self.phase = number, attempt, Phase.TRAINING
        if sampling_key is not None:
            self.participants = poisson_participants(online, config.client_fraction, sampling_key, number, attempt)
        else:
            self.participants = sample_participants(online, config.client_fraction,
                                                    config.min_sample or config.min_nodes_to_start, config.seed,
                                                    number, attempt)
        self.updates = OrderedDict()
        self.refused = {}
        self.started_mono = now_mono
        if attempt == 1:
            self.started_wall = now_wall

    def wait_for_nodes(self) -> None:
        self.phase = Phase.WAITING
        self.participants = []

    def check_can_submit(self, node_id: str, round_number: int) -> None:
        """Raises :class:`Conflict` (stale_round, duplicate_update, not_participant) unless ``node_id`` may
        submit an update for ``round_number`` now."""
        if self.phase != Phase.TRAINING or round_number != self.round:
            raise Conflict("stale_round", f"round {round_number} is not open; the current round is "
                           f"{self.round} ({self.phase.value})", current_round=self.round, state=self.phase.value)
        if node_id in self.updates:
            raise Conflict("duplicate_update", f"node {node_id} already submitted an update for round "
                           f"{round_number}", current_round=self.round, state=self.phase.value)
        if node_id not in self._participants_set:
            raise Conflict("not_participant", f"node {node_id} is not a participant of round {round_number}; "
                           "wait for the next round", current_round=self.round, state=self.phase.value)

    def drop_participant(self, node_id: str) -> AcceptedUpdate | None:
        """Take a banned node out of the round in training; returns its update if it had sent one."""
        if self.phase != Phase.TRAINING:
            return None
        dropped = self.updates.pop(node_id, None)
        if node_id in self._participants_set:
            self.participants = [i for i in self.participants if i != node_id]
            self.refused.pop(node_id, None)
        return dropped

    def task(self, node_id: str, config: Config, now_mono: float, task: TaskIdentity,
             strategy_settings: dict | None = None) -> dict:
        """The answer of ``GET /task`` for ``node_id``: stop, train (with the round's settings and
        ``strategy_settings``, :meth:`Strategy.client_settings`) or wait."""
        if self.phase == Phase.FINISHED:
            return {"action": "stop", "round": self.round, "model_version": self.model_version,
                    "reason": f"all {config.communication_rounds} rounds are done"
                    if self.model_version >= config.communication_rounds else
                    f"the run finished after {self.model_version} of {config.communication_rounds} rounds "
                    "(the privacy budget DP_EPSILON_BUDGET)"}
        if self.owes_answer(node_id):
            c = config
            return {"action": "train", "round": self.round, "model_version": self.model_version,
                    "model": task.model_name, "task": task.name, "dataset": c.dataset,
                    "deadline_s": round(self.deadline(c.round_timeout) - now_mono, 3),
                    "settings": {"local_epochs": c.local_epochs, "batch_size": c.batch_size,
                                 "learning_rate": c.learning_rate, "momentum": c.momentum, "seed": c.seed,
                                 **(strategy_settings or {})}}
        if self.owes_evaluation(node_id):
            return {"action": "evaluate", "round": self.round, "model_version": self.model_version,
                    "model": task.model_name, "task": task.name,
                    "deadline_s": round(self.deadline(config.round_timeout) - now_mono, 3),
                    "settings": {"test_batch_size": config.test_batch_size}}
        return {"action": "wait", "round": self.round, "model_version": self.model_version,
                "state": self.phase.value}
