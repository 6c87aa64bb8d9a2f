"""A loaded task: the user's functions, with the built-in loops for what they leave out (manual: :mod:`fedrest.tasks`).
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fedrest import training
from fedrest.tasks.data import BatchTransform, LocalData, as_local_data, default_data_workers
from fedrest.tasks.fingerprint import make_fingerprint

ROLES = ("coordinator", "worker")


class TaskError(Exception):
    """A task cannot be loaded or used as asked (the message says why, and where in the task file)."""


@dataclass(frozen=True)
class TaskContext:
    """Where a task's data loaders run: ``role`` "coordinator" or "worker", ``data_dir`` (--data-dir), ``seed``
    (--seed). ``config`` is the whole typed configuration (:class:`config.Config`), read-only."""

    role: str
    data_dir: str
    seed: int
    config: Any = None


@dataclass(frozen=True)
class TrainSettings:
    """The round's training settings, as the coordinator sent them (``seed``: this node's for this round).

    ``strategy`` is the run's strategy; with ``fedprox``, ``proximal_mu`` > 0 is the coefficient of the proximal
    term that the local objective adds (the built-in loop does; a task's own ``train`` must add it itself, for
    example with :func:`fedrest.training.proximal_term`). With ``scaffold``, ``control_correction`` (c - c_i by
    parameter name, tensors) is added to every gradient by the built-in loop; a task with its own ``train``
    cannot run scaffold (the coordinator refuses to start).
    """

    round: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    seed: int
    device: torch.device
    test_batch_size: int = 128
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    control_correction: Any = None  # scaffold: c - c_i by parameter name (the built-in loop adds it to gradients)

    @classmethod
    def of_round(cls, settings: dict, round_number: int, seed: int, device: torch.device) -> "TrainSettings":
        """The settings of a round's ``train`` task (its ``settings`` object) for this node (``seed``)."""
        return cls(round_number, settings["local_epochs"], settings["batch_size"], settings["learning_rate"],
                   settings.get("momentum", 0.0), seed, device, strategy=str(settings.get("strategy", "fedavg")),
                   proximal_mu=float(settings.get("proximal_mu", 0.0)))


def where_in(exc: BaseException, source: str) -> str:
    """``Type: message`` of ``exc``, with the line of ``source`` (a task file) it came from when there is one."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if source and f.filename == source]
    at = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{at}"


class Task:
    """One task, ready to use (see :mod:`fedrest.tasks` for what each function does).

    Parameters
    ----------
    name : what the coordinator and the workers must agree on.
    source : where it came from (a file path, a module, "built-in"), for messages.
    build_model, load_train_data, load_test_data, train, evaluate : the task's functions (None: not defined).
    model_name : the architecture's name shown in the status (default: the built model's class name).
    details : settings that must be equal on every node (image size, normalisation...); part of the fingerprint.
    transform : applied to every batch's x on the device (the built-in image pipeline normalises there).
    """

    def __init__(self, name: str, source: str, build_model: Callable[[], nn.Module], *,
                 load_train_data: Callable | None = None, load_test_data: Callable | None = None,
                 train: Callable | None = None, evaluate: Callable | None = None, model_name: str | None = None,
                 details: dict | None = None, transform: BatchTransform | None = None) -> None:
        self.name, self.source = name, source
        self._build_model, self._load_train, self._load_test = build_model, load_train_data, load_test_data
        self._train, self._evaluate = train, evaluate
        self.model_name = model_name  # None: the class name of the model build_model returns
        self.details = dict(details or {})
        self.transform = transform
        self.classes: list[str] | None = None  # known once data is loaded (or set by the task)
        self.strategy_factory: Callable | None = None  # the task's strategy(config, parameter_keys), if any

    @property
    def has_own_train(self) -> bool:
        return self._train is not None

    def _call(self, what: str, fn: Callable, *args):
        try:
            return fn(*args)
        except TaskError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: any failure becomes one clear line
            raise TaskError(f"task {self.name}: {what} failed: {where_in(exc, self.source)}") from exc

    def make_strategy(self, config, parameter_keys):
        """The task's own strategy object (its ``strategy(config, parameter_keys)``), or None when it defines
        none (the coordinator then builds one from ``--strategy``).

        Raises
        ------
        TaskError
            When ``strategy()`` fails or returns an object without ``aggregate``, ``state`` and the rest of
            :class:`fedrest.aggregation.Strategy`'s interface.
        """
        if self.strategy_factory is None:
            return None
        strategy = self._call("strategy(config, parameter_keys)", self.strategy_factory, config, parameter_keys)
        if strategy is None:
            raise TaskError(f"task {self.name}: strategy(config, parameter_keys) returned None; return a "
                            "fedrest.aggregation.Strategy (or leave strategy out to use --strategy)")
        missing = [a for a in ("aggregate", "state", "has_state", "uses_control_variates", "client_settings",
                               "describe", "private", "name") if not hasattr(strategy, a)]
        if missing:
            raise TaskError(f"task {self.name}: strategy(config, parameter_keys) returned an object without "
                            f"{', '.join(missing)}; subclass fedrest.aggregation.Strategy")
        return strategy

    def build_model(self) -> nn.Module:
        """A fresh model. Raises :class:`TaskError` when ``build_model`` fails or returns no ``nn.Module``."""
        model = self._call("build_model()", self._build_model)
        if not isinstance(model, nn.Module):
            raise TaskError(f"task {self.name}: build_model() must return a torch.nn.Module, not "
                            f"{type(model).__name__}")
        self.model_name = self.model_name or type(model).__name__
        return model

    def load_data(self, ctx: TaskContext, split: str) -> LocalData:
        """This node's ``split`` ("train" or "test") as :class:`LocalData`; sets :attr:`classes` if it knows them.

        Raises
        ------
        TaskError
            When the task defines no loader for ``split`` (naming what to do), or it fails or returns bad data.
        """
        fn = self._load_train if split == "train" else self._load_test
        if fn is None:
            fix = ("the coordinator evaluates every global model on it; define it, or start the coordinator "
                   "with --no-eval" if split == "test" else "every worker trains on it")
            raise TaskError(f"task {self.name} ({self.source}) defines no load_{split}_data(ctx): {fix}")
        obj = self._call(f"load_{split}_data(ctx)", fn, ctx)
        cfg = ctx.config
        try:
            data = as_local_data(obj, where=f"task {self.name}: load_{split}_data(ctx)",
                                 num_workers=_data_workers(cfg), cache_bytes=getattr(cfg, "cache_bytes", 0),
                                 transform=self.transform)
        except (TypeError, ValueError) as exc:
            raise TaskError(str(exc)) from None
        if data.classes is not None:
            self.classes = list(data.classes)
        return data

    def train(self, model: nn.Module, data: LocalData, settings: TrainSettings,
              progress: Callable[[int, float, int], None] | None = None) -> training.TrainResult:
        """Train ``model`` for one round: the task's own ``train``, or :func:`fedrest.training.fit`."""
        if self._train is None:
            return training.fit(model, data, epochs=settings.local_epochs, batch_size=settings.batch_size,
                                learning_rate=settings.learning_rate, momentum=settings.momentum, seed=settings.seed,
                                device=settings.device, progress=progress, proximal_mu=settings.proximal_mu,
                                gradient_correction=settings.control_correction)
        started = time.perf_counter()
        model.train()
        metrics = self._call("train(model, data, settings)", self._train, model, data.raw, settings)
        if settings.device.type == "cuda":
            torch.cuda.synchronize(settings.device)
        metrics = self._check_metrics(metrics, "train(model, data, settings)", allow_none=True)
        return training.TrainResult(num_samples=len(data), num_examples_seen=len(data) * settings.local_epochs,
                                    loss=metrics.get("loss"), accuracy=metrics.get("accuracy"),
                                    seconds=time.perf_counter() - started, metrics=metrics)

    def evaluate(self, model: nn.Module, data: LocalData, settings: TrainSettings) -> dict[str, float]:
        """Metrics of ``model`` on ``data``: the task's own ``evaluate``, or :func:`fedrest.training.evaluate`.

        Raises
        ------
        TaskError
            When the task's evaluate fails or returns anything but a dict of names to finite numbers.
        """
        if self._evaluate is None:
            return training.evaluate(model, data, settings.test_batch_size, settings.device)
        model.eval()
        with torch.no_grad():
            metrics = self._call("evaluate(model, data, settings)", self._evaluate, model, data.raw, settings)
        return self._check_metrics(metrics, "evaluate(model, data, settings)")

    def _check_metrics(self, metrics, what: str, allow_none: bool = False) -> dict[str, float]:
        if metrics is None and allow_none:
            return {}
        if not isinstance(metrics, dict):
            raise TaskError(f"task {self.name}: {what} must return a dict of metric names to numbers, not "
                            f"{type(metrics).__name__}")
        checked = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key or len(key) > 64:
                raise TaskError(f"task {self.name}: {what} returned a metric name {key!r}; use short strings")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TaskError(f"task {self.name}: {what} returned {key}={value!r}; metrics must be numbers")
            if not math.isfinite(float(value)):
                raise TaskError(f"task {self.name}: {what} returned {key}={value!r}; metrics must be finite")
            checked[key] = float(value)
        return checked

    def fingerprint(self, model: nn.Module) -> dict:
        """What must be equal on every node: name, the model's state_dict schema, class names, details."""
        return make_fingerprint(self.name, model.state_dict(), self.classes, self.details)


def _data_workers(cfg) -> int:
    value = getattr(cfg, "data_workers", None)
    return default_data_workers() if value is None else value
