"""``--task``: a built-in name, a task file (``path/to/my_task.py``) or a module (``package.module``) -> a Task.

The file or module is imported here, on the machine where the user put it; nothing of it ever crosses the network.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from fedrest.tasks.api import Task, TaskError, where_in

BUILTIN = ("mnist", "fashion-mnist", "image-folder")
FUNCTIONS = ("build_model", "load_train_data", "load_test_data", "train", "evaluate", "strategy")


def task_spec(cfg) -> str:
    """What ``cfg`` asks for: ``--task``, else ``--dataset`` (the built-in task of that name)."""
    return cfg.task or cfg.dataset


def load_task(cfg) -> Task:
    """The task ``cfg`` names (:func:`task_spec`), built with ``cfg``'s settings.

    Raises
    ------
    TaskError
        For a name that is neither built in, nor a file, nor an importable module; a file that does not import
        (the message names its line); a module without ``build_model``; settings that do not fit the task.
    """
    spec = task_spec(cfg)
    if spec in ("mnist", "fashion-mnist"):
        from fedrest.tasks.builtin import mnist_task

        return mnist_task(spec, cfg.model)
    if spec == "image-folder":
        from fedrest.tasks.image_folder import image_folder_task

        return image_folder_task(cfg)
    module, source = _import(spec)
    return task_from_module(module, source)


def _import(spec: str):
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise TaskError(f"--task {spec}: no such file (built-in tasks: {', '.join(BUILTIN)})")
        return _import_file(path.resolve()), str(path.resolve())
    try:
        module = importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise TaskError(f"--task {spec}: not a built-in task ({', '.join(BUILTIN)}), not a file, and no module "
                            "of that name can be imported") from None
        raise TaskError(f"--task {spec}: importing it failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module: any failure becomes one clear line
        raise TaskError(f"--task {spec}: importing it failed: {type(exc).__name__}: {exc}") from exc
    return module, getattr(module, "__file__", None) or spec


def _import_file(path: Path):
    """Import ``path`` as the module named by its stem (its folder goes on sys.path, so that its own imports and
    DataLoader worker processes find it)."""
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
            return loaded
        raise TaskError(f"--task {path}: its name {name!r} is taken by the module {loaded.__name__} "
                        f"({getattr(loaded, '__file__', 'built in')}); rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has a loader
        raise TaskError(f"--task {path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: a syntax error or a failing import is one line
        del sys.modules[name]
        line = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise TaskError(f"--task {path}: importing it failed: {where_in(exc, str(path))}{line}") from exc
    return module


def task_from_module(module, source: str) -> Task:
    """The :class:`Task` a module defines: its functions, or those of its object ``task``.

    Raises
    ------
    TaskError
        When ``build_model`` is missing or a defined name is not callable.
    """
    obj = getattr(module, "task", module)
    functions = {}
    for fn in FUNCTIONS:
        value = getattr(obj, fn, None)
        if value is not None and not callable(value):
            raise TaskError(f"task {source}: {fn} must be a function, not {type(value).__name__}")
        functions[fn] = value
    if functions["build_model"] is None:
        raise TaskError(f"task {source} defines no build_model(): it must return the torch.nn.Module to train "
                        "(see 'Write your own task' in the README)")
    default_name = Path(source).stem if source.endswith(".py") else module.__name__.rsplit(".", 1)[-1]
    name = getattr(obj, "name", None) or default_name
    if not isinstance(name, str) or len(name) > 128:
        raise TaskError(f"task {source}: name must be a string of at most 128 characters")
    task = Task(name, source, functions["build_model"], load_train_data=functions["load_train_data"],
                load_test_data=functions["load_test_data"], train=functions["train"], evaluate=functions["evaluate"])
    task.strategy_factory = functions["strategy"]
    return task
