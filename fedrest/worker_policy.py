"""What each answer of the coordinator means for a worker: one table, used by every call the worker makes.

:func:`react` maps an exception raised by a call (:mod:`fedrest.client`) and the kind of call (``register``,
``upload``, ``heartbeat``, or any other ``call``: a task poll, a model download) to a :class:`Reaction`; the
worker only carries it out. The rules, in order:

=====================================  ============================  ==========================================
answer                                 during                        reaction
=====================================  ============================  ==========================================
no answer (refused, reset, timeout)    heartbeat                     IGNORE (the main loop will notice)
no answer                              any other                     WAIT_OUTAGE (back off; exit after
                                                                     GIVE_UP_AFTER seconds)
TLS certificate not verified           heartbeat                     IGNORE
TLS certificate not verified           any other                     FATAL (it will not fix itself)
undecodable global model               any                           RETRY (ask again in 2 s)
401                                    register                      FATAL (the join token is wrong)
409 name_in_use                        register                      FATAL (two workers share a name)
409 task_mismatch                      register                      FATAL (another model, classes or task)
400, 403, 413, 415                     register                      FATAL (registration refused)
409 duplicate_update                   upload                        ACCEPTED (a retried upload had arrived)
409 (other)                            upload                        DROP (joins the current round)
400, 413                               upload                        DROP (refused: never send these bytes again)
401, 404 unknown_node                  any other                     REGISTER (the coordinator lost this node)
429, 5xx                               any but heartbeat             RETRY (after the answer's retry_after_s)
any other error answer                 heartbeat                     IGNORE (logged)
any other error answer                 any other                     FATAL (unexpected answer)
=====================================  ============================  ==========================================
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import Enum

from fedrest.client import CoordinatorError, CoordinatorUnreachable, CoordinatorUntrusted
from fedrest.serialization import UpdateRejected

log = logging.getLogger("fl.worker")

CALLS = ("register", "upload", "heartbeat", "call")
# What the worker's calls raise: the coordinator's error answers, no answer, an unverified certificate, and an
# undecodable global model.
CALL_ERRORS = (CoordinatorError, CoordinatorUnreachable, CoordinatorUntrusted, UpdateRejected)


class FatalError(Exception):
    """The worker (or client host) cannot go on (the message says why); exit status 1."""


class Outage:
    """How long the coordinator has been unreachable, and the back-off before the next try: what a worker and a
    simulation's client host both do with WAIT_OUTAGE (one place, so that both give up after GIVE_UP_AFTER).

    ``give_up_after`` in seconds; times are ``clock()`` seconds (monotonic)."""

    def __init__(self, give_up_after: float, clock=time.monotonic) -> None:
        self.give_up_after, self.clock = give_up_after, clock
        self.since: float | None = None  # None: reachable (as far as we know)

    def ended(self) -> None:
        """A call was answered."""
        self.since = None

    def began(self, at: float | None = None) -> None:
        """The coordinator did not answer a call made at ``at`` (default now), unless already counted."""
        if self.since is None:
            self.since = self.clock() if at is None else at

    def delay(self, error: object, failing_since: float | None = None) -> float:
        """Seconds to wait before the next try after ``error`` (no answer): 1 s plus a quarter of the time down, at
        most 10 s and never past GIVE_UP_AFTER; the first one of an outage is logged as a warning.

        Raises
        ------
        FatalError
            Once the coordinator has been unreachable for more than GIVE_UP_AFTER seconds.
        """
        now = self.clock()
        if self.since is None:
            self.began(failing_since if failing_since is not None else now)
            log.warning("coordinator unreachable (%s); retrying with backoff for up to %gs", error, self.give_up_after)
        down = now - self.since
        if down > self.give_up_after:
            raise FatalError(f"coordinator unreachable for {down:.0f}s (GIVE_UP_AFTER={self.give_up_after:g}s); "
                             f"last error: {error}")
        return min(10.0, 1.0 + down / 4, max(0.1, self.give_up_after - down))


class Action(str, Enum):
    ACCEPTED = "accepted"  # the coordinator holds what was sent
    RETRY = "retry"  # wait ``delay`` seconds, then make the same call again
    REGISTER = "register"  # register again, then go on
    WAIT_OUTAGE = "wait_outage"  # the coordinator is unreachable: back off, give up after GIVE_UP_AFTER
    DROP = "drop"  # the upload was not taken; do not send these bytes again
    IGNORE = "ignore"  # nothing to do (a failed heartbeat; the main loop will notice what matters)
    FATAL = "fatal"  # the worker cannot go on: exit 1 with ``message``


@dataclass(frozen=True)
class Reaction:
    action: Action
    message: str
    delay: float = 0.0  # seconds, for RETRY
    level: int = logging.WARNING  # how loud the worker logs it


def retry_delay(exc: CoordinatorError) -> float:
    """Seconds to wait after a 429/5xx answer: the coordinator's ``retry_after_s`` (at most 60), else 2."""
    value = exc.body.get("retry_after_s")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 60:
        return max(0.1, float(value))
    return 2.0


def react(exc: Exception, during: str) -> Reaction:
    """The worker's reaction to ``exc`` raised by a call of kind ``during`` (one of :data:`CALLS`).

    Raises
    ------
    ValueError
        For an unknown ``during``; TypeError for an exception no call raises (a bug: let it surface).
    """
    if during not in CALLS:
        raise ValueError(f"unknown kind of call {during!r}")
    if isinstance(exc, CoordinatorUnreachable):
        return Reaction(Action.IGNORE if during == "heartbeat" else Action.WAIT_OUTAGE, str(exc))
    if isinstance(exc, CoordinatorUntrusted):
        return Reaction(Action.IGNORE if during == "heartbeat" else Action.FATAL, str(exc))
    if isinstance(exc, UpdateRejected):
        return Reaction(Action.RETRY, f"the global model from the coordinator could not be loaded ({exc}); "
                                      "asking again", delay=2.0, level=logging.ERROR)
    if not isinstance(exc, CoordinatorError):
        raise TypeError(f"no reaction to {type(exc).__name__}: {exc}")
    return _react_to_answer(exc, during)


def _react_to_answer(exc: CoordinatorError, during: str) -> Reaction:
    status, error = exc.status, exc.error
    if during == "register":
        if status == 401:
            return Reaction(Action.FATAL, f"the coordinator refused the join token ({exc.message}); pass its "
                                          "join token with --token=... or FL_TOKEN: on the coordinator's host it "
                                          "is in TEMP_DIR/join_token (temp/join_token), unless the coordinator "
                                          "was started with its own --token")
        if error == "name_in_use":
            return Reaction(Action.FATAL, f"the name is in use: {exc.message}")
        if error == "task_mismatch":
            return Reaction(Action.FATAL, f"the coordinator refused this worker's task: {exc.message}. Start the "
                                          "worker with the coordinator's --task and model settings (and the same "
                                          "class folders)")
        if status in (400, 403, 413, 415):
            return Reaction(Action.FATAL, f"registration refused: {exc.message}")
    if during == "upload":
        if error == "duplicate_update":
            return Reaction(Action.ACCEPTED, "the update had already arrived (a retried upload); counted once")
        if status == 409:
            return Reaction(Action.DROP, f"update not taken ({exc.message}); joining the current round")
        if status in (400, 413):
            return Reaction(Action.DROP, f"update rejected ({exc}); not sending these bytes again",
                            level=logging.ERROR)
    if status == 401 or error == "unknown_node":
        return Reaction(Action.REGISTER, f"the coordinator does not know this node ({exc.message or error}); "
                                         "registering again")
    if during == "heartbeat":
        return Reaction(Action.IGNORE, f"heartbeat refused: {exc}")
    if status == 429 or status >= 500:
        return Reaction(Action.RETRY, f"coordinator error {exc}; retrying in a moment", delay=retry_delay(exc))
    return Reaction(Action.FATAL, f"unexpected answer from the coordinator: {exc}")
