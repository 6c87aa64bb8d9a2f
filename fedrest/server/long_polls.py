"""Long polls parked without a request thread: the asynchronous front of the coordinator's WSGI app.

A worker asks ``GET /api/v1/task?wait=W`` and, while its task is "wait", the coordinator holds the answer up to W
seconds (a long poll). On a thread-per-request server each waiting worker held a thread. Here:

1. The front marks the request (``scope["fl.long_poll"]``) and runs the Flask view in a request thread as usual:
   authentication, rate limits, validation and the task itself stay in Flask. The view looks once
   (:meth:`Federation.poll_task`); when the task is "wait", it records ``scope["fl.parked"]`` and returns at once.
2. The front then parks the request as a future: no thread, a few hundred bytes. It watches the federation's
   changes (:meth:`Federation.add_change_listener`); when what decides a waiting node's task changes (a round
   opens, evaluation starts, the run ends or stops: :meth:`Federation.task_signature`), one call in one helper
   thread looks at every parked node at once (:meth:`Federation.settle_polls`) and the nodes whose task is no longer
   "wait" get it now. At its deadline (a draw between EARLIEST_ANSWER and 1 times the wait asked, to spread the
   polls that began together) a poll is answered with its fresh task.
3. A client that disconnects while parked is forgotten (its node is no longer counted as polling).

The wire contract is unchanged: the same request, the same JSON answers, at the same moments. Without the front
(Flask's development server with ``--debug``, or Flask's test client) the view waits in its thread as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fedrest.server.wsgi_bridge import WSGIBridge

log = logging.getLogger("fl.serving")

TASK_PATH = "/api/v1/task"
HEALTH_PATH = "/api/v1/health"
NODES_PATH = "/api/v1/nodes/"
# A parked poll still "wait" is answered after a uniform draw in [EARLIEST_ANSWER x wait, wait]: polls that began
# together (every worker answered at a round's opening, or started at once) come back spread out, not as one wave
# of new connections each period.
EARLIEST_ANSWER = 0.75
SETTLE_BATCH_S = 0.05  # parked polls' deadlines and counts are told to the federation this often at most


@dataclass(eq=False, slots=True)
class _Poll:
    """One parked poll: its ``answer`` (the task, or None once the client went away) and its deadline's timer.
    Few objects on purpose: with 10,000 waiting nodes every object a poll holds is one more the cyclic garbage
    collector walks in each full collection, while every request waits."""

    node_id: str
    answer: asyncio.Future
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def gone(self, _watcher=None) -> None:
        if not self.answer.done():
            self.answer.set_result(None)


class LongPollFront:
    """ASGI app: ``wsgi_app`` (the coordinator's Flask app, or a :class:`~fedrest.server.serving.PendingApp`) in
    ``threads`` request threads, with long polls parked (see the module's docstring), and request bodies that
    stay silent for ``client_timeout`` seconds cut (the view then sees a truncated body and answers 400; its
    thread is free again)."""

    def __init__(self, wsgi_app, threads: int, client_timeout: float) -> None:
        self.wsgi_app = wsgi_app
        self.inner = WSGIBridge(wsgi_app, threads)
        self.client_timeout = client_timeout
        self.parking: _Parking | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        timed = self._timed(receive)
        federation = self._federation()
        inline = federation is not None and _is_quick(scope) and not federation.is_busy()
        if federation is None or scope["path"] != TASK_PATH or scope["method"] != "GET":
            await self.inner(scope, timed, send, inline)
            return
        if self.parking is None:
            self.parking = _Parking(federation, asyncio.get_running_loop())
        await self.parking.serve(self.inner, scope, timed, receive, send, inline)

    def _federation(self):
        """The federation of the Flask app served (None while a PendingApp is still waiting for it)."""
        target = getattr(self.wsgi_app, "app", self.wsgi_app)  # a PendingApp's app once built, or a Flask app
        extensions = getattr(target, "extensions", None)
        return None if extensions is None else extensions.get("federation")

    def _timed(self, receive):
        async def timed_receive():
            try:
                return await asyncio.wait_for(receive(), self.client_timeout)
            except asyncio.TimeoutError:
                log.info("cut a request whose body stayed silent for %g s", self.client_timeout)
                return {"type": "http.disconnect"}
        return timed_receive

    def close(self) -> None:
        """Release the helper and request threads (after the server stopped)."""
        self.inner.close()
        if self.parking is not None:
            self.parking.close()


class _Parking:
    """The parked polls of one federation, on one event loop (every method runs in the loop's thread)."""

    def __init__(self, federation, loop: asyncio.AbstractEventLoop) -> None:
        self.fed = federation
        self.loop = loop
        self.polls: dict[str, list[_Poll]] = {}
        self.due: set[_Poll] = set()  # past their deadline: answer with the fresh task
        self.dirty: set[str] = set()  # nodes whose number of parked polls the federation has not been told
        self.seen_signature = None
        self.scan_wanted = False
        self.busy = False
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="long-polls")
        federation.add_change_listener(self._notified)

    def close(self) -> None:
        self.fed.remove_change_listener(self._notified)
        self.executor.shutdown(wait=False)

    async def serve(self, inner, scope, timed_receive, receive, send, inline: bool) -> None:
        """Answer one ``GET /task``: run the view; park the request if the view says so."""
        scope["fl.long_poll"] = True
        messages = []

        async def capture(message):
            messages.append(message)
        await inner(scope, timed_receive, capture, inline)
        parked = scope.get("fl.parked")
        if parked is None:
            for message in messages:
                await send(message)
            return
        node_id, wait, signature = parked
        poll = self._park(node_id, wait, signature)
        watcher = self.loop.create_task(_until_disconnect(receive))
        watcher.add_done_callback(poll.gone)
        try:
            task = await poll.answer
        finally:
            watcher.cancel()
        if task is None:  # the client went away
            self._forget(poll)
            return
        body = (json.dumps(task, separators=(",", ":")) + "\n").encode()
        start = messages[0]
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        try:
            await send({"type": "http.response.start", "status": start["status"],
                        "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        except (RuntimeError, ConnectionError) as exc:  # the client closed as it was answered ("handler is closed")
            log.debug("a parked poll of %s was answered after its client went away: %s", node_id, exc)

    def _park(self, node_id: str, wait: float, signature) -> _Poll:
        poll = _Poll(node_id, self.loop.create_future())
        poll.timer = self.loop.call_later(wait * random.uniform(EARLIEST_ANSWER, 1.0), self._expire, poll)
        self.polls.setdefault(node_id, []).append(poll)
        self.dirty.add(node_id)
        if signature != self.fed.task_signature():  # it changed after the view looked: look again
            self.scan_wanted = True
        self._run()
        return poll

    def _expire(self, poll: _Poll) -> None:
        self.due.add(poll)
        self._run()

    def _forget(self, poll: _Poll) -> None:
        poll.timer.cancel()
        self.due.discard(poll)
        polls = self.polls.get(poll.node_id, [])
        if poll in polls:
            polls.remove(poll)
            if not polls:
                del self.polls[poll.node_id]
            self.dirty.add(poll.node_id)
            self._run()

    def _notified(self) -> None:
        """Called by the federation, under its lock, from any thread, after every change."""
        try:
            self.loop.call_soon_threadsafe(self._changed)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    def _changed(self) -> None:
        if self.polls and self.fed.task_signature() != self.seen_signature:
            self.scan_wanted = True
            self._run()

    def _run(self) -> None:
        """Settle what is pending within SETTLE_BATCH_S (deadlines, new and gone polls: one call to the federation
        for all of them), or at once after a change that may end the wait (a round opens) when none is pending."""
        if not self.busy:
            self.busy = True
            if self.scan_wanted:
                self.loop.create_task(self._settle())
            else:
                self.loop.call_later(SETTLE_BATCH_S, lambda: self.loop.create_task(self._settle()))

    async def _settle(self) -> None:
        """Tell the federation what changed, one call at a time, until nothing is left to tell."""
        try:
            while self.scan_wanted or self.due or self.dirty:
                full, self.scan_wanted = self.scan_wanted, False
                forced = {p.node_id for p in self.due if p.node_id in self.polls}
                self.due = set()
                batch = {n: list(self.polls.get(n, ())) for n in (self.polls if full else forced)}
                counts = {n: len(self.polls.get(n, ())) for n in self.dirty}
                self.dirty = set()
                signature, answers = await self.loop.run_in_executor(
                    self.executor, self.fed.settle_polls, counts, set(batch), forced)
                if full:
                    self.seen_signature = signature
                for node_id, task in answers.items():
                    self._answer(batch[node_id], task)
        except RuntimeError:  # pragma: no cover - the executor was shut down with the server
            pass
        finally:
            self.busy = False

    def _answer(self, polls: list[_Poll], task: dict) -> None:
        for poll in polls:
            waiting = self.polls.get(poll.node_id, [])
            if poll not in waiting:  # disconnected meanwhile
                continue
            waiting.remove(poll)
            if not waiting:
                del self.polls[poll.node_id]
            self.dirty.add(poll.node_id)
            poll.timer.cancel()
            self.due.discard(poll)
            poll.answer.set_result(task)


def _is_quick(scope) -> bool:
    """Requests whose view only reads and touches memory under the federation's lock (no disk, no body to
    stream): health, heartbeats and the task poll. They run in the event loop's thread when the lock is free."""
    path, method = scope["path"], scope["method"]
    return ((method == "GET" and path in (TASK_PATH, HEALTH_PATH))
            or (method == "POST" and path.startswith(NODES_PATH) and path.endswith("/heartbeat")))


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
