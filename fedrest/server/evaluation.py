"""The coordinator's evaluation of each new global model on the task's test data (on the CPU)."""

from __future__ import annotations

from typing import Callable, Mapping, Union

import torch

from config import Config
from fedrest.tasks import Task, TrainSettings
from fedrest.tasks.node_data import coordinator_test_data

# (state_dict) -> {metric name: value}; a (loss, accuracy) pair is read as {"loss": ..., "accuracy": ...}
Evaluator = Callable[[Mapping[str, torch.Tensor]], Union[dict, "tuple[float, float]"]]


def make_evaluator(task: Task, cfg: Config) -> Evaluator:
    """An evaluator: (state_dict) -> the task's metrics (default: mean test ``loss`` and ``accuracy`` in [0, 1])
    of that global model on the task's test data, loaded here once.

    Raises
    ------
    fedrest.tasks.TaskError
        If the test data cannot be loaded (the message says what was tried, or where the task failed).
    """
    data = coordinator_test_data(task, cfg)
    net = task.build_model()
    settings = TrainSettings(round=0, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                             learning_rate=cfg.learning_rate, momentum=cfg.momentum, seed=cfg.seed,
                             device=torch.device("cpu"), test_batch_size=cfg.test_batch_size)

    def evaluate(state_dict):
        net.load_state_dict(state_dict, strict=True)
        return task.evaluate(net, data, settings)

    return evaluate


def metrics_of(result) -> dict[str, float]:
    """An evaluator's result as a dict of metric names to floats (a (loss, accuracy) pair is named so)."""
    if isinstance(result, tuple):
        loss, accuracy = result
        return {"loss": float(loss), "accuracy": float(accuracy)}
    return {str(k): float(v) for k, v in dict(result).items()}
