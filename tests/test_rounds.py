"""The round state machine's decisions (fedrest.server.rounds), as a table: facts in, decision out. No HTTP, no
threads, no clock, no disk."""

from __future__ import annotations

import math

import pytest

from fedrest.server.rounds import (Action, Decision, Phase, RoundFacts, Settings, after_round, decide,
                                   federated_mean)

SETTINGS = Settings(min_nodes_to_start=2, min_updates=2, round_timeout=60.0)
ABC = ("a", "b", "c")


def training(now=10.0, updates=(), refused=(), online=ABC, participants=ABC, streak=0) -> RoundFacts:
    """Round open since t=0 with deadline t=60 (ROUND_TIMEOUT)."""
    return RoundFacts(Phase.TRAINING, now, participants=participants, updates=frozenset(updates),
                      refused=frozenset(refused), online=frozenset(online), deadline=60.0, refused_streak=streak)


def evaluating(now=10.0, answered=(), online=ABC) -> RoundFacts:
    """Nodes a and b asked at t=0 to evaluate the new global model; deadline t=60."""
    return RoundFacts(Phase.EVALUATING, now, participants=("a", "b"), updates=frozenset(answered),
                      online=frozenset(online), deadline=60.0)


A, D = Action, Decision
EVERY_LIVE = "every participant still online has answered"
TIMEOUT = "ROUND_TIMEOUT=60s passed"
OTHERS = "the others are offline or refused"

# (name, facts, the whole decision expected)
TABLE = [
    ("waiting, too few online", RoundFacts(Phase.WAITING, 0.0, online=frozenset("a")), D(A.NOTHING)),
    ("waiting, enough online", RoundFacts(Phase.WAITING, 0.0, online=frozenset("ab")), D(A.OPEN, "2 nodes online")),
    ("waiting, enough online but backing off",
     RoundFacts(Phase.WAITING, 5.0, online=frozenset("ab"), not_before=6.0), D(A.NOTHING)),
    ("waiting, back-off over", RoundFacts(Phase.WAITING, 6.0, online=frozenset("ab"), not_before=6.0),
     D(A.OPEN, "2 nodes online")),
    ("training, a live participant still owes its update", training(updates="ab"), D(A.NOTHING)),
    ("training, every participant answered", training(updates="abc"), D(A.AGGREGATE, OTHERS)),
    ("training, the one missing went offline", training(updates="ab", online="ab"),
     D(A.AGGREGATE, OTHERS, missing=("c",))),
    ("training, the one missing was refused", training(updates="ab", refused="c"),
     D(A.AGGREGATE, OTHERS, missing=("c",))),
    ("training, deadline passed with enough", training(now=60.0, updates="ab"),
     D(A.AGGREGATE, "deadline passed", missing=("c",), timed_out=True)),
    ("training, deadline not yet passed", training(now=59.9, updates="ab"), D(A.NOTHING)),
    ("training, deadline passed with too few, enough online", training(now=60.0, updates="a"),
     D(A.REOPEN, TIMEOUT, timed_out=True)),
    ("training, all answered but too few (MIN_UPDATES)", training(updates="a", online="ab", participants=("a",)),
     D(A.REOPEN, EVERY_LIVE)),
    ("training, too few and too few online", training(now=60.0, updates="a", online="a"),
     D(A.WAIT_FOR_NODES, TIMEOUT, timed_out=True)),
    ("training, too few answered and too few online before the deadline",
     training(updates="a", online="a", participants=("a",)), D(A.WAIT_FOR_NODES, EVERY_LIVE)),
    ("training, every answer refused", training(refused="abc"), D(A.BACK_OFF, EVERY_LIVE, delay=2.0)),
    ("training, every answer refused, third time", training(refused="abc", streak=2),
     D(A.BACK_OFF, EVERY_LIVE, delay=8.0)),
    ("training, every answer refused, back-off capped", training(refused="abc", streak=20),
     D(A.BACK_OFF, EVERY_LIVE, delay=60.0)),
    ("training, every answer refused at the deadline", training(now=60.0, refused="abc"),
     D(A.BACK_OFF, TIMEOUT, delay=2.0, timed_out=True)),
    ("training, refused and accepted but too few", training(updates="a", refused="bc"),
     D(A.BACK_OFF, EVERY_LIVE, delay=2.0)),
    ("training, one refused, one silent offline, too few: not a back-off",
     training(updates="a", refused="b", online="ab"), D(A.REOPEN, EVERY_LIVE)),
    ("training, nobody sampled (no DP): nothing to wait for, too few", training(participants=(), online="ab"),
     D(A.REOPEN, EVERY_LIVE)),
    ("aggregating: the driver is on it", RoundFacts(Phase.AGGREGATING, 0.0), D(A.NOTHING)),
    ("finished", RoundFacts(Phase.FINISHED, 0.0, online=frozenset("abc")), D(A.NOTHING)),
    ("evaluating, a live evaluator still owes its metrics", evaluating(answered="a"), D(A.NOTHING)),
    ("evaluating, every evaluator answered", evaluating(answered="ab"),
     D(A.CLOSE_EVALUATION, "every live evaluator answered")),
    ("evaluating, the one missing went offline", evaluating(answered="a", online="ac"),
     D(A.CLOSE_EVALUATION, "every live evaluator answered", missing=("b",))),
    ("evaluating, deadline passed (no MIN_UPDATES applies)", evaluating(now=60.0),
     D(A.CLOSE_EVALUATION, "deadline passed", missing=("a", "b"), timed_out=True)),
    ("evaluating, deadline not yet passed", evaluating(now=59.9), D(A.NOTHING)),
]


@pytest.mark.parametrize("name, facts, expected", TABLE, ids=[row[0] for row in TABLE])
def test_decide(name, facts, expected):
    assert decide(facts, SETTINGS) == expected


def test_dp_releases_a_round_whose_poisson_sample_is_empty_and_only_then():
    dp = Settings(min_nodes_to_start=2, min_updates=2, round_timeout=60.0, release_empty=True)
    assert decide(training(participants=(), online="ab"), dp) == Decision(
        Action.AGGREGATE, "the Poisson sample is empty: the noise alone is released")
    assert decide(training(updates="ab"), dp) == Decision(Action.NOTHING)  # c still owes its update


def test_a_closing_round_names_the_missing_participants_in_their_order():
    decision = decide(training(now=60.0, updates="b", online=ABC, participants=("c", "a", "b")),
                      Settings(2, 1, 60.0))
    assert decision.action == Action.AGGREGATE
    assert decision.missing == ("c", "a") and decision.timed_out and decision.reason == "deadline passed"


def test_an_open_decision_says_how_many_nodes_are_online():
    assert decide(RoundFacts(Phase.WAITING, 0.0, online=frozenset("abc")), SETTINGS).reason == "3 nodes online"


@pytest.mark.parametrize("number, online, action", [(5, 3, Action.FINISH), (6, 0, Action.FINISH),
                                                    (4, 2, Action.OPEN), (4, 1, Action.WAIT_FOR_NODES)])
def test_after_a_round(number, online, action):
    assert after_round(number, total_rounds=5, num_online=online, min_nodes_to_start=2) == action


def test_no_deadline_means_wait_forever_for_live_participants():
    facts = RoundFacts(Phase.TRAINING, 1e12, participants=("a",), online=frozenset("a"), deadline=math.inf)
    assert decide(facts, SETTINGS).action == Action.NOTHING


def test_federated_mean_weights_each_metric_by_the_samples_that_reported_it():
    metrics, total = federated_mean([(30, {"accuracy": 0.9, "f1": 0.5}), (10, {"accuracy": 0.5}), (0, {})])
    assert total == 40 and metrics["accuracy"] == pytest.approx((27 + 5) / 40) and metrics["f1"] == 0.5
    assert federated_mean([]) == ({}, 0)
