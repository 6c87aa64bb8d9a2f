"""Strategies: what the workers do in a round, and how their updates become the next global model.

A :class:`Strategy` is the coordinator's one entry point (:meth:`Strategy.aggregate`). It has up to three
parts, chosen with ``--strategy`` and ``--aggregation`` (:func:`make_strategy`):

1. **What workers do** (:meth:`Strategy.client_settings`, sent with every round's task): plain local SGD,
   FedProx's proximal term (``fedprox``), or SCAFFOLD's corrected gradients (``scaffold``, :mod:`.scaffold`:
   each worker keeps its control variate and uploads its change beside its model).
2. **A combining rule** (:mod:`.combine`, ``--aggregation``): the bounded sample-weighted mean (FedAvg), the
   coordinate-wise median or the trimmed mean, after the optional clipping; or, with differential privacy
   (``--dp-noise-multiplier``), DP-FedAvg's noisy mean of clipped changes (:mod:`.private_mean`).
3. **A server optimizer** (:mod:`.server_optimizers`) for ``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``:
   a step along the pseudo-gradient (combined - global) with state kept across rounds.

Server state (:attr:`Strategy.state`): name -> tensor (the optimizers' "velocity/<key>", "m/<key>",
"v/<key>"; SCAFFOLD's global control variate "c/<key>"), committed with the round (:meth:`aggregate` returns the
new state in :attr:`Aggregate.server_state` and changes nothing; the coordinator adopts it at the round's
commit, so that a round aggregated again after a crash starts from the same state and gives the same bits).

Which combinations are refused, and why: :func:`fedrest.config_rules.validate`.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch

from fedrest.aggregation.scaffold import next_global_control
from fedrest.aggregation.combine import Aggregate, ClientUpdate, Combiner, make_combiner
from fedrest.aggregation.private_mean import PrivateMean
from fedrest.aggregation.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizer
from fedrest.serialization import UpdateRejected, check_compatible

StateDict = Mapping[str, torch.Tensor]
CLIENT_SIDE = ("fedprox", "scaffold")  # strategies that change the workers' local training
CONTROL = "c/"  # SCAFFOLD's global control variate in the server state: "c/<parameter key>"
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
    private : DP-FedAvg's mechanism, which then replaces ``combiner`` (None: no differential privacy).
    """

    def __init__(self, name: str, combiner: Combiner, optimizer: ServerOptimizer | None = None, *,
                 parameter_keys: Collection[str] | None = None, proximal_mu: float = 0.0,
                 private: PrivateMean | None = None) -> None:
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.name, self.combiner, self.optimizer, self.private = name, combiner, optimizer, private
        self.parameter_keys = None if parameter_keys is None else frozenset(parameter_keys)
        self.proximal_mu = float(proximal_mu)
        self.state: dict[str, torch.Tensor] = {}  # the server state after the last committed round

    @property
    def has_state(self) -> bool:
        """True when the strategy keeps state across rounds (it is then stored with each round)."""
        return self.optimizer is not None or self.uses_control_variates

    @property
    def uses_control_variates(self) -> bool:
        """True for SCAFFOLD: every update comes with the change of its worker's control variate."""
        return self.name == "scaffold"

    def is_parameter(self, key: str, tensor: torch.Tensor) -> bool:
        """Whether ``key`` of the state_dict is a model parameter (optimizers and control variates cover those)."""
        return tensor.is_floating_point() and (self.parameter_keys is None or key in self.parameter_keys)

    def parameters_of(self, state_dict: StateDict) -> "dict[str, torch.Tensor]":
        """The parameters of ``state_dict`` (its order), for example the shapes a control variate has."""
        return {k: v for k, v in state_dict.items() if self.is_parameter(k, v)}

    def control_variate(self, reference: StateDict) -> "dict[str, torch.Tensor]":
        """SCAFFOLD's global control variate c after the last committed round, in the dtypes of the parameters
        of ``reference`` (0 before the first round), as workers download it."""
        return {k: self.state[CONTROL + k].to(v.dtype) if CONTROL + k in self.state else torch.zeros_like(v)
                for k, v in self.parameters_of(reference).items()}

    def client_settings(self) -> dict:
        """What the workers need of the strategy with each round's task (JSON-ready): ``strategy`` and, for
        fedprox, ``proximal_mu`` (scaffold's workers also fetch the global control variate: the API's
        ``/control-variate``)."""
        settings = {"strategy": self.name}
        if self.uses_control_variates:
            settings["control_variates"] = True
        if self.proximal_mu > 0:
            settings["proximal_mu"] = self.proximal_mu
        return settings

    def describe(self) -> dict:
        """The strategy's settings for the status (JSON-ready)."""
        out = {"strategy": self.name,
               "aggregation": self.private.name if self.private is not None else self.combiner.name}
        if self.optimizer is not None:
            out.update(self.optimizer.settings())
        return {**out, **{k: v for k, v in self.client_settings().items() if k not in ("strategy", "control_variates")}}

    def aggregate(self, updates: Sequence[ClientUpdate], reference: StateDict, num_clients: int = 1,
                  noise_seed: int = 0) -> Aggregate:
        """The next global model from ``updates`` (any order) and the current global model ``reference``;
        :attr:`state` is not changed (the new one is in the result's ``server_state``).

        ``num_clients``: N, the number of clients of the federation (SCAFFOLD's, and DP-FedAvg's denominator
        q * N). ``noise_seed``: DP-FedAvg's secret seed of the round's noise.

        Raises
        ------
        ValueError
            If two updates share a key.
        """
        if self.private is not None:
            result = self.private.combine(updates, reference, num_clients, noise_seed)
        else:
            result = self.combiner.combine(updates, reference)
        if result.state_dict is None:
            return result
        if self.optimizer is not None:
            result.state_dict, result.server_state = self.optimizer.step(reference, result.state_dict, self.state,
                                                                         self.parameter_keys)
        if self.uses_control_variates:
            result.server_state = self._next_control(updates, result, reference, num_clients)
        return result

    def _next_control(self, updates: Sequence[ClientUpdate], result: Aggregate, reference: StateDict,
                      num_clients: int) -> "dict[str, torch.Tensor]":
        """SCAFFOLD's c after the round, from the control-variate changes of the updates that were used (a
        change that cannot be read counts as 0 and is named in ``result.control_skipped``)."""
        by_key = {u.key: u for u in updates}
        parameters = self.parameters_of(reference)
        control = {k: self.state.get(CONTROL + k, torch.zeros_like(v))  # next_global_control: float64
                   for k, v in parameters.items()}

        def changes():
            for key in result.used:
                if by_key[key].load_control is None:
                    result.control_skipped.append((key, "no control-variate change came with it"))
                    continue
                try:
                    change = by_key[key].load_control()
                    check_compatible(change, parameters)
                except (OSError, UpdateRejected) as exc:
                    result.control_skipped.append((key, str(exc)))
                    continue
                yield change

        new = next_global_control(control, changes(), max(1, num_clients))
        return {CONTROL + k: v for k, v in new.items()}


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
                             max_share=config.max_share, spill_dir=config.temp_dir)
    optimizer = None
    if name in SERVER_OPTIMIZERS:
        optimizer = ServerOptimizer(name, config.server_learning_rate, momentum=config.server_momentum,
                                    beta1=config.beta1, beta2=config.beta2, tau=config.tau)
    if name == "scaffold" and config.aggregation != "fedavg":
        raise ValueError("scaffold averages the updates (its control variates correct the mean); it cannot "
                         f"use --aggregation {config.aggregation}")
    private = None
    if config.dp_noise_multiplier > 0:
        private = PrivateMean(config.clip_norm, config.dp_noise_multiplier, config.client_fraction)
    return Strategy(name, combiner, optimizer, parameter_keys=parameter_keys,
                    proximal_mu=config.proximal_mu if name == "fedprox" else 0.0, private=private)


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
