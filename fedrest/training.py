"""The built-in training and evaluation loops, over any :class:`~fedrest.tasks.data.LocalData`.

They follow PyTorch's MNIST example (pytorch/examples, mnist/main.py): ``model.train()`` for training, SGD over
shuffled mini-batches with cross-entropy; ``model.eval()`` with ``torch.no_grad()`` for testing, the loss summed
with ``reduction="sum"`` and divided by the number of examples, so that averages are exact whatever the batch size
(and a sample-weighted mean over workers is the mean over all their examples). With FedProx's ``proximal_mu``
the local objective gains the proximal term (:func:`proximal_term`); with SCAFFOLD every gradient is corrected
by the control variates (:func:`corrected_gradient`).
On a CPU both loops run a model with convolutions in channels-last memory layout (:func:`cpu_layout`: oneDNN's
convolutions are 1.2-1.5x faster so for SimpleCNN) and give it back in the standard layout, so its state_dict is
serialised as always. A task that defines its own ``train`` or ``evaluate`` replaces these (:mod:`fedrest.tasks`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedrest.tasks.data import LocalData, TensorData
from model import train_batch


@dataclass(frozen=True)
class TrainResult:
    """Outcome of local training: counts are examples, seconds are wall-clock."""

    num_samples: int  # distinct training examples (the FedAvg weight n_k)
    num_examples_seen: int  # num_samples * epochs
    loss: float | None  # mean training loss over all examples seen (None: a task's train did not say)
    accuracy: float | None  # fraction of examples seen classified correctly during training
    seconds: float
    metrics: dict = field(default_factory=dict)  # what a task's own train returned
    steps: int | None = None  # optimizer steps taken (SCAFFOLD's K; None: a task's own train did not say)


def proximal_term(model: nn.Module, mu: float) -> Callable[[], None]:
    """FedProx's proximal term (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", Eq. 2): the
    local objective is h(w) = F(w) + mu/2 * ||w - w_global||^2, with w_global the model's parameters now (call
    this before training, when the model holds the global model).

    Returns a function to call after each backward pass (``train_batch``'s ``before_step``): it adds the term's
    gradient mu * (w - w_global) to every parameter's gradient, in place.

    Raises
    ------
    ValueError
        If ``mu`` is not >= 0.
    """
    if not mu >= 0:
        raise ValueError(f"proximal_mu must be >= 0, got {mu}")
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]

    @torch.no_grad()
    def add_gradient() -> None:
        for param, anchor in zip(params, anchors):
            if param.grad is not None:
                param.grad.add_(param - anchor, alpha=mu)

    return add_gradient


def corrected_gradient(model: nn.Module, correction: Mapping[str, torch.Tensor]) -> Callable[[], None]:
    """SCAFFOLD's corrected local gradient (Karimireddy et al. 2020, Algorithm 1, line 10): g_i(y) - c_i + c.

    ``correction`` maps parameter names (``model.named_parameters()``) to c - c_i
    (:func:`fedrest.aggregation.scaffold.gradient_correction`). Returns a function to call after each backward
    pass (``train_batch``'s ``before_step``): it adds the correction to every parameter's gradient, in place.

    Raises
    ------
    KeyError
        If a parameter has no correction.
    """
    pairs = [(p, correction[name].to(p.device, p.dtype)) for name, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def add_correction() -> None:
        for param, value in pairs:
            if param.grad is not None:
                param.grad.add_(value)

    return add_correction


def _chain(*hooks):
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def run() -> None:
        for hook in hooks:
            hook()

    return run


def fit(model: nn.Module, data: LocalData, *, epochs: int, batch_size: int, learning_rate: float,
        momentum: float = 0.0, seed: int = 0, device: torch.device | None = None,
        progress: Callable[[int, float, int], None] | None = None, proximal_mu: float = 0.0,
        gradient_correction: Mapping[str, torch.Tensor] | None = None) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``data`` with SGD and cross-entropy.

    Parameters
    ----------
    data : examples (x, y) with int64 class labels y; read in mini-batches of ``batch_size`` on ``device``
        (default: the model's device).
    seed : seeds the shuffling, so a round is reproducible for a given seed.
    progress : called after every batch with (batch size, batch mean loss, examples seen so far); it may raise
        to stop the training (the worker does when the round closed).
    proximal_mu : FedProx's mu (0: plain SGD): the proximal term anchored at the model as it is now
        (:func:`proximal_term`). The reported loss is the cross-entropy alone.
    gradient_correction : SCAFFOLD's c - c_i by parameter name, added to every gradient (:func:`corrected_gradient`).

    Raises
    ------
    ValueError
        If there are no examples (the FedAvg weight would be zero).
    """
    n = len(data)
    if n == 0:
        raise ValueError("no training examples: a node with zero samples cannot train")
    device = device or next(model.parameters()).device
    with cpu_layout(model, device):
        return _fit(model, data, epochs, batch_size, learning_rate, momentum, seed, device, progress, proximal_mu,
                    gradient_correction)


def _fit(model, data, epochs, batch_size, learning_rate, momentum, seed, device, progress, proximal_mu,
         gradient_correction) -> TrainResult:
    n = len(data)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    before_step = _chain(proximal_term(model, proximal_mu) if proximal_mu > 0 else None,
                         None if gradient_correction is None else corrected_gradient(model, gradient_correction))
    model.train()
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in data.batches(batch_size, device, generator):
            batch_loss, batch_correct = train_batch(model, optimizer, x, y, before_step)
            loss_sum += batch_loss
            correct += batch_correct
            seen += int(y.shape[0])
            steps += 1
            if progress is not None:
                progress(int(y.shape[0]), batch_loss / int(y.shape[0]), seen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return TrainResult(num_samples=n, num_examples_seen=seen, loss=loss_sum / max(seen, 1),
                       accuracy=correct / max(seen, 1), seconds=seconds, steps=steps)


@torch.no_grad()
def evaluate(model: nn.Module, data: LocalData, batch_size: int = 128,
             device: torch.device | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``.

    Returns
    -------
    {"loss": per-example mean cross-entropy (summed with ``reduction="sum"``, then divided by N),
     "accuracy": fraction of correct predictions}, Python floats.

    Raises
    ------
    ValueError
        If there are no examples.
    """
    n = len(data)
    if n == 0:
        raise ValueError("no test examples")
    model.eval()
    device = device or next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    with cpu_layout(model, device):
        for x, y in data.batches(batch_size, device):
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    return {"loss": loss_sum / n, "accuracy": correct / n}


@contextlib.contextmanager
def cpu_layout(model: nn.Module, device: torch.device):
    """Within the block, ``model``'s 4-d parameters and buffers (convolution weights) are in channels-last memory
    layout when ``device`` is a CPU; afterwards in the standard (contiguous) one again. The tensors stay the same
    objects (an optimizer made inside the block keeps working); only their strides change, and values are equal."""
    convolutional = device.type == "cpu" and any(p.dim() == 4 for p in model.parameters())
    if convolutional:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if convolutional:
            model.to(memory_format=torch.contiguous_format)


def local_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kwargs) -> TrainResult:
    """:func:`fit` on two tensors (N, ...) and (N,) already on the model's device (keyword arguments of fit)."""
    return fit(model, TensorData(images, labels), **kwargs)


def test(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(loss, accuracy) of :func:`evaluate` on two tensors."""
    metrics = evaluate(model, TensorData(images, labels), batch_size)
    return metrics["loss"], metrics["accuracy"]


test.__test__ = False  # not a pytest test when imported into a test module
