"""Central differential privacy of the combined update: DP-FedAvg's Gaussian mechanism (McMahan, Ramage, Talwar and
Zhang 2018, "Learning Differentially Private Recurrent Language Models", Algorithm 1 with the fixed-denominator
estimator f~_f and flat clipping).

For round t, with x_t the global model and S the clip norm:

1. each update's change Delta_k = w_k - x_t over the floating-point tensors is clipped to L2 norm S (in float64:
   a clipped change never exceeds S by a rounding error);
2. the changes are summed (uniform weights: a client's contribution is bounded by S, whatever num_samples it
   claims), Gaussian noise N(0, (z * S)^2) is added to every coordinate of the sum, and the sum is divided by the
   fixed denominator W = q * N (q the sampling probability, N the federation's clients: the expected number of
   participants);
3. x_{t+1} = x_t + (sum + noise) / W. Floating buffers are data too (BatchNorm's running statistics): they are
   clipped and noised with the parameters, and a running variance (a key ending in ``running_var``) is then
   kept >= 0 (post-processing, which costs no privacy; noise must not make a variance negative). Integer buffers
   keep x_t's value (a count of batches tells about the data).

A round in which the Poisson sample was empty releases x_t + noise / W: the mechanism runs in every round the
accountant counts. The noise comes from ``torch.Generator`` seeded with a secret per-round seed (the coordinator
derives it from a key it keeps in TEMP_DIR, :func:`round_noise_seed`), so that a round aggregated again after a
crash gives the same bits and nobody who lacks the key can predict the noise. It is the generator's Gaussian, not
a cryptographically secure sampler: the floating-point attacks on naive samplers (Mironov 2012) are not ruled out.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import OrderedDict
from typing import Mapping, Sequence

import torch

from fedrest.aggregation.combine import Aggregate, ClientUpdate, canonical_order, load_checked
from fedrest.aggregation.fedavg import cast_like

StateDict = Mapping[str, torch.Tensor]


def round_noise_seed(key: bytes, round_number: int, attempt: int = 1) -> int:
    """A 63-bit seed of round ``round_number``'s noise: HMAC-SHA256 of the round under the secret ``key``."""
    digest = hmac.new(key, f"dp-noise/{round_number}/{attempt}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class PrivateMean:
    """The Gaussian mechanism of DP-FedAvg over one round's updates (see the module docstring).

    Parameters
    ----------
    clip_norm : S > 0, the largest L2 norm of one client's change.
    noise_multiplier : z >= 0; the noise's standard deviation is z * S (0: clipping and the fixed denominator
        only, no privacy).
    sampling_rate : q in (0, 1], each client's probability of being sampled in a round.

    Raises
    ------
    ValueError
        For S <= 0, z < 0 or q outside (0, 1].
    """

    name = "dp_fedavg"

    def __init__(self, clip_norm: float, noise_multiplier: float, sampling_rate: float) -> None:
        if not clip_norm > 0:
            raise ValueError(f"differential privacy needs a clip norm > 0, got {clip_norm}")
        if not noise_multiplier >= 0:
            raise ValueError(f"the noise multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"the sampling rate must be in (0, 1], got {sampling_rate}")
        self.clip_norm, self.noise_multiplier, self.sampling_rate = clip_norm, noise_multiplier, sampling_rate

    @property
    def noise_std(self) -> float:
        """z * S, the standard deviation of the noise on each coordinate of the sum."""
        return self.noise_multiplier * self.clip_norm

    def combine(self, updates: Sequence[ClientUpdate], reference: StateDict, num_clients: int,
                noise_seed: int) -> Aggregate:
        """The next global model from ``updates`` (any order; none: the noise alone) around ``reference``.

        ``num_clients``: N >= 1 of the denominator q * N. ``noise_seed``: seeds the round's noise.
        Updates that cannot be read or do not match are left out (``skipped``); ``clipped`` counts the clipped.

        Raises
        ------
        ValueError
            If two updates share a key.
        """
        ordered = canonical_order(updates)
        floating = [k for k, v in reference.items() if v.is_floating_point()]
        total = {k: torch.zeros(reference[k].shape, dtype=torch.float64) for k in floating}
        result = Aggregate(None)
        for update in ordered:
            state = load_checked(update, reference, result)
            if state is None:
                continue
            deltas = {k: state[k].detach().to("cpu", torch.float64) - reference[k].detach().to("cpu", torch.float64)
                      for k in floating}
            norm = math.sqrt(sum(float(torch.dot(d.reshape(-1), d.reshape(-1))) for d in deltas.values()))
            scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
            result.clipped += scale < 1.0
            for k in floating:
                total[k].add_(deltas[k], alpha=scale)
            result.used.append(update.key)
            del state, deltas
        generator = torch.Generator().manual_seed(noise_seed)
        denominator = self.sampling_rate * max(1, num_clients)
        out = OrderedDict()
        for key, ref in reference.items():
            if key not in total:
                out[key] = ref.detach().cpu().clone()
                continue
            noise = torch.randn(ref.shape, generator=generator, dtype=torch.float64) * self.noise_std
            value = ref.detach().to("cpu", torch.float64) + (total[key] + noise) / denominator
            out[key] = cast_like(value.clamp_(min=0.0) if key.endswith("running_var") else value, ref)
        result.state_dict = out
        return result


__all__ = ["PrivateMean", "round_noise_seed"]
