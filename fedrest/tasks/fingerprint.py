"""A task's fingerprint, and the differences between two (pure functions; no torch needed to compare).

A fingerprint is a JSON object::

    {"name": "image-folder",
     "schema": [["conv1.weight", [64, 3, 7, 7], "float32"], ...],   # the state_dict's keys, shapes, dtypes
     "classes": ["cat", "dog"] | null,                              # the name of each label index
     "details": {"image_size": 64, ...}}                            # settings every node must share

The coordinator compares each registering worker's with its own (:func:`differences`) and refuses a mismatch with a
409 naming the first differences, so that a worker with other model code or other class folders never joins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

MAX_DIFFERENCES = 5


@dataclass(frozen=True)
class TaskIdentity:
    """What the coordinator knows of its task: the name, the model's name (for the status) and the fingerprint."""

    name: str
    model_name: str
    fingerprint: dict

    @property
    def classes(self) -> list[str] | None:
        return self.fingerprint.get("classes")

    @classmethod
    def builtin(cls, config, state_dict: Mapping) -> "TaskIdentity":
        """The identity of ``config``'s built-in task (``--task``, else ``--dataset``) whose model has
        ``state_dict`` (no class names, no details)."""
        name = config.task or config.dataset
        return cls(name, config.model or "simple_cnn", make_fingerprint(name, state_dict, None, {}))


def make_fingerprint(name: str, state_dict: Mapping, classes: list[str] | None, details: dict | None) -> dict:
    """The fingerprint of a task whose model has ``state_dict`` (tensors: keys, shapes and dtypes are kept)."""
    schema = [[key, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")] for key, tensor in state_dict.items()]
    return {"name": name, "schema": schema, "classes": None if classes is None else list(classes),
            "details": dict(details or {})}


def _shown(values: list, limit: int = 6) -> str:
    text = ", ".join(map(str, values[:limit]))
    return f"[{text}{', ...' if len(values) > limit else ''}] ({len(values)})"


def differences(expected: dict, given: dict, limit: int = MAX_DIFFERENCES) -> list[str]:
    """The first ``limit`` differences of ``given`` (a worker's fingerprint) from ``expected`` (the coordinator's),
    each a sentence naming both values; [] when they agree."""
    found: list[str] = []
    if expected.get("name") != given.get("name"):
        found.append(f"task: the coordinator runs {expected.get('name')!r}, this worker {given.get('name')!r}")
    found += _detail_differences(expected.get("details") or {}, given.get("details") or {})
    exp_classes, got_classes = expected.get("classes"), given.get("classes")
    if exp_classes is not None and got_classes is not None and exp_classes != got_classes:
        missing = [c for c in exp_classes if c not in got_classes]
        extra = [c for c in got_classes if c not in exp_classes]
        if missing or extra:
            found.append("class names differ: " + "; ".join(
                part for part in (f"missing here {_shown(missing)}" if missing else "",
                                  f"not at the coordinator {_shown(extra)}" if extra else "") if part))
        else:
            found.append(f"class names are in another order: coordinator {_shown(exp_classes)}, this worker "
                         f"{_shown(got_classes)}")
    found += _schema_differences(expected.get("schema") or [], given.get("schema") or [])
    return found[:limit]


def _detail_differences(expected: dict, given: dict) -> list[str]:
    return [f"{key.replace('_', '-')}: the coordinator has {expected.get(key)!r}, this worker {given.get(key)!r}"
            for key in sorted(set(expected) | set(given)) if expected.get(key) != given.get(key)]


def _schema_differences(expected: list, given: list) -> list[str]:
    exp = {entry[0]: (list(entry[1]), entry[2]) for entry in expected}
    got = {entry[0]: (list(entry[1]), entry[2]) for entry in given}
    found = []
    missing = [k for k in exp if k not in got]
    extra = [k for k in got if k not in exp]
    if missing:
        found.append(f"state_dict keys missing here: {_shown(missing, 3)}")
    if extra:
        found.append(f"state_dict keys not in the coordinator's model: {_shown(extra, 3)}")
    for key, (shape, dtype) in exp.items():
        if key in got and got[key] != (shape, dtype):
            found.append(f"{key}: the coordinator's is {dtype} {shape}, this worker's {got[key][1]} {got[key][0]}")
    return found
