"""The federation's domain exceptions (no HTTP here; :mod:`.http_errors` maps each to one JSON answer).

A refused update is a :class:`fedrest.serialization.UpdateRejected` (its ``error`` attribute names why); the
federation records every such refusal (:meth:`fedrest.server.federation.Federation.record_refusal`).
"""

from __future__ import annotations

from fedrest.serialization import UpdateRejected


class Conflict(Exception):
    """A request that is valid but does not fit the current state (HTTP 409)."""

    def __init__(self, error: str, message: str, **details) -> None:
        super().__init__(message)
        self.error, self.message, self.details = error, message, details


class TaskMismatch(Conflict):
    """A registering worker's task differs from the coordinator's (HTTP 409 ``task_mismatch``): ``differences``
    lists the first ones, as sentences."""

    def __init__(self, name: str, differences: list[str]) -> None:
        super().__init__("task_mismatch", f"the task of worker {name!r} differs from the coordinator's: "
                         + "; ".join(differences), differences=list(differences))


class UnknownNode(KeyError):
    """No node has this id or name (HTTP 404): a worker should register again.

    ``message`` says what was looked up; ``str(exc)`` is KeyError's quoted key.
    """

    def __init__(self, key: str, message: str | None = None) -> None:
        super().__init__(key)
        self.message = message or f"no node {key!r}; register again"


class Forbidden(Exception):
    """A request the rules refuse whatever the state (HTTP 403): a banned node, a full federation."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error, self.message = error, message


class UpdateTooLarge(UpdateRejected):
    """An update upload larger than MAX_UPDATE_BYTES (HTTP 413)."""

    error = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"update larger than MAX_UPDATE_BYTES={limit} bytes ({limit / 2**20:.1f} MiB)")
        self.limit = limit


class BadUpdateMetadata(UpdateRejected):
    """The metadata of an update upload is missing or out of range (HTTP 400 bad_request)."""

    error = "bad_request"
