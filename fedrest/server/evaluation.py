"""The coordinator's evaluation of each new global model on the dataset's test split (on the CPU)."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from config import Config

Evaluator = Callable[[Mapping[str, torch.Tensor]], "tuple[float, float]"]


def make_evaluator(cfg: Config) -> Evaluator:
    """An evaluator: (state_dict) -> (mean test loss, test accuracy in [0, 1]) on ``cfg.dataset``'s test split.

    Raises
    ------
    fedrest.data.DatasetUnavailable
        If the test split cannot be loaded from any source.
    """
    from fedrest.data import load_dataset
    from model import build_model, test

    data = load_dataset(cfg.dataset, cfg.data_dir, train=False)
    net = build_model(cfg.model)

    def evaluate(state_dict):
        net.load_state_dict(state_dict, strict=True)
        return test(net, data.images, data.labels, cfg.test_batch_size)

    return evaluate
