"""Models, the model registry, and the training and evaluation loops.

The training path follows PyTorch's MNIST example (pytorch/examples, mnist/main.py):
``model.train()`` for training, ``model.eval()`` with ``torch.no_grad()`` for testing,
test loss summed with ``reduction="sum"`` and divided by the number of examples, so
that averages are exact whatever the batch size.

Data is fed from tensors held in memory (on the training device), not through a
per-image ``Dataset``/PIL pipeline: for 28x28 images this is several times faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

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
MODELS: dict[str, Callable[[], nn.Module]] = {
    "simple_cnn": SimpleCNN,
}


def build_model(name: str) -> nn.Module:
    """Build the registered model ``name`` with fresh weights.

    Raises
    ------
    KeyError
        If ``name`` is not in :data:`MODELS` (the message lists the known names).
    """
    try:
        constructor = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return constructor()


@dataclass(frozen=True)
class TrainResult:
    """Outcome of local training: counts are examples, seconds are wall-clock."""

    num_samples: int  # distinct training examples (the FedAvg weight n_k)
    num_examples_seen: int  # num_samples * epochs
    loss: float  # mean training loss over all examples seen
    accuracy: float  # fraction of examples seen classified correctly during training
    seconds: float


def iterate_minibatches(num_examples: int, batch_size: int, generator: torch.Generator,
                        device: torch.device) -> Iterator[torch.Tensor]:
    """Yield index tensors of a fresh random permutation, ``batch_size`` at a time (last one smaller)."""
    order = torch.randperm(num_examples, generator=generator).to(device)
    for start in range(0, num_examples, batch_size):
        yield order[start:start + batch_size]


def train_batch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor) -> tuple[float, int]:
    """One optimisation step on one mini-batch.

    Parameters
    ----------
    x : float32 tensor (B, 1, 28, 28) on the model's device.
    y : int64 tensor (B,) of class labels.

    Returns
    -------
    (loss_sum, num_correct) : summed (not mean) cross-entropy over the batch, and correct predictions.
    """
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        correct = int((logits.argmax(dim=1) == y).sum())
    return float(loss.detach()) * y.shape[0], correct


def local_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                batch_size: int, learning_rate: float, momentum: float = 0.0, seed: int = 0,
                progress: Callable[[int, float, int], None] | None = None) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over (images, labels) with SGD.

    Parameters
    ----------
    images : float32 tensor (N, 1, 28, 28) already on the model's device.
    labels : int64 tensor (N,) on the same device.
    seed : seeds the shuffling, so a round is reproducible for a given seed.
    progress : called after every batch with (batch size, batch mean loss, examples seen so far).

    Raises
    ------
    ValueError
        If there are no examples (FedAvg weight would be zero) or shapes disagree.
    """
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("no training examples: a node with zero samples cannot train")
    if images.shape[0] != n:
        raise ValueError(f"{images.shape[0]} images but {n} labels")
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in iterate_minibatches(n, batch_size, generator, images.device):
            batch_loss, batch_correct = train_batch(model, optimizer, images[idx], labels[idx])
            loss_sum += batch_loss
            correct += batch_correct
            seen += idx.numel()
            if progress is not None:
                progress(idx.numel(), batch_loss / idx.numel(), seen)
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    seconds = time.perf_counter() - start
    return TrainResult(num_samples=n, num_examples_seen=seen, loss=loss_sum / max(seen, 1),
                       accuracy=correct / max(seen, 1), seconds=seconds)


@torch.no_grad()
def test(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
         batch_size: int = 1000) -> tuple[float, float]:
    """Evaluate ``model`` on (images, labels).

    Returns
    -------
    (loss, accuracy) : per-example mean cross-entropy (summed with ``reduction="sum"``, then divided
        by N) and the fraction of correct predictions, both Python floats.

    Raises
    ------
    ValueError
        If there are no examples.
    """
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("no test examples")
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    return loss_sum / n, correct / n
