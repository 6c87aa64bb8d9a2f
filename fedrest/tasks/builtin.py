"""The built-in tasks: SimpleCNN on MNIST or Fashion-MNIST (the data sources are :mod:`fedrest.data`)."""

from __future__ import annotations

from fedrest.data import DatasetUnavailable, load_dataset
from fedrest.tasks.api import Task, TaskError
from fedrest.tasks.data import TensorData

DEFAULT_MODEL = "simple_cnn"


def mnist_task(dataset: str, model_name: str | None) -> Task:
    """The built-in task ``dataset`` ("mnist" or "fashion-mnist"): 28x28 grayscale images held in memory as
    normalised tensors, 10 classes, a model of :data:`model.MODELS` (default SimpleCNN).

    Raises
    ------
    TaskError
        For a model name that is not in :data:`model.MODELS`.
    """
    from model import MODELS, build_model

    model_name = model_name or DEFAULT_MODEL
    if model_name not in MODELS:
        raise TaskError(f"task {dataset}: unknown model {model_name!r}; known: {', '.join(sorted(MODELS))} "
                        "(torchvision architectures train on --task image-folder)")

    def load(ctx, train: bool) -> TensorData:
        try:
            data = load_dataset(dataset, ctx.data_dir, train=train)
        except DatasetUnavailable as exc:  # its message lists what was tried and how to fix it
            raise TaskError(str(exc)) from None
        return TensorData(data.images, data.labels)

    return Task(dataset, "built-in", lambda: build_model(model_name),
                load_train_data=lambda ctx: load(ctx, True), load_test_data=lambda ctx: load(ctx, False),
                model_name=model_name)
