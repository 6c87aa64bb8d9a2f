"""Strategies: what the workers do in a round, and how their updates become the next global model.

A :class:`Strategy` is the coordinator's one entry point (:meth:`Strategy.aggregate`). It has up to three
parts, chosen with ``--strategy`` and ``--aggregation`` (:func:`make_strategy`):

1. **What workers do** (:meth:`Strategy.client_settings`, sent with every round's task): plain local SGD, or
   FedProx's proximal term (``fedprox``).
2. **A combining rule** (:mod:`.combine`, ``--aggregation``): the bounded sample-weighted mean (FedAvg), the
   coordinate-wise median or the trimmed mean, after the optional clipping.
3. **A server optimizer** (:mod:`.server_optimizers`) for ``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``:
   a step along the pseudo-gradient (combined - global) with state kept across rounds.

Server state (:attr:`Strategy.state`): name -> tensor, committed with the round (:meth:`aggregate` returns the
new state in :attr:`Aggregate.server_state` and changes nothing; the coordinator adopts it at the round's
commit, so that a round aggregated again after a crash starts from the same state and gives the same bits).

Which combinations are refused, and why: :func:`fedrest.config_rules.validate`.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch

from fedrest.aggregation.combine import Aggregate, ClientUpdate, Combiner, make_combiner
from fedrest.aggregation.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizer
from fedrest.serialization import UpdateRejected, check_compatible

StateDict = Mapping[str, torch.Tensor]
CLIENT_SIDE = ("fedprox",)  # strategies that change the workers' local objective
STRATEGIES = ("fedavg", *SERVER_OPTIMIZERS, *CLIENT_SIDE)


class Strategy:
    """A strategy: client settings, a combining rule and an optional server optimizer (module docstring).

    Parameters
    ----------
    name : one of :data:`STRATEGIES` (for the status and the logs).
    combiner : the combining rule (:func:`.combine.make_combiner`).
    optimizer : the server optimizer, or None (the combined state_dict is the next global model).
    parameter_keys : the state_dict keys that are model parameters (the optimizer steps only those; None: every
        floating tensor).
    proximal_mu : FedProx's mu >= 0 sent to the workers (0 for other strategies).
    """

    def __init__(self, name: str, combiner: Combiner, optimizer: ServerOptimizer | None = None, *,
                 parameter_keys: Collection[str] | None = None, proximal_mu: float = 0.0) -> None:
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.name, self.combiner, self.optimizer = name, combiner, optimizer
        self.parameter_keys = None if parameter_keys is None else frozenset(parameter_keys)
        self.proximal_mu = float(proximal_mu)
        self.state: dict[str, torch.Tensor] = {}  # the server state after the last committed round

    @property
    def has_state(self) -> bool:
        """True when the strategy keeps state across rounds (it is then stored with each round)."""
        return self.optimizer is not None

    def client_settings(self) -> dict:
        """What the workers need of the strategy with each round's task (JSON-ready): ``strategy`` and, for
        fedprox, ``proximal_mu``."""
        settings = {"strategy": self.name}
        if self.proximal_mu > 0:
            settings["proximal_mu"] = self.proximal_mu
        return settings

    def describe(self) -> dict:
        """The strategy's settings for the status (JSON-ready)."""
        out = {"strategy": self.name, "aggregation": self.combiner.name}
        if self.optimizer is not None:
            out.update(self.optimizer.settings())
        return {**out, **{k: v for k, v in self.client_settings().items() if k != "strategy"}}

    def aggregate(self, updates: Sequence[ClientUpdate], reference: StateDict) -> Aggregate:
        """The next global model from ``updates`` (any order) and the current global model ``reference``;
        :attr:`state` is not changed (the new one is in the result's ``server_state``).

        Raises
        ------
        ValueError
            If two updates share a key.
        """
        result = self.combiner.combine(updates, reference)
        if result.state_dict is not None and self.optimizer is not None:
            result.state_dict, result.server_state = self.optimizer.step(reference, result.state_dict, self.state,
                                                                         self.parameter_keys)
        return result


def make_strategy(config, parameter_keys: Collection[str] | None = None) -> Strategy:
    """The strategy of ``config`` (a :class:`config.Config`: ``strategy``, ``aggregation`` and their settings).

    Raises
    ------
    ValueError
        For an unknown name or a bad setting.
    """
    name = config.strategy
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
    combiner = make_combiner(config.aggregation, clip_norm=config.clip_norm, trim_fraction=config.trim_fraction,
                             max_share=config.max_share)
    optimizer = None
    if name in SERVER_OPTIMIZERS:
        optimizer = ServerOptimizer(name, config.server_learning_rate, momentum=config.server_momentum,
                                    beta1=config.beta1, beta2=config.beta2, tau=config.tau)
    return Strategy(name, combiner, optimizer, parameter_keys=parameter_keys,
                    proximal_mu=config.proximal_mu if name == "fedprox" else 0.0)


def aggregate(updates: Sequence[tuple[str, StateDict, int]], reference: StateDict, rule: str = "fedavg", *,
              trim_fraction: float = 0.1, clip_norm: float = 0.0, max_share: float = 1.0) -> "dict[str, torch.Tensor]":
    """The combined state_dict of in-memory ``(key, state_dict, num_samples)`` triples by combining ``rule``: the
    same path as the coordinator's (:meth:`.combine.Combiner.combine`), for tests and scripts. ``max_share``
    bounds FedAvg's weights (the coordinator passes MAX_SHARE; 1 here: the plain sample-weighted mean).

    Raises
    ------
    UpdateRejected
        For an update that does not match ``reference`` (here nothing is skipped silently).
    ValueError
        For an unknown rule, an empty list or a repeated key.
    """
    if not updates:
        raise ValueError(f"{rule} of zero updates")
    combiner = make_combiner(rule, clip_norm=clip_norm, trim_fraction=trim_fraction, max_share=max_share)
    for _, state_dict, num_samples in updates:
        check_compatible(state_dict, reference)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise UpdateRejected(f"num_samples must be an integer >= 1, got {num_samples!r}")
    return combiner.combine([ClientUpdate.of(k, sd, n) for k, sd, n in updates], reference).state_dict
