"""Request validation: each helper returns a clean value or raises a 400 (or 413/415) naming the bad field.

Nothing here touches the federation's state, so a refused request leaves it unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flask import request

from fedrest.server.errors import BadUpdateMetadata, UpdateTooLarge
from fedrest.server.federation import Node
from fedrest.server.http_errors import MULTIPART_SLACK, ApiError
from fedrest.server.uploads import part_path

MAX_NAME_LENGTH = 128
MAX_DEVICE_LENGTH = 64
MAX_SYSTEM_INFO_BYTES = 4096
MAX_LONG_POLL = 60.0  # seconds
MAX_NUM_SAMPLES = 10**9
MAX_SCHEMA_ENTRIES = 20_000  # state_dict keys of a registering worker's model
MAX_CLASSES = 20_000
MAX_METRICS = 64  # metric names in one federated evaluation
MAX_PAGE = 500  # nodes in one page of GET /nodes


def json_object() -> dict:
    """The request's JSON object body (415 for another content type, 400 for anything but an object)."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send a JSON object with Content-Type: application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nesting deeper than the parser's recursion limit
        raise ApiError(400, "bad_request", "the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object" if body is not None else
                       "the body must be a JSON object (it is empty, null or not valid JSON)")
    return body


def finite_number(value, name: str, lo: float, hi: float) -> float:
    """``value`` as a float in [lo, hi] (bools, strings, NaN and infinities refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, "bad_request", f"{name} must be a finite number")
    try:
        value = float(value)  # an int beyond float range raises OverflowError
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ApiError(400, "bad_request", f"{name} must be a finite number")
    if not lo <= value <= hi:
        raise ApiError(400, "bad_request", f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def positive_int(value, name: str, hi: int = MAX_NUM_SAMPLES) -> int:
    """``value`` as an int in [1, hi] (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise ApiError(400, "bad_request", f"{name} must be an integer in [1, {hi}], got {value!r}")
    return value


def short_text(value, name: str, max_length: int) -> str:
    """A non-empty printable unicode string of at most ``max_length`` characters."""
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise ApiError(400, "bad_request", f"{name} must be a non-empty string of at most {max_length} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ApiError(400, "bad_request", f"{name} must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800": not text, cannot be logged or shown
        raise ApiError(400, "bad_request", f"{name} must be valid unicode text") from None
    return value


def registration() -> dict:
    """The body of ``POST /nodes``: name, device, num_samples, system_info and the optional instance_id."""
    body = json_object()
    name = short_text(body.get("name"), "name", MAX_NAME_LENGTH)
    device = short_text(body.get("device"), "device", MAX_DEVICE_LENGTH)
    num_samples = positive_int(body.get("num_samples"), "num_samples")
    system_info = body.get("system_info", {})
    try:
        encoded = json.dumps(system_info, allow_nan=False, ensure_ascii=False)
        encoded.encode("utf-8")  # lone surrogates cannot be logged or shown
    except ValueError:  # NaN/Infinity would make /status invalid JSON; UnicodeEncodeError is a ValueError
        raise ApiError(400, "bad_request", "system_info must not hold NaN, Infinity or invalid unicode") from None
    if not isinstance(system_info, dict) or len(encoded) > MAX_SYSTEM_INFO_BYTES:
        raise ApiError(400, "bad_request", f"system_info must be a JSON object of at most "
                                           f"{MAX_SYSTEM_INFO_BYTES} bytes")
    instance_id = body.get("instance_id")
    if instance_id is not None:
        instance_id = short_text(instance_id, "instance_id", 64)
    task = body.get("task")
    eval_samples = body.get("eval_samples", 0)
    if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or not 0 <= eval_samples <= MAX_NUM_SAMPLES:
        raise ApiError(400, "bad_request", f"eval_samples must be an integer in [0, {MAX_NUM_SAMPLES}]")
    return {"name": name, "device": device, "num_samples": num_samples, "system_info": system_info,
            "instance_id": instance_id, "task": None if task is None else task_fingerprint(task),
            "eval_samples": eval_samples}


def evaluation() -> tuple[int, dict]:
    """The body of ``POST /rounds/<r>/evaluation``: ``num_samples`` (int >= 1) and ``metrics``, an object of at
    most MAX_METRICS names (1-64 characters) to finite numbers."""
    body = json_object()
    num_samples = positive_int(body.get("num_samples"), "num_samples")
    metrics = body.get("metrics")
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise ApiError(400, "bad_request", f"metrics must be an object of at most {MAX_METRICS} names to numbers")
    return num_samples, {short_text(k, "metric name", 64): finite_number(v, f"metrics.{k}", -1e15, 1e15)
                         for k, v in metrics.items()}


def _string_list(value, name: str, max_items: int, max_length: int) -> list[str]:
    if not isinstance(value, list) or len(value) > max_items:
        raise ApiError(400, "bad_request", f"{name} must be a list of at most {max_items} strings")
    return [short_text(v, f"{name}[]", max_length) for v in value]


def task_fingerprint(task) -> dict:
    """The ``task`` of a registration (:mod:`fedrest.tasks.fingerprint`): name, schema [[key, shape, dtype]...],
    classes (list or null) and details (an object), each checked for type and size."""
    if not isinstance(task, dict):
        raise ApiError(400, "bad_request", "task must be a JSON object (name, schema, classes, details)")
    name = short_text(task.get("name"), "task.name", MAX_NAME_LENGTH)
    schema = task.get("schema", [])
    if not isinstance(schema, list) or len(schema) > MAX_SCHEMA_ENTRIES:
        raise ApiError(400, "bad_request", f"task.schema must be a list of at most {MAX_SCHEMA_ENTRIES} entries")
    checked = []
    for entry in schema:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], list) and len(entry[1]) <= 16
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in entry[1])):
            raise ApiError(400, "bad_request", "task.schema entries must be [key, [dimensions...], dtype]")
        checked.append([short_text(entry[0], "task.schema key", 1024), entry[1],
                        short_text(entry[2], "task.schema dtype", 32)])
    classes = task.get("classes")
    if classes is not None:
        classes = _string_list(classes, "task.classes", MAX_CLASSES, MAX_NAME_LENGTH)
    details = task.get("details", {})
    if not isinstance(details, dict) or len(json.dumps(details)) > MAX_SYSTEM_INFO_BYTES:
        raise ApiError(400, "bad_request", f"task.details must be a JSON object of at most {MAX_SYSTEM_INFO_BYTES} "
                                           "bytes")
    return {"name": name, "schema": checked, "classes": classes, "details": details}


def long_poll_wait() -> float:
    """The ``wait`` query parameter of ``GET /task``: seconds in [0, MAX_LONG_POLL] (default 0)."""
    raw_wait = request.args.get("wait", "0")
    try:
        wait = float(raw_wait)
    except ValueError:
        raise ApiError(400, "bad_request", f"wait must be a number of seconds, got {raw_wait!r}") from None
    if not 0 <= wait <= MAX_LONG_POLL:
        raise ApiError(400, "bad_request", f"wait must be in [0, {MAX_LONG_POLL:g}] seconds, got {raw_wait!r}")
    return wait


def node_page_query(statuses) -> tuple[int, int, str | None]:
    """The query of ``GET /nodes``: (offset >= 0, limit in [1, MAX_PAGE], status among ``statuses`` or None)."""
    values = []
    for name, default, lo, hi in (("offset", 0, 0, 10**9), ("limit", MAX_PAGE, 1, MAX_PAGE)):
        raw = request.args.get(name, str(default))
        if not raw.isdigit() or not lo <= int(raw) <= hi:
            raise ApiError(400, "bad_request", f"{name} must be an integer in [{lo}, {hi}], got {raw!r}")
        values.append(int(raw))
    status = request.args.get("status")
    if status is not None and status not in statuses:
        raise ApiError(400, "bad_request", f"status must be one of {', '.join(statuses)}, got {status!r}")
    return values[0], values[1], status


def parse_update_metadata(raw: str | None, node: Node) -> dict:
    """Validate the ``metadata`` form field of an update upload.

    Returns a dict with ``num_samples`` (int in [1, the node's registered num_samples]) and the optional
    floats ``train_loss`` (>= 0), ``train_accuracy`` (in [0, 1]) and ``train_seconds`` (>= 0).

    Raises
    ------
    BadUpdateMetadata
        (400) naming the bad field.
    """
    if raw is None:
        raise BadUpdateMetadata("missing form field 'metadata' (JSON)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadUpdateMetadata("form field 'metadata' is not valid JSON") from None
    if not isinstance(meta, dict):
        raise BadUpdateMetadata("form field 'metadata' must be a JSON object")
    try:
        result = {"num_samples": positive_int(meta.get("num_samples"), "metadata.num_samples",
                                              hi=max(1, node.num_samples))}
        for key, hi in (("train_loss", 1e12), ("train_accuracy", 1.0), ("train_seconds", 1e9)):
            if meta.get(key) is not None:
                result[key] = finite_number(meta[key], f"metadata.{key}", 0.0, hi)
    except ApiError as exc:
        raise BadUpdateMetadata(exc.message) from None
    return result


def update_upload(node: Node, limit: int, with_control: bool = False) -> tuple[dict, Path, Path | None]:
    """The (metadata, state_dict file, control-variate file or None) of an update upload (multipart/form-data)
    whose file parts are each at most ``limit`` bytes; the parts' files are those the request streamed them into
    (:class:`~fedrest.server.uploads.StreamingRequest`). ``with_control`` (SCAFFOLD): take the file part
    ``control_variate`` too (its absence is refused later, by the federation, as missing_control_variate).

    Raises
    ------
    UpdateTooLarge
        (413) over ``limit``; checked on Content-Length before the body is read, and on the bytes read.
    BadUpdateMetadata
        (400) for missing or bad metadata, or a missing file part.
    ApiError
        415 for a body that is not multipart/form-data.
    """
    parts = 2 if with_control else 1
    if request.content_length is not None and request.content_length > parts * limit + MULTIPART_SLACK:
        raise UpdateTooLarge(limit)
    if not request.mimetype == "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with fields "
                                                      "'metadata' (JSON) and 'state_dict' (file)")
    metadata = parse_update_metadata(request.form.get("metadata"), node)
    upload = request.files.get("state_dict")
    if upload is None:
        raise BadUpdateMetadata("missing file part 'state_dict'")
    data = _part_file(upload, limit)
    control = request.files.get("control_variate") if with_control else None
    return metadata, data, None if control is None else _part_file(control, limit)


def _part_file(upload, limit: int) -> Path:
    path = part_path(upload)
    if path.stat().st_size > limit:
        raise UpdateTooLarge(limit)
    return path
