"""Strategies: how the accepted updates of a round become the next global model.

The coordinator calls one entry point, :meth:`Strategy.aggregate`, with the round's updates and the current
global model. Underneath, a strategy calls the pure rules of this package (:mod:`.fedavg`, :mod:`.rules`).
What every strategy shares, so that every rule gets it the same way:

- **One canonical order**: updates are taken in the order of their ``key`` (the node id), whatever order they
  arrived in, so the same run gives the same bits (float64 sums depend on the order of their terms).
- **Loading** one update at a time through :attr:`ClientUpdate.load` (the stored file is read only then); an
  update that cannot be read or does not match the global model is left out and named in
  :attr:`Aggregate.skipped`, it does not fail the round.
- **Clipping** (``clip_norm`` > 0) of every update's change before the rule (:func:`.rules.clip_update`).
- **Memory**: FedAvg streams (one model plus one update in memory); the robust rules collect the round's
  updates (they need every value of a coordinate at once).

A strategy is an object so that one with server state (momentum, Adam moments, control variates) keeps that
state on itself; the strategies here have none. The names are :data:`config.AGGREGATIONS` (one list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from config import AGGREGATIONS
from fedrest.aggregation.fedavg import FedAvgAccumulator
from fedrest.aggregation.rules import clip_update, coordinate_median, trimmed_mean
from fedrest.serialization import UpdateRejected, check_compatible

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted update of a round.

    Attributes
    ----------
    key : the node id; the canonical order of aggregation, unique within a round.
    num_samples : n_k, the examples it was trained on (int >= 1): FedAvg's weight.
    load : returns the update's state_dict (reads the stored file); may raise OSError or UpdateRejected.
    """

    key: str
    num_samples: int
    load: Callable[[], StateDict]

    @classmethod
    def of(cls, key: str, state_dict: StateDict, num_samples: int) -> "ClientUpdate":
        """An update already in memory."""
        return cls(key, num_samples, lambda: state_dict)


@dataclass
class Aggregate:
    """What :meth:`Strategy.aggregate` returns.

    ``state_dict`` is None when no update could be used. ``used`` are the keys that went into it (canonical
    order), ``skipped`` the (key, reason) of updates left out, ``clipped`` how many were clipped.
    """

    state_dict: "dict[str, torch.Tensor] | None"
    used: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    clipped: int = 0


class Strategy:
    """Base of the aggregation strategies (see the module docstring).

    Parameters
    ----------
    clip_norm : clip each update's change from the global model to this L2 norm first (0: no clipping).
    """

    name = ""

    def __init__(self, clip_norm: float = 0.0) -> None:
        if clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
        self.clip_norm = clip_norm

    def aggregate(self, updates: Sequence[ClientUpdate], reference: StateDict) -> Aggregate:
        """The next global model from ``updates`` (any order) and the current global model ``reference``.

        Raises
        ------
        ValueError
            If two updates share a key.
        """
        ordered = sorted(updates, key=lambda u: u.key)
        if len({u.key for u in ordered}) != len(ordered):
            raise ValueError("two updates of one round share a key")
        result = Aggregate(None)
        self.start(reference)
        try:
            self._add_all(ordered, reference, result)
            if result.used:
                result.state_dict = self.finish(reference)
        finally:
            self.reset()  # nothing of this round stays referenced
        return result

    def _add_all(self, ordered: Sequence[ClientUpdate], reference: StateDict, result: Aggregate) -> None:
        for update in ordered:
            try:
                state = update.load()
                check_compatible(state, reference)
            except (OSError, UpdateRejected) as exc:
                result.skipped.append((update.key, str(exc)))
                continue
            if self.clip_norm > 0:
                state, scale = clip_update(state, reference, self.clip_norm)
                result.clipped += scale < 1.0
            self.add(state, update.num_samples)
            result.used.append(update.key)
            del state

    # The rule itself: start, add each update in the canonical order, finish; reset drops what it held.

    def start(self, reference: StateDict) -> None:
        raise NotImplementedError

    def add(self, state_dict: StateDict, num_samples: int) -> None:
        raise NotImplementedError

    def finish(self, reference: StateDict) -> "dict[str, torch.Tensor]":
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class FedAvg(Strategy):
    """The sample-weighted mean (McMahan et al. 2017, Algorithm 1), streamed in float64 (:mod:`.fedavg`)."""

    name = "fedavg"

    def start(self, reference: StateDict) -> None:
        self._acc = FedAvgAccumulator(reference)

    def add(self, state_dict: StateDict, num_samples: int) -> None:
        self._acc.add(state_dict, num_samples)

    def finish(self, reference: StateDict) -> "dict[str, torch.Tensor]":
        return self._acc.result()

    def reset(self) -> None:
        self._acc = None


class _Collecting(Strategy):
    """A rule that needs every update at once (unweighted)."""

    def start(self, reference: StateDict) -> None:
        self._states: list = []

    def add(self, state_dict: StateDict, num_samples: int) -> None:
        self._states.append(state_dict)

    def reset(self) -> None:
        self._states = []


class Median(_Collecting):
    """The coordinate-wise median (Yin et al. 2018, Definition 1; :func:`.rules.coordinate_median`)."""

    name = "median"

    def finish(self, reference: StateDict) -> "dict[str, torch.Tensor]":
        return coordinate_median(self._states, reference)


class TrimmedMean(_Collecting):
    """The coordinate-wise beta-trimmed mean (Yin et al. 2018, Definition 2; :func:`.rules.trimmed_mean`)."""

    name = "trimmed_mean"

    def __init__(self, clip_norm: float = 0.0, trim_fraction: float = 0.1) -> None:
        super().__init__(clip_norm)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def finish(self, reference: StateDict) -> "dict[str, torch.Tensor]":
        return trimmed_mean(self._states, reference, self.trim_fraction)


_STRATEGIES = {cls.name: cls for cls in (FedAvg, Median, TrimmedMean)}


def make_strategy(name: str, *, clip_norm: float = 0.0, trim_fraction: float = 0.1) -> Strategy:
    """The strategy called ``name`` (one of :data:`config.AGGREGATIONS`).

    Raises
    ------
    ValueError
        For an unknown name or a bad setting.
    """
    if name not in AGGREGATIONS or name not in _STRATEGIES:
        raise ValueError(f"unknown aggregation rule {name!r}; one of {', '.join(AGGREGATIONS)}")
    if name == "trimmed_mean":
        return TrimmedMean(clip_norm, trim_fraction)
    return _STRATEGIES[name](clip_norm)


def aggregate(updates: Sequence[tuple[str, StateDict, int]], reference: StateDict, rule: str = "fedavg", *,
              trim_fraction: float = 0.1, clip_norm: float = 0.0) -> "dict[str, torch.Tensor]":
    """The new global model from in-memory ``(key, state_dict, num_samples)`` triples by ``rule``: the same
    path as the coordinator's (:meth:`Strategy.aggregate`), for tests and scripts.

    Raises
    ------
    UpdateRejected
        For an update that does not match ``reference`` (here nothing is skipped silently).
    ValueError
        For an unknown rule, an empty list or a repeated key.
    """
    if not updates:
        raise ValueError(f"{rule} of zero updates")
    strategy = make_strategy(rule, clip_norm=clip_norm, trim_fraction=trim_fraction)
    for _, state_dict, num_samples in updates:
        check_compatible(state_dict, reference)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise UpdateRejected(f"num_samples must be an integer >= 1, got {num_samples!r}")
    result = strategy.aggregate([ClientUpdate.of(k, sd, n) for k, sd, n in updates], reference)
    return result.state_dict
