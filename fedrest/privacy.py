"""The privacy spent by a DP-FedAvg run (:mod:`fedrest.aggregation.private_mean`), from Google's ``dp-accounting``.

Each round is one Poisson-sampled Gaussian mechanism: every client takes part with probability q (the client
fraction C), and the sum of the clipped changes gets noise of standard deviation z * S (z the noise multiplier,
S the clip norm; sensitivity S). After t rounds the run is (epsilon, delta)-differentially private at the level
of one client (all of a client's examples together), with epsilon from the accountant's Renyi-DP analysis
(``dp_accounting.rdp.RdpAccountant``, Mironov 2017; Mironov, Talwar and Zhang 2019 for the sampled Gaussian).
The accountant is the library's: nothing here computes a privacy bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting warns once per Renyi order it cannot use


@lru_cache(maxsize=4096)
def epsilon_spent(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` Poisson-sampled (probability ``sampling_rate``) Gaussian mechanisms
    of noise multiplier ``noise_multiplier``; 0 for no round, infinity without noise.

    Raises
    ------
    ValueError
        For a sampling rate outside (0, 1], a negative noise multiplier or rounds, or delta outside (0, 1).
    """
    if not 0 < sampling_rate <= 1 or noise_multiplier < 0 or rounds < 0 or not 0 < delta < 1:
        raise ValueError(f"bad privacy parameters: q={sampling_rate}, z={noise_multiplier}, rounds={rounds}, "
                         f"delta={delta}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def rounds_within_budget(sampling_rate: float, noise_multiplier: float, delta: float, budget: float,
                         max_rounds: int) -> int:
    """The most rounds t <= ``max_rounds`` with epsilon(t) <= ``budget`` (epsilon grows with t: binary search)."""
    lo, hi = 0, max_rounds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon_spent(sampling_rate, noise_multiplier, mid, delta) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class PrivacySettings:
    """A run's differential privacy: noise multiplier z, clip norm S, sampling rate q, delta, epsilon budget
    (0: none) and the rounds the budget allows (``rounds_allowed``)."""

    noise_multiplier: float
    clip_norm: float
    sampling_rate: float
    delta: float
    epsilon_budget: float
    rounds_allowed: int

    @classmethod
    def of(cls, config) -> "PrivacySettings | None":
        """The settings of a :class:`config.Config` (None when DP is off: DP_NOISE_MULTIPLIER = 0)."""
        if config.dp_noise_multiplier <= 0:
            return None
        q, z, delta = config.client_fraction, config.dp_noise_multiplier, config.dp_delta
        rounds = config.communication_rounds
        if config.dp_epsilon_budget > 0:
            rounds = rounds_within_budget(q, z, delta, config.dp_epsilon_budget, rounds)
        return cls(z, config.clip_norm, q, delta, config.dp_epsilon_budget, rounds)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` rounds."""
        return epsilon_spent(self.sampling_rate, self.noise_multiplier, rounds, self.delta)

    def describe(self, rounds_done: int) -> dict:
        """JSON-ready, for the status: the settings and the epsilon spent after ``rounds_done`` rounds."""
        return {"noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "sampling_rate": self.sampling_rate, "delta": self.delta,
                "epsilon": self.epsilon(rounds_done), "epsilon_budget": self.epsilon_budget or None,
                "rounds_allowed": self.rounds_allowed}


__all__ = ["PrivacySettings", "epsilon_spent", "rounds_within_budget"]
