"""The worker's error policy (fedrest.worker_policy.react), one table: every answer x every kind of call."""

from __future__ import annotations

import pytest

from fedrest.client import CoordinatorError, CoordinatorUnreachable, CoordinatorUntrusted
from fedrest.serialization import UpdateRejected
from fedrest.worker_policy import CALLS, Action, react, retry_delay


def answer(status: int, error: str, **body) -> CoordinatorError:
    return CoordinatorError(status, error, f"{error} message", {"error": error, **body})


UNREACHABLE = CoordinatorUnreachable("GET http://127.0.0.1:5000/api/v1/task: [Errno 111] Connection refused")
UNTRUSTED = CoordinatorUntrusted("cannot verify the TLS certificate of https://127.0.0.1:5000")
BAD_MODEL = UpdateRejected("not a torch zip archive")

# (exception, {call: expected action}); a call left out of the dict expects the "*" entry.
TABLE = [
    (UNREACHABLE, {"heartbeat": Action.IGNORE, "*": Action.WAIT_OUTAGE}),
    (UNTRUSTED, {"heartbeat": Action.IGNORE, "*": Action.FATAL}),
    (BAD_MODEL, {"*": Action.RETRY}),
    (answer(401, "unauthorized"), {"register": Action.FATAL, "*": Action.REGISTER}),
    (answer(404, "unknown_node"), {"*": Action.REGISTER}),
    (answer(409, "name_in_use"), {"register": Action.FATAL, "upload": Action.DROP, "heartbeat": Action.IGNORE,
                                  "*": Action.FATAL}),
    (answer(403, "banned"), {"register": Action.FATAL, "heartbeat": Action.IGNORE, "*": Action.FATAL}),
    (answer(413, "payload_too_large"), {"register": Action.FATAL, "upload": Action.DROP,
                                        "heartbeat": Action.IGNORE, "*": Action.FATAL}),
    (answer(400, "invalid_update"), {"register": Action.FATAL, "upload": Action.DROP, "heartbeat": Action.IGNORE,
                                     "*": Action.FATAL}),
    (answer(415, "unsupported_media_type"), {"register": Action.FATAL, "heartbeat": Action.IGNORE,
                                             "*": Action.FATAL}),
    (answer(409, "duplicate_update"), {"upload": Action.ACCEPTED, "heartbeat": Action.IGNORE, "*": Action.FATAL}),
    (answer(409, "stale_round"), {"upload": Action.DROP, "heartbeat": Action.IGNORE, "*": Action.FATAL}),
    (answer(429, "too_many_requests", retry_after_s=0.5), {"heartbeat": Action.IGNORE, "*": Action.RETRY}),
    (answer(503, "http_error"), {"heartbeat": Action.IGNORE, "*": Action.RETRY}),
    (answer(500, "internal_error"), {"heartbeat": Action.IGNORE, "*": Action.RETRY}),
    (answer(404, "not_found"), {"heartbeat": Action.IGNORE, "*": Action.FATAL}),
]
CASES = [(exc, call, expected.get(call, expected["*"])) for exc, expected in TABLE for call in CALLS]


@pytest.mark.parametrize("exc, call, action", CASES,
                         ids=[f"{type(e).__name__}-{getattr(e, 'error', '')}-{c}" for e, c, _ in CASES])
def test_each_answer_gets_the_reaction_of_the_table(exc, call, action):
    reaction = react(exc, call)
    assert reaction.action == action
    assert reaction.message  # every reaction says what happened


def test_a_retry_waits_what_the_coordinator_asked_within_bounds():
    assert react(answer(429, "too_many_requests", retry_after_s=0.5), "call").delay == 0.5
    assert retry_delay(answer(503, "http_error")) == 2.0  # no hint: 2 s
    assert retry_delay(answer(429, "too_many_requests", retry_after_s=3600)) == 2.0  # absurd hints are ignored
    assert retry_delay(answer(429, "too_many_requests", retry_after_s=True)) == 2.0
    assert retry_delay(answer(429, "too_many_requests", retry_after_s=0.01)) == 0.1


def test_fatal_registration_messages_name_the_fix():
    assert "--token" in react(answer(401, "unauthorized"), "register").message
    assert "in use" in react(answer(409, "name_in_use"), "register").message


def test_an_unknown_kind_of_call_or_exception_is_a_bug_not_a_reaction():
    with pytest.raises(ValueError):
        react(UNREACHABLE, "download")
    with pytest.raises(TypeError):
        react(KeyError("x"), "call")


def test_a_worker_that_registers_into_a_new_run_says_so_and_fetches_the_new_model(caplog):
    """When the coordinator's run changed (--fresh=RUN_ID), the worker logs it and forgets its model version."""
    import logging

    import torch

    import worker as worker_module
    from config import Config
    from fedrest.tasks import load_task
    from fedrest.tasks.data import TensorData

    cfg = Config(name="w1", quiet=True)
    data = TensorData(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.int64))  # four blank images
    w = worker_module.Worker(cfg, torch.device("cpu"), load_task(cfg), data)

    class Coordinator:  # answers registrations as the coordinator does, in the run it is told
        run_id, url, token = "aaaaaaaaaaaa", "http://127.0.0.1:5000", None

        def register(self, *args, **kwargs):
            return {"node_id": "0123456789abcdef", "node_token": "t" * 43, "run_id": self.run_id,
                    "dataset": "mnist", "heartbeat_interval": 10.0}, True

    w.client = Coordinator()
    w.register()
    w.model_version = 3
    with caplog.at_level(logging.WARNING, logger="fl.worker"):
        w.register()  # the same run: nothing to say
        assert not caplog.records and w.model_version == 3
        w.client.run_id = "bbbbbbbbbbbb"
        w.register()
    assert "new run bbbbbbbbbbbb (this worker was in run aaaaaaaaaaaa)" in caplog.text
    assert w.model_version == -1 and w.run_id == "bbbbbbbbbbbb"


def test_an_outage_backs_off_within_give_up_after_then_is_fatal():
    """Outage: what a worker and a simulation's client host do with WAIT_OUTAGE (one rule for both)."""
    from fedrest.worker_policy import FatalError, Outage

    now = [100.0]
    outage = Outage(give_up_after=12.0, clock=lambda: now[0])
    assert outage.delay("refused", failing_since=99.0) == pytest.approx(1.25)  # counted from the failed call
    now[0] = 107.0
    assert outage.delay("refused") == pytest.approx(3.0)  # 1 s + a quarter of the 8 s down
    now[0] = 110.0
    assert outage.delay("refused") == pytest.approx(1.0)  # never past GIVE_UP_AFTER (2 s left, not 3.75)
    now[0] = 111.5
    with pytest.raises(FatalError, match="unreachable for 12s .GIVE_UP_AFTER=12s.; last error: refused"):
        outage.delay("refused")
    outage.ended()
    assert outage.since is None and outage.delay("reset") == pytest.approx(1.0)
