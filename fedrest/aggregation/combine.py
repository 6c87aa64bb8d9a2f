"""Combining rules: how the accepted updates of a round become one state_dict (FedAvg, median, trimmed mean).

A :class:`Combiner` is the first half of every strategy (:mod:`.strategy`); a server optimizer may take the
combined state_dict as its pseudo-gradient's end point afterwards. What every combining rule shares, so that
each gets it the same way:

- **One canonical order**: updates are taken in the order of their ``key`` (the node id), whatever order they
  arrived in, so the same run gives the same bits (float64 sums depend on the order of their terms).
- **Loading** one update at a time through :attr:`ClientUpdate.load` (the stored file is read only then); an
  update that cannot be read or does not match the global model is left out and named in
  :attr:`Aggregate.skipped`, it does not fail the round.
- **Clipping** (``clip_norm`` > 0) of every update's change before the rule (:func:`.rules.clip_update`).
- **Bounded weights** (FedAvg): no update takes more than ``max_share`` of the round (:mod:`.weights`), computed
  over the round's updates before they are read.
- **Memory**: FedAvg streams (one model plus one update in memory); the robust rules, which need every value of a
  coordinate at once, append each update to a spill file and combine it in blocks of coordinates
  (:mod:`.blocks`: O(updates x block) memory, results bit-identical to the whole-tensor rules of :mod:`.rules`).

The names are :data:`config.AGGREGATIONS` (one list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from fedrest.aggregation.fedavg import FedAvgAccumulator
from fedrest.aggregation.blocks import BLOCK_BYTES, SpilledUpdates, blockwise
from fedrest.aggregation.rules import clip_update, median_of_sorted, trim_count, trimmed_mean_of_sorted
from fedrest.aggregation.weights import capped_weights
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
    load_control : SCAFFOLD: returns the change of the worker's control variate (None: the update has none).
    """

    key: str
    num_samples: int
    load: Callable[[], StateDict]
    load_control: Callable[[], StateDict] | None = None

    @classmethod
    def of(cls, key: str, state_dict: StateDict, num_samples: int,
           control: StateDict | None = None) -> "ClientUpdate":
        """An update already in memory (with SCAFFOLD's ``control``-variate change, if any)."""
        return cls(key, num_samples, lambda: state_dict, None if control is None else (lambda: control))


@dataclass
class Aggregate:
    """What :meth:`Combiner.combine` and :meth:`.strategy.Strategy.aggregate` return.

    ``state_dict`` is None when no update could be used. ``used`` are the keys that went into it (canonical
    order), ``skipped`` the (key, reason) of updates left out, ``clipped`` how many were clipped, ``capped`` the
    keys whose FedAvg weight :mod:`.weights` lowered. ``server_state`` is the strategy's state after this round
    (name -> tensor; {} for a strategy without one), to be adopted when the round commits.
    ``control_skipped``: SCAFFOLD's (key, reason) of used updates whose control-variate change was unreadable.
    """

    state_dict: "dict[str, torch.Tensor] | None"
    used: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    clipped: int = 0
    capped: list = field(default_factory=list)
    server_state: dict = field(default_factory=dict)
    control_skipped: list = field(default_factory=list)


def canonical_order(updates: Sequence[ClientUpdate]) -> list:
    """``updates`` sorted by key (the order every rule adds them in). Raises ValueError for a repeated key."""
    ordered = sorted(updates, key=lambda u: u.key)
    if len({u.key for u in ordered}) != len(ordered):
        raise ValueError("two updates of one round share a key")
    return ordered


def load_checked(update: ClientUpdate, reference: StateDict, result: Aggregate) -> StateDict | None:
    """The update's state_dict if it can be read and matches ``reference``; else None, named in
    ``result.skipped``."""
    try:
        state = update.load()
        check_compatible(state, reference)
    except (OSError, UpdateRejected) as exc:
        result.skipped.append((update.key, str(exc)))
        return None
    return state


class Combiner:
    """Base of the combining rules (see the module docstring).

    Parameters
    ----------
    clip_norm : clip each update's change from the global model to this L2 norm first (0: no clipping).
    max_share : the largest share of a round's weight one update may take, in (0, 1] (1: FedAvg's n_k as
        they are); only weighted rules use it.
    """

    name = ""
    weighted = False

    def __init__(self, clip_norm: float = 0.0, max_share: float = 1.0) -> None:
        if clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
        if not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        self.clip_norm = clip_norm
        self.max_share = max_share

    def combine(self, updates: Sequence[ClientUpdate], reference: StateDict) -> Aggregate:
        """The next global model from ``updates`` (any order) and the current global model ``reference``.

        Raises
        ------
        ValueError
            If two updates share a key.
        """
        ordered = canonical_order(updates)
        result = Aggregate(None)
        weights = [float(u.num_samples) for u in ordered]
        if self.weighted and ordered:
            capped = capped_weights(weights, self.max_share)
            result.capped = [u.key for u, w, c in zip(ordered, weights, capped) if c < w]
            weights = capped
        self.start(reference)
        try:
            self._add_all(ordered, weights, reference, result)
            if result.used:
                result.state_dict = self.finish(reference)
        finally:
            self.reset()  # nothing of this round stays referenced
        return result

    def _add_all(self, ordered: Sequence[ClientUpdate], weights: Sequence[float], reference: StateDict,
                 result: Aggregate) -> None:
        for update, weight in zip(ordered, weights):
            state = load_checked(update, reference, result)
            if state is None:
                continue
            if self.clip_norm > 0:
                state, scale = clip_update(state, reference, self.clip_norm)
                result.clipped += scale < 1.0
            self.add(state, weight)
            result.used.append(update.key)
            del state

    # The rule itself: start, add each update in the canonical order, finish; reset drops what it held.

    def start(self, reference: StateDict) -> None:
        raise NotImplementedError

    def add(self, state_dict: StateDict, weight: float) -> None:
        raise NotImplementedError

    def finish(self, reference: StateDict) -> "dict[str, torch.Tensor]":
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class FedAvg(Combiner):
    """The sample-weighted mean (McMahan et al. 2017, Algorithm 1), streamed in float64 (:mod:`.fedavg`), with
    each weight bounded by ``max_share`` (:mod:`.weights`)."""

    name = "fedavg"
    weighted = True

    def start(self, reference: StateDict) -> None:
        self._acc = FedAvgAccumulator(reference)

    def add(self, state_dict: StateDict, weight: float) -> None:
        self._acc.add_weighted(state_dict, weight)

    def finish(self, reference: StateDict) -> "dict[str, torch.Tensor]":
        return self._acc.result()

    def reset(self) -> None:
        self._acc = None


class _Collecting(Combiner):
    """A rule that needs every update at once (unweighted): the updates are spilled to a temporary file in
    ``spill_dir`` (None: the system's temporary folder) and combined block by block, ``block_bytes`` at a time
    (:mod:`.blocks`)."""

    spill_dir: str | None = None
    block_bytes: int = BLOCK_BYTES
    _spilled: SpilledUpdates | None = None

    def start(self, reference: StateDict) -> None:
        self._spilled = SpilledUpdates(reference, self.spill_dir)

    def add(self, state_dict: StateDict, weight: float) -> None:
        self._spilled.append(state_dict)

    def finish(self, reference: StateDict) -> "dict[str, torch.Tensor]":
        return blockwise(self._spilled, reference, self.combine_sorted, self.block_bytes)

    def combine_sorted(self, values: torch.Tensor) -> torch.Tensor:
        """(m, b) float64 sorted along the updates -> (b,) float64, the rule of each coordinate."""
        raise NotImplementedError

    def reset(self) -> None:
        if self._spilled is not None:
            self._spilled.close()
            self._spilled = None


class Median(_Collecting):
    """The coordinate-wise median (Yin et al. 2018, Definition 1; :func:`.rules.median_of_sorted`)."""

    name = "median"

    def combine_sorted(self, values: torch.Tensor) -> torch.Tensor:
        return median_of_sorted(values)


class TrimmedMean(_Collecting):
    """The coordinate-wise beta-trimmed mean (Yin et al. 2018, Definition 2; :func:`.rules.trimmed_mean_of_sorted`)."""

    name = "trimmed_mean"

    def __init__(self, clip_norm: float = 0.0, trim_fraction: float = 0.1, max_share: float = 1.0) -> None:
        super().__init__(clip_norm, max_share)
        trim_count(trim_fraction, 1)  # raises ValueError outside [0, 0.5)
        self.trim_fraction = trim_fraction

    def combine_sorted(self, values: torch.Tensor) -> torch.Tensor:
        return trimmed_mean_of_sorted(values, trim_count(self.trim_fraction, values.shape[0]))


COMBINERS = {cls.name: cls for cls in (FedAvg, Median, TrimmedMean)}


def make_combiner(name: str, *, clip_norm: float = 0.0, trim_fraction: float = 0.1,
                  max_share: float = 1.0, spill_dir: str | None = None) -> Combiner:
    """The combining rule called ``name`` (one of :data:`config.AGGREGATIONS`); the robust rules spill the
    round's updates into ``spill_dir`` (None: the system's temporary folder).

    Raises
    ------
    ValueError
        For an unknown name or a bad setting.
    """
    if name not in COMBINERS:
        raise ValueError(f"unknown aggregation rule {name!r}; one of {', '.join(COMBINERS)}")
    if name == "trimmed_mean":
        combiner = TrimmedMean(clip_norm, trim_fraction, max_share)
    else:
        combiner = COMBINERS[name](clip_norm, max_share)
    if isinstance(combiner, _Collecting):
        combiner.spill_dir = spill_dir
    return combiner
