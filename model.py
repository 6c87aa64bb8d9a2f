"""The built-in model (SimpleCNN), the model registry, and one SGD step (:func:`train_batch`).

The loops that call :func:`train_batch` over a node's data are in :mod:`fedrest.training`; the built-in MNIST
and Fashion-MNIST tasks (:mod:`fedrest.tasks`) train SimpleCNN.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SimpleCNN(nn.Module):
    """Two-convolution CNN for 1x28x28 images and 10 classes.

    conv(1->32, 3x3) -> BatchNorm -> ReLU -> conv(32->64, 3x3) -> BatchNorm -> ReLU
    -> max-pool 2x2 -> dropout(0.25) -> fc(9216->128) -> ReLU -> dropout(0.5) -> fc(128->10).

    Input: float32 tensor of shape (B, 1, 28, 28), normalised pixels.
    Output: float32 logits of shape (B, 10).
    The state_dict holds 1,200,074 parameters plus BatchNorm running statistics and the
    int64 0-d ``num_batches_tracked`` buffers (about 4.8 MB when serialised).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.bn2 = nn.BatchNorm2d(64)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(64 * 12 * 12, 128)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 32, 26, 26)
        x = F.relu(self.bn2(self.conv2(x)))  # (B, 64, 24, 24)
        x = F.max_pool2d(x, 2)  # (B, 64, 12, 12)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)  # (B, 9216)
        x = self.dropout2(F.relu(self.fc1(x)))  # (B, 128)
        return self.fc2(x)  # (B, 10)


# Model registry: the coordinator names the architecture in each task, workers build it here.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "simple_cnn": SimpleCNN,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with fresh weights (``kwargs``: its constructor's, e.g. num_classes).

    Raises
    ------
    KeyError
        If ``name`` is not in :data:`MODELS` (the message lists the known names).
    """
    try:
        constructor = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return constructor(**kwargs)


def train_batch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, before_step: Callable[[], None] | None = None) -> tuple[float, int]:
    """One optimisation step on one mini-batch.

    Parameters
    ----------
    x : float tensor (B, ...) of inputs on the model's device (SimpleCNN: (B, 1, 28, 28)).
    y : int64 tensor (B,) of class labels.
    before_step : called between the backward pass and the optimizer's step (a strategy's change of the
        gradients, e.g. FedProx's proximal term, :func:`fedrest.training.proximal_term`).

    Returns
    -------
    (loss_sum, num_correct) : summed (not mean) cross-entropy over the batch, and correct predictions.
    """
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    with torch.no_grad():
        correct = int((logits.argmax(dim=1) == y).sum())
    return float(loss.detach()) * y.shape[0], correct
