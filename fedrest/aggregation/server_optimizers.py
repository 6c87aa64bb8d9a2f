"""Server optimizers: the global model takes a step along the round's pseudo-gradient, pure functions.

After the combining rule (:mod:`.combine`) has made the round's combined state_dict w_c from the updates, the
pseudo-gradient of round t is Delta_t = w_c - x_t (x_t: the global model the round started from). FedAvg sets
x_{t+1} = w_c, that is x_t + Delta_t. A server optimizer treats Delta_t as a (negative) gradient instead:

- ``fedavgm`` (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification", Section 3): server momentum, v_t = beta * v_{t-1} + Delta_t, x_{t+1} = x_t + eta * v_t.
  With beta = 0 and eta = 1 it is FedAvg.
- ``fedadagrad``, ``fedadam``, ``fedyogi`` (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2):
  m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t, then
  Adagrad v_t = v_{t-1} + Delta_t^2; Adam v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2;
  Yogi v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2);
  x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau), with m_{-1} = 0 and v_{-1} = tau^2 (no bias correction, as in
  the paper).

Rules: the step is taken for the model's **parameters** (the keys given as ``parameter_keys``; every floating
tensor when none are given); buffers (BatchNorm running statistics, integer counters) take the combined value as
FedAvg does, so integer buffers stay integer and a variance never turns negative. Every computation is float64;
the optimizer's state (momentum, moments) is kept in float64 and is part of the run (stored with each round's
commit, :mod:`fedrest.server.checkpoints`), so a restarted coordinator continues with the same bits. A step
never changes its inputs: it returns the new model and the new state.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Collection, Mapping

import torch

from fedrest.aggregation.fedavg import cast_like

StateDict = Mapping[str, torch.Tensor]
ServerState = "dict[str, torch.Tensor]"  # "<slot>/<key>" -> float64 tensor of the key's shape

ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")
SERVER_OPTIMIZERS = ("fedavgm", *ADAPTIVE)
# Default server learning rate eta of each optimizer (--server-learning-rate when not given).
DEFAULT_SERVER_LEARNING_RATES = {"fedavgm": 1.0, "fedadagrad": 0.1, "fedadam": 0.01, "fedyogi": 0.01}


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float64)


def _slot(state: Mapping[str, torch.Tensor], name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    value = state.get(name)
    return torch.full_like(like, fill) if value is None else value


class ServerOptimizer:
    """One of :data:`SERVER_OPTIMIZERS` with its settings (see the module docstring for the rules).

    Parameters
    ----------
    name : "fedavgm", "fedadagrad", "fedadam" or "fedyogi".
    learning_rate : eta > 0 (default: :data:`DEFAULT_SERVER_LEARNING_RATES`).
    momentum : fedavgm's beta in [0, 1).
    beta1, beta2 : the adaptive optimizers' decay rates in [0, 1) (beta2 is not used by fedadagrad).
    tau : the adaptive optimizers' epsilon tau > 0 (v_{-1} = tau^2).

    Raises
    ------
    ValueError
        For an unknown name or a setting out of range.
    """

    def __init__(self, name: str, learning_rate: float | None = None, *, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}; one of {', '.join(SERVER_OPTIMIZERS)}")
        eta = DEFAULT_SERVER_LEARNING_RATES[name] if learning_rate is None else learning_rate
        if not eta > 0:
            raise ValueError(f"the server learning rate must be > 0, got {eta}")
        for label, value in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise ValueError(f"{label} must be in [0, 1), got {value}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.name, self.learning_rate = name, float(eta)
        self.momentum, self.beta1, self.beta2, self.tau = momentum, beta1, beta2, tau

    def settings(self) -> dict:
        """The settings as a JSON-ready dict (for the status and logs)."""
        if self.name == "fedavgm":
            return {"server_learning_rate": self.learning_rate, "server_momentum": self.momentum}
        return {"server_learning_rate": self.learning_rate, "beta1": self.beta1, "beta2": self.beta2,
                "tau": self.tau}

    def step(self, reference: StateDict, combined: StateDict, state: Mapping[str, torch.Tensor],
             parameter_keys: Collection[str] | None = None) -> "tuple[OrderedDict, dict]":
        """The next global model and optimizer state from x_t (``reference``), the combined state_dict and the
        state after round t-1 ({} before the first step).

        Returns
        -------
        (state_dict in ``reference``'s dtypes and shapes, the new state: "<slot>/<key>" -> float64 tensor).
        """
        out, new_state = OrderedDict(), {}
        for key, ref in reference.items():
            is_parameter = ref.is_floating_point() and (parameter_keys is None or key in parameter_keys)
            if not is_parameter:
                out[key] = combined[key]
                continue
            x = _f64(ref)
            delta = _f64(combined[key]) - x
            step = self._direction(key, delta, state, new_state)
            out[key] = cast_like(x + self.learning_rate * step, ref)
        return out, new_state

    def _direction(self, key: str, delta: torch.Tensor, state: Mapping[str, torch.Tensor],
                   new_state: dict) -> torch.Tensor:
        """The step's direction for one tensor (before eta); puts the tensor's new slots into ``new_state``."""
        if self.name == "fedavgm":
            velocity = self.momentum * _slot(state, f"velocity/{key}", delta) + delta
            new_state[f"velocity/{key}"] = velocity
            return velocity
        m = self.beta1 * _slot(state, f"m/{key}", delta) + (1 - self.beta1) * delta
        v = _slot(state, f"v/{key}", delta, self.tau ** 2)
        square = delta * delta
        if self.name == "fedadagrad":
            v = v + square
        elif self.name == "fedadam":
            v = self.beta2 * v + (1 - self.beta2) * square
        else:  # fedyogi
            v = v - (1 - self.beta2) * square * torch.sign(v - square)
        new_state[f"m/{key}"], new_state[f"v/{key}"] = m, v
        return m / (torch.sqrt(v) + self.tau)


__all__ = ["ADAPTIVE", "DEFAULT_SERVER_LEARNING_RATES", "SERVER_OPTIMIZERS", "ServerOptimizer"]
