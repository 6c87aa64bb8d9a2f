"""Tasks: what a federation trains, a model and the data each node holds.

Choose one with ``--task`` (``FL_TASK``), the same on the coordinator and on every worker:

- ``mnist`` or ``fashion-mnist`` (the default is ``--dataset``): the built-in SimpleCNN on 28x28 images;
- ``image-folder``: a folder of images in torchvision's ImageFolder layout, ``DATA_DIR/<class name>/<image>``
  (any size, RGB or grayscale), and a torchvision architecture with random weights (``--model``, default
  resnet18; nothing is downloaded), resized to ``--image-size`` and normalised with ``--normalize-mean/-std``;
- ``path/to/my_task.py`` or ``package.module``: your own model and data, in one small Python file.

Write your own task
-------------------
The file defines plain functions at module level (or one object named ``task`` with these attributes)::

    build_model() -> torch.nn.Module                    required
    load_train_data(ctx) -> data                        required on workers
    load_test_data(ctx) -> data                         on the coordinator (unless --no-eval)
    train(model, data, settings) -> dict | None         optional
    evaluate(model, data, settings) -> dict             optional
    name = "my-task"                                    optional (default: the file's or module's name)

``build_model()``
    The model with fresh weights. The coordinator seeds torch with ``--seed`` first: its weights are the initial
    global model. A worker's weights are replaced by the global model's before every round.
``load_train_data(ctx)``
    All the training data this node may use. ``--num-partitions``/``--partition-id`` then keep this node's part
    of it (IID, or Dirichlet label skew with ``--partition dirichlet``), and ``--eval-fraction`` holds a seeded
    part of that out for federated evaluation.
``load_test_data(ctx)``
    The coordinator's held-out data: every new global model is evaluated on it.
``train(model, data, settings)``
    Your local training: train ``model`` (in place; it is on ``settings.device`` and holds the global weights) on
    ``data`` for ``settings.local_epochs`` epochs. Return training metrics, e.g. ``{"loss": 0.31}``, or None.
    Default: SGD (``settings.learning_rate``, ``settings.momentum``) on cross-entropy over mini-batches of
    ``settings.batch_size`` shuffled from ``settings.seed``.
``evaluate(model, data, settings)``
    Metrics of ``model`` on ``data``: a dict of names to finite floats, e.g. ``{"loss": ..., "f1": ...}``. Default:
    ``loss`` (mean cross-entropy) and ``accuracy``, exact per example. Every name you return is shown by the
    status API, the history, both monitors, the dashboard and ``/metrics``; workers' federated evaluations are
    combined as the sample-weighted mean of each name.

``data`` is a pair of tensors ``(x, y)`` (same first dimension N; held in memory: the fast path) or a
``torch.utils.data.Dataset`` of ``(x, y)`` pairs (read through a DataLoader with worker processes; decoded examples
are cached in memory when they fit in ``--cache-bytes``). The built-in loops need int64 class indices ``y``; so do
Dirichlet splits. Your own ``train``/``evaluate`` receive the data in the form you returned (this node's part).

``ctx`` (:class:`TaskContext`) tells where the node is: ``ctx.role`` ("coordinator" or "worker"), ``ctx.data_dir``
(``--data-dir``), ``ctx.seed``. ``settings`` (:class:`TrainSettings`): ``round``, ``local_epochs``, ``batch_size``,
``learning_rate``, ``momentum``, ``seed``, ``device``, ``test_batch_size``.

Safety: a task file runs only where you put it. The coordinator sends workers settings and weights, never code,
and accepts nothing but tensors. At registration every worker sends its task's fingerprint (name, the model's
state_dict keys, shapes and dtypes, class names); a mismatch is refused (409 ``task_mismatch``) naming the first
differences, and the worker exits 1.
"""

from fedrest.tasks.api import Task, TaskContext, TaskError, TrainSettings
from fedrest.tasks.loading import load_task

__all__ = ["Task", "TaskContext", "TaskError", "TrainSettings", "load_task"]
