"""The round state machine's decisions, as pure functions of the facts (no clock, lock, disk or network).

::

    waiting_for_nodes --(>= MIN_NODES_TO_START online)--> training(r)
    training(r) --(every live participant answered, or ROUND_TIMEOUT passed)
                   and >= MIN_UPDATES updates--> aggregating(r)
    training(r) --(same, with fewer updates)--> training(r) again (a new attempt, nodes sampled anew),
                   or back off (every update was refused), or waiting_for_nodes (too few online)
    aggregating(r) --(new global model committed)--> evaluating(r) | training(r+1) | waiting_for_nodes | finished
    evaluating(r) --(every live evaluator answered, or ROUND_TIMEOUT passed)--> training(r+1) | waiting | finished

``evaluating(r)``: federated evaluation of global model r by a sample of the online nodes that hold a held-out
part of their data (``--eval-fraction``); only when there are such nodes.

:func:`decide` says what the open round does next; :func:`after_round` what follows a committed round;
:func:`sample_participants` who trains. The federation (:mod:`.federation`) gathers the facts under its lock,
calls these, and applies and stores the outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
from dataclasses import dataclass, field
from enum import Enum


class Phase(str, Enum):
    WAITING = "waiting_for_nodes"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"  # workers evaluate the new global model on their held-out data
    FINISHED = "finished"


class Action(str, Enum):
    """What the state machine does next."""

    NOTHING = "nothing"  # keep waiting (for nodes, for the back-off to end, or for updates)
    OPEN = "open"  # open the next round (from waiting_for_nodes, or after a committed round)
    AGGREGATE = "aggregate"  # close the round and aggregate what arrived
    REOPEN = "reopen"  # start the same round again with a new attempt (too few updates)
    BACK_OFF = "back_off"  # every answer was a refused update: wait ``delay`` seconds, then open it again
    WAIT_FOR_NODES = "wait_for_nodes"  # too few nodes online: go back to waiting_for_nodes
    FINISH = "finish"  # the last round is done
    CLOSE_EVALUATION = "close_evaluation"  # combine the federated evaluations that arrived, then go on


@dataclass(frozen=True)
class RoundFacts:
    """What a decision about the open round depends on. Times in seconds on one monotonic clock.

    ``participants`` are the sampled nodes of the open attempt (in their order); ``updates`` those whose
    update was accepted, ``refused`` those whose update was refused; ``online`` the node ids online now (all
    nodes, not only participants). ``refused_streak`` counts earlier consecutive attempts whose updates were
    all refused.
    """

    phase: Phase
    now: float
    participants: tuple = ()
    updates: frozenset = frozenset()
    refused: frozenset = frozenset()
    online: frozenset = frozenset()
    deadline: float = math.inf
    not_before: float = -math.inf
    refused_streak: int = 0


@dataclass(frozen=True)
class Settings:
    """The settings the decisions read (see config.py)."""

    min_nodes_to_start: int
    min_updates: int
    round_timeout: float  # seconds; also the longest back-off
    release_empty: bool = False  # DP-FedAvg: a round whose Poisson sample is empty is aggregated (noise alone)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    delay: float = 0.0  # seconds of back-off (BACK_OFF only)
    missing: tuple = ()  # participants without an update when the round closes (AGGREGATE only)
    timed_out: bool = False


def decide(facts: RoundFacts, settings: Settings) -> Decision:
    """What the state machine does now, in ``waiting_for_nodes`` or ``training``.

    In training: the round waits while a participant that is online and has not answered (accepted or
    refused update) remains and the deadline has not passed. Then it aggregates with at least MIN_UPDATES
    updates; with fewer it backs off (2, 4, 8 ... s, at most ROUND_TIMEOUT) when every answer was a refused
    update, starts a new attempt when enough nodes are online, and waits for nodes otherwise.
    """
    online = len(facts.online)
    if facts.phase == Phase.EVALUATING:
        return _decide_evaluation(facts)
    if facts.phase == Phase.WAITING:
        if facts.now < facts.not_before or online < settings.min_nodes_to_start:
            return Decision(Action.NOTHING)
        return Decision(Action.OPEN, f"{online} nodes online")
    if facts.phase != Phase.TRAINING:
        return Decision(Action.NOTHING)
    missing = [i for i in facts.participants if i not in facts.updates]
    live_missing = [i for i in missing if i not in facts.refused and i in facts.online]
    timed_out = facts.now >= facts.deadline
    if not facts.participants and settings.release_empty:
        return Decision(Action.AGGREGATE, "the Poisson sample is empty: the noise alone is released")
    if live_missing and not timed_out:
        return Decision(Action.NOTHING)
    if len(facts.updates) >= settings.min_updates:
        return Decision(Action.AGGREGATE, "deadline passed" if timed_out else "the others are offline or refused",
                        missing=tuple(missing), timed_out=timed_out)
    why = (f"ROUND_TIMEOUT={settings.round_timeout:g}s passed" if timed_out else
           "every participant still online has answered")
    if facts.refused and len(facts.refused) + len(facts.updates) == len(facts.participants):
        delay = min(settings.round_timeout, 2.0 ** (facts.refused_streak + 1))
        return Decision(Action.BACK_OFF, why, delay=delay, timed_out=timed_out)
    if online >= settings.min_nodes_to_start:
        return Decision(Action.REOPEN, why, timed_out=timed_out)
    return Decision(Action.WAIT_FOR_NODES, why, timed_out=timed_out)


def _decide_evaluation(facts: RoundFacts) -> Decision:
    """Evaluating: wait while an evaluator that is online has not answered and the deadline has not passed."""
    missing = [i for i in facts.participants if i not in facts.updates]
    timed_out = facts.now >= facts.deadline
    if any(i in facts.online for i in missing) and not timed_out:
        return Decision(Action.NOTHING)
    return Decision(Action.CLOSE_EVALUATION, "deadline passed" if timed_out else "every live evaluator answered",
                    missing=tuple(missing), timed_out=timed_out)


def federated_mean(evaluations: list[tuple[int, dict]]) -> tuple[dict, int]:
    """The sample-weighted mean of each metric over the workers' evaluations ``(num_samples, {name: value})``
    (a worker that does not report a metric is left out of that metric's mean), and the samples in all.

    For losses and accuracies computed as per-example means this is the mean over all evaluated examples; for
    metrics that are not means over examples (F1, AUC) it is the usual federated approximation.
    """
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for num_samples, metrics in evaluations:
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + num_samples * value
            weights[name] = weights.get(name, 0) + num_samples
    return {name: sums[name] / weights[name] for name in sums}, sum(n for n, _ in evaluations)


def after_round(number: int, total_rounds: int, num_online: int, min_nodes_to_start: int) -> Action:
    """What follows the commit of round ``number``: FINISH, OPEN (round number + 1) or WAIT_FOR_NODES."""
    if number >= total_rounds:
        return Action.FINISH
    if num_online >= min_nodes_to_start:
        return Action.OPEN
    return Action.WAIT_FOR_NODES


def sample_participants(online: list[str], fraction: float, minimum: int, seed: int, round_number: int,
                        attempt: int) -> list[str]:
    """Client sampling of FedAvg (McMahan et al. 2017, Algorithm 1: m = max(C * K, 1) clients per round).

    Picks max(minimum, ceil(fraction * len(online))) of ``online`` (all of them if fewer), reproducibly from
    (seed, round, attempt) and the order of ``online``: the coordinator lists them by node name
    (:meth:`NodeRegistry.online_ids`), so that two runs of the same clients sample the same clients, whatever
    random ids they were given. Returns the chosen ids in the order of ``online``.
    """
    k = min(len(online), max(minimum, math.ceil(fraction * len(online))))
    if k == len(online):
        return list(online)
    chosen = set(random.Random(f"{seed}/{round_number}/{attempt}").sample(list(online), k))
    return [i for i in online if i in chosen]


def poisson_participants(online: list[str], probability: float, key: bytes, round_number: int,
                         attempt: int) -> list[str]:
    """Poisson sampling of DP-FedAvg (McMahan et al. 2018, Algorithm 1): each of ``online`` takes part
    independently with ``probability`` q, drawn from a generator seeded with the secret ``key`` and (round,
    attempt) so that nobody without the key can tell who was drawn. May be empty. Returns ids in ``online``'s
    order."""
    digest = hmac.new(key, f"dp-sample/{round_number}/{attempt}".encode(), hashlib.sha256).digest()
    draw = random.Random(int.from_bytes(digest, "big"))
    return [i for i, u in zip(online, _uniforms(draw, online)) if u < probability]


def _uniforms(draw: random.Random, online: list[str]) -> list[float]:
    """One uniform draw per node, assigned in the nodes' sorted order (independent of ``online``'s order)."""
    by_node = {i: draw.random() for i in sorted(online)}
    return [by_node[i] for i in online]


@dataclass
class RoundRecord:
    """One completed round, as shown to monitors (wall-clock times, seconds since the epoch)."""

    round: int
    test_loss: float | None
    test_accuracy: float | None
    num_updates: int
    num_samples: int
    num_participants: int
    node_ids: list
    started_at: float  # wall clock
    finished_at: float
    duration_s: float  # round start (first attempt) to global model saved, wall clock
    aggregation_s: float  # FedAvg
    evaluation_s: float
    mean_train_loss: float | None
    max_train_seconds: float | None
    test_metrics: dict = field(default_factory=dict)  # every metric of the coordinator's evaluation, by name
    federated_metrics: dict = field(default_factory=dict)  # sample-weighted mean of the workers' evaluations
    federated_num_samples: int = 0  # held-out examples those evaluations covered
    federated_num_nodes: int = 0  # workers whose evaluation arrived
    epsilon: float | None = None  # DP-FedAvg: the epsilon spent after this round (at DP_DELTA); None: no DP
    # committed, its test metrics and the user's checkpoint not yet: the coordinator evaluates the new global model
    # while the next round trains (the run's last round is evaluated before its commit)
    evaluation_pending: bool = False
