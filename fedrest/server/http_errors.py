"""Every error the coordinator answers, as one JSON shape: ``{"error": ..., "message": ..., **details}``.

Views raise :class:`ApiError` for what they check themselves (a token, a body); the federation's domain
exceptions (:mod:`.errors`) are mapped to their answers here, by handlers registered once on the app
(:func:`register_error_handlers`), so no view translates them by hand.

=============================  ======  =====================================
domain exception               status  ``error``
=============================  ======  =====================================
``Conflict``                   409     its own (stale_round, duplicate_update, not_participant, name_in_use,
                                       task_mismatch)
``Forbidden``                  403     its own (banned, node_limit)
``UnknownNode``                404     unknown_node
``UpdateTooLarge``             413     payload_too_large (+ ``limit_bytes``)
``UpdateRejected`` and others  400     its ``error`` (invalid_update, update_norm_too_large, bad_request)
``OSError`` ENOSPC, EDQUOT     507     insufficient_storage (+ ``Retry-After``, ``retry_after_s``)
``OSError`` EIO, EROFS         503     storage_error (+ ``Retry-After``, ``retry_after_s``)
``StoreBusy``                  503     store_busy (+ ``Retry-After``, ``retry_after_s``): another process holds
                                       the run database's write lock; nothing changed
=============================  ======  =====================================

A disk error leaves nothing behind: an upload's partial files are removed when its request ends
(:class:`~fedrest.server.uploads.StreamingRequest`) and every durable write is atomic (:mod:`fedrest.files`), so
the request can simply be sent again once there is space; workers do that after ``retry_after_s``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from typing import Mapping

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from fedrest.serialization import UpdateRejected
from fedrest.server.errors import Conflict, Forbidden, UnknownNode, UpdateTooLarge
from fedrest.server.ratelimit import retry_after_header
from fedrest.server.store import StoreBusy

log = logging.getLogger("fl.coordinator")

JSON_BODY_LIMIT = 64 * 1024  # bytes, every endpoint but update uploads
METADATA_LIMIT = 256 * 1024  # bytes of a non-file form field (werkzeug also applies it per read chunk of 64 KiB)
MULTIPART_SLACK = 64 * 1024  # bytes of multipart framing and metadata allowed above MAX_UPDATE_BYTES
UPLOAD_ENDPOINT = "rounds.submit_update"
REGISTRATION_BODY_LIMIT = 2 * 1024 * 1024  # bytes of a registration (its task fingerprint names every state_dict key)
REGISTER_ENDPOINT = "nodes.register"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # 507: the disk (or the user's quota) is full
DISK_FAILED = (errno.EIO, errno.EROFS)  # 503: the disk failed or went read-only
STORAGE_RETRY_AFTER_S = (20.0, 40.0)  # a request refused for a disk error is told to come back after a draw, s


class ApiError(HTTPException):
    """An HTTP error answered as JSON ``{"error": ..., "message": ...}`` plus optional details."""

    def __init__(self, code: int, error: str, message: str, headers: Mapping[str, str] | None = None,
                 **details) -> None:
        super().__init__(message)
        self.code, self.error, self.message, self.details = code, error, message, details
        self.extra_headers = dict(headers or {})


def json_error(code: int, error: str, message: str, headers=None, **details) -> Response:
    """The JSON error answer (see the module docstring)."""
    response = jsonify({"error": error, "message": message, **details})
    response.status_code = code
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def too_large(limit: int) -> Response:
    """413 for an update upload over MAX_UPDATE_BYTES (``limit``, bytes)."""
    exc = UpdateTooLarge(limit)
    return json_error(413, exc.error, str(exc), limit_bytes=limit)


def _error_name(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


def _http_error(exc: HTTPException) -> Response:
    if isinstance(exc, ApiError):
        return json_error(exc.code, exc.error, exc.message, exc.extra_headers, **exc.details)
    if isinstance(exc, RequestEntityTooLarge):
        return _body_too_large()
    valid = getattr(exc, "valid_methods", None)
    return json_error(exc.code or 500, _error_name(exc), exc.description or exc.name,
                      headers={"Allow": ", ".join(valid)} if valid else None)


def upload_body_limit(federation) -> int:
    """The largest update upload body in bytes: MAX_UPDATE_BYTES per file part (two with SCAFFOLD: the update
    and its control-variate change) plus MULTIPART_SLACK."""
    parts = 2 if federation.strategy.uses_control_variates else 1
    return parts * federation.config.max_update_bytes + MULTIPART_SLACK


def _body_too_large() -> Response:
    """413 raised by werkzeug while reading a body (over the request's max_content_length or a form limit)."""
    if request.endpoint != UPLOAD_ENDPOINT:
        limit = REGISTRATION_BODY_LIMIT if request.endpoint == REGISTER_ENDPOINT else JSON_BODY_LIMIT
        return json_error(413, "payload_too_large", f"request bodies here are limited to {limit} bytes",
                          limit_bytes=limit)
    federation = current_app.extensions["federation"]
    limit = federation.config.max_update_bytes
    if request.content_length is not None and request.content_length <= upload_body_limit(federation):
        return json_error(413, "payload_too_large",
                          f"form field 'metadata' (or another part that is not a file) is larger than "
                          f"{METADATA_LIMIT} bytes, or the multipart boundary does not match the "
                          "Content-Type header")
    return too_large(limit)


def _conflict(exc: Conflict) -> Response:
    return json_error(409, exc.error, exc.message, **exc.details)


def _forbidden(exc: Forbidden) -> Response:
    return json_error(403, exc.error, exc.message)


def _unknown_node(exc: UnknownNode) -> Response:
    return json_error(404, "unknown_node", exc.message)


def _refused_update(exc: UpdateRejected) -> Response:
    if isinstance(exc, UpdateTooLarge):
        return too_large(exc.limit)
    return json_error(400, exc.error, str(exc))


def _storage_error(exc: OSError) -> Response:
    """507 ``insufficient_storage`` for a full disk, 503 ``storage_error`` for a failed one, both with a jittered
    Retry-After; any other OSError is unexpected (500)."""
    if exc.errno not in DISK_FULL + DISK_FAILED:
        return _unexpected(exc)
    full = exc.errno in DISK_FULL
    wait = random.uniform(*STORAGE_RETRY_AFTER_S)
    where = f" ({exc.filename})" if exc.filename else ""
    log.error("%s %s: cannot write to disk%s: %s; answered %d, nothing was stored", request.method, request.path,
              where, os.strerror(exc.errno), 507 if full else 503)
    federation = current_app.extensions.get("federation")
    if federation is not None:
        federation.count_refused_request("insufficient_storage" if full else "storage_error")
    message = ("the coordinator's disk is full" if full else "the coordinator cannot write to its disk") + \
        f"; nothing was stored: send this again in {wait:.0f}s"
    return _retry_later(507 if full else 503, "insufficient_storage" if full else "storage_error", message, wait)


def _store_busy(exc: StoreBusy) -> Response:
    """503 ``store_busy``: the database is locked by another process; nothing changed, send it again soon."""
    wait = exc.retry_after_s + random.uniform(0.0, 1.0)  # spread the retries (the store logs the episode)
    current_app.extensions["federation"].count_refused_request("store_busy")
    return _retry_later(503, "store_busy", f"{exc}: send this again in {wait:.1f}s", wait)


def _retry_later(code: int, error: str, message: str, wait: float) -> Response:
    """An answer to send the request again after ``wait`` seconds: ``Retry-After`` and ``retry_after_s``."""
    return json_error(code, error, message, headers={"Retry-After": retry_after_header(wait)},
                      retry_after_s=round(wait, 3))


def _unexpected(exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.path)
    return json_error(500, "internal_error", "the coordinator failed to handle this request; see its log")


def register_error_handlers(app: Flask) -> None:
    """Answer every HTTP error, domain exception and unexpected exception of ``app`` as JSON."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Conflict, _conflict)
    app.register_error_handler(Forbidden, _forbidden)
    app.register_error_handler(UnknownNode, _unknown_node)
    app.register_error_handler(UpdateRejected, _refused_update)
    app.register_error_handler(OSError, _storage_error)
    app.register_error_handler(StoreBusy, _store_busy)
    app.register_error_handler(Exception, _unexpected)
