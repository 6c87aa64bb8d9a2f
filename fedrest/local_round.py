"""A client's part of a round apart from the network: the same for a worker process (:mod:`fedrest.worker_node`)
and for a virtual client of a simulation (:mod:`fedrest.simulation.host`), so that both train and report alike.

- :func:`train_local` trains the model (which holds the global model) on the client's data with the round's
  settings, seeded by (SEED, round, client name) so that the same run gives the same model wherever it trains;
  with SCAFFOLD's control variates (Karimireddy et al. 2020, Algorithm 1) it also returns the client's next
  control variate c_i+ and the change c_i+ - c_i to upload.
- :func:`evaluate_settings` are the settings of a federated evaluation (a round's ``evaluate`` task).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from fedrest.aggregation import scaffold
from fedrest.local_control import LocalControlVariate
from fedrest.node_identity import shuffle_seed
from fedrest.serialization import UpdateRejected, bytes_to_state_dict, check_compatible, state_dict_to_bytes
from fedrest.tasks import Task, TrainSettings
from fedrest.tasks.data import LocalData
from fedrest.training import TrainResult
from fedrest.worker_policy import FatalError

log = logging.getLogger("fl.worker")


class RoundClosed(Exception):
    """The round this node is training for closed (deadline, or restarted without it)."""


@dataclass
class LocalUpdate:
    """What one client's training of one round produced.

    ``payload`` is the serialised state_dict to upload (:func:`fedrest.serialization.state_dict_to_bytes`),
    ``metadata`` the JSON part of the upload (num_samples, train_seconds, and the loss and accuracy when they are
    in the ranges the coordinator takes). With SCAFFOLD: ``new_control`` is c_i+ (by parameter name, CPU tensors)
    and ``control_change`` the serialised c_i+ - c_i; both None otherwise."""

    result: TrainResult
    metadata: dict
    payload: bytes
    new_control: dict | None = None
    control_change: bytes | None = None

    def summary(self, round_number: int, epochs: int) -> str:
        """The log line of the round: samples, seconds, speed and the training metrics."""
        result = self.result
        shown = {"loss": result.loss, "accuracy": result.accuracy, **result.metrics}
        return (f"round {round_number}: trained {result.num_samples} samples x {epochs} epochs in "
                f"{result.seconds:.1f}s ({result.num_examples_seen / max(result.seconds, 1e-9):.0f} samples/s), "
                + (", ".join(f"{k} {v:.4f}" for k, v in shown.items() if v is not None) or "no training metrics"))


def parameters(model: torch.nn.Module) -> "dict[str, torch.Tensor]":
    """The model's parameters now, copied to the CPU (by name)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def round_settings(settings: dict, round_number: int, name: str, device: torch.device) -> TrainSettings:
    """The TrainSettings of a ``train`` task's ``settings`` for the client called ``name``; seeds torch's global
    generator (dropout draws) with the same per-client seed that shuffles the batches."""
    seed = shuffle_seed(settings.get("seed", 0), round_number, name)
    torch.manual_seed(seed)
    return TrainSettings.of_round(settings, round_number, seed, device)


def train_local(task: Task, model: torch.nn.Module, data: LocalData, settings: TrainSettings,
                progress: Callable | None = None, controls=None) -> LocalUpdate:
    """Train ``model`` (holding the global model) on ``data`` with ``settings`` and serialise the result.

    ``controls``: SCAFFOLD's (c_i, c, x) (the client's control variate, the global one, the global model's
    parameters; CPU tensors by name) or None. Raises what ``task.train`` raises (:class:`fedrest.tasks.TaskError`
    for a failing task; a progress callback may raise to stop the training)."""
    if controls is not None:
        settings = dataclasses.replace(
            settings, control_correction=scaffold.gradient_correction(controls[1], controls[0]))
    result = task.train(model, data, settings, progress)
    metadata = {"num_samples": result.num_samples, "train_seconds": result.seconds}
    if result.loss is not None and 0 <= result.loss <= 1e12:  # the ranges the coordinator takes
        metadata["train_loss"] = result.loss
    if result.accuracy is not None and 0 <= result.accuracy <= 1:
        metadata["train_accuracy"] = result.accuracy
    update = LocalUpdate(result, metadata, state_dict_to_bytes(model.state_dict()))
    if controls is not None:
        local, global_, start = controls
        update.new_control, change = scaffold.next_local_control(
            local, global_, start, parameters(model), max(1, result.steps or 1), settings.learning_rate,
            settings.momentum)
        update.control_change = state_dict_to_bytes(change)
    return update


def scaffold_controls(task: Task, client, model: torch.nn.Module, round_task: dict, store: LocalControlVariate,
                      run_id: str | None):
    """SCAFFOLD's (c_i, c, x) for ``round_task`` (a ``train`` task): the client's control variate from ``store``
    (zeros for a new run), the global one downloaded with ``client`` (a :class:`fedrest.client.CoordinatorClient`
    with the node's token), and ``model``'s parameters (the global model). Raises what the download raises, and

    Raises
    ------
    RoundClosed
        When the coordinator's model moved on (the round closed: the next task is the new one).
    FatalError
        For a task with its own train(), or a control variate that does not fit the model.
    """
    if task.has_own_train:
        raise FatalError(f"the task {task.name} has its own train(), which cannot apply scaffold's "
                         "control variates; use the built-in training or another strategy")
    version, data = client.control_variate()
    if version != round_task["model_version"]:
        log.info("round %s: the global model moved on to version %d", round_task["round"], version)
        raise RoundClosed(round_task["round"])
    start = parameters(model)
    try:
        global_control = bytes_to_state_dict(data)
        check_compatible(global_control, start)
    except UpdateRejected as exc:
        raise FatalError(f"the coordinator's control variate does not fit this model: {exc}") from None
    return store.load(run_id, start), global_control, start


def evaluate_settings(task: dict, device: torch.device) -> TrainSettings:
    """The settings of an ``evaluate`` task (federated evaluation of global model ``task["round"]``)."""
    return TrainSettings(int(task["round"]), 1, 1, 0.0, 0.0, 0, device,
                         int(task.get("settings", {}).get("test_batch_size", 128)))
