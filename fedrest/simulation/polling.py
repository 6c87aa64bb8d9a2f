"""The long polls of a host's virtual clients, on one asyncio event loop (httpx), not a thread each.

Each idle virtual client asks ``GET /api/v1/task?wait=W`` with its node token, as a worker does
(:meth:`fedrest.client.CoordinatorClient.task`); an answer "wait" is asked again at once; any other answer (train,
evaluate, stop), and any error, goes to the host's callback, and that client's polling ends until the host
:meth:`~TaskPolls.poll`\\ s it again. A parked poll costs a coroutine and its connection on this side, a few hundred
bytes on the coordinator's (:mod:`fedrest.server.long_polls`), and keeps its node online there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Callable

import httpx

from fedrest.client import (API, CONNECT_TIMEOUT, READ_TIMEOUT, CoordinatorError, CoordinatorUnreachable,
                            CoordinatorUntrusted, base_url, error_from_answer, tls_context)

log = logging.getLogger("fl.simulation")

POLL_WAIT_S = 60.0  # the longest wait the coordinator allows (MAX_LONG_POLL): fewest polls while idle
# connection pools the polls are spread over: httpcore looks at every connection of a pool each time a response
# ends, so 500 polls answered at once (the run's "stop") took 8 s on one pool; 32 pools keep each one small
POOLS = 32


class TaskPolls:
    """Long polls of many clients on an event loop in a thread of its own.

    Parameters
    ----------
    address : the coordinator's ``HOST:PORT`` or URL.
    on_answer : called in the loop's thread as ``on_answer(key, task, error)``: a task dict (not "wait") and None,
        or None and the exception (:class:`CoordinatorError`, :class:`CoordinatorUnreachable`,
        :class:`CoordinatorUntrusted`). It must not block (put the answer on a queue).
    ca_cert : PEM file to trust for https:// (default: the system's trust store).
    wait : seconds each poll asks the coordinator to hold it.
    """

    def __init__(self, address: str, on_answer: Callable, ca_cert: str | None = None,
                 wait: float = POLL_WAIT_S) -> None:
        self.url = base_url(address) + API + "/task"
        self.on_answer, self.wait, self.ca_cert = on_answer, wait, ca_cert
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-polls", daemon=True)
        self._http: list[httpx.AsyncClient] = []
        self._polls: set[asyncio.Task] = set()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        verify = tls_context(self.ca_cert) if self.url.startswith("https://") else True  # one context for all
        timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT, read=self.wait + READ_TIMEOUT)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._http = [httpx.AsyncClient(verify=verify, timeout=timeout, limits=limits) for _ in range(POOLS)]
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def poll(self, key, token: str, delay: float = 0.0) -> None:
        """Poll for client ``key`` with ``token`` (after ``delay`` seconds) until its task is not "wait"."""
        self.loop.call_soon_threadsafe(self._start_poll, key, token, delay)

    def _start_poll(self, key, token: str, delay: float) -> None:
        task = self.loop.create_task(self._poll(key, token, delay))
        self._polls.add(task)
        task.add_done_callback(self._polls.discard)

    async def _poll(self, key, token: str, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        headers = {"Authorization": f"Bearer {token}"}
        http = self._http[hash(key) % POOLS]
        while True:
            try:
                response = await http.get(self.url, params={"wait": f"{self.wait:g}"}, headers=headers)
            except httpx.HTTPError as exc:
                self.on_answer(key, None, _network_error(exc, self.url))
                return
            if response.status_code != 200:
                self.on_answer(key, None, error_from_answer(response.status_code, response.content,
                                                            response.reason_phrase))
                return
            try:
                task = response.json()
            except ValueError:
                self.on_answer(key, None, CoordinatorError(200, "bad_response", "answer is not JSON"))
                return
            if not isinstance(task, dict) or task.get("action") != "wait":
                self.on_answer(key, task if isinstance(task, dict) else {}, None)
                return

    def close(self, timeout: float = 5.0) -> None:
        """Cancel every poll, close the connections and stop the loop's thread."""
        if not self._thread.is_alive():
            return

        async def shut() -> None:
            for task in list(self._polls):
                task.cancel()
            await asyncio.gather(*self._polls, return_exceptions=True)
            for http in self._http:
                await http.aclose()
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shut(), self.loop)
        self._thread.join(timeout)


def _network_error(exc: httpx.HTTPError, url: str) -> Exception:
    """An httpx failure as the worker's calls raise it: an unverified certificate, or no answer."""
    text = str(exc) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return CoordinatorUntrusted(f"cannot verify the TLS certificate of {url}: {text}")
    return CoordinatorUnreachable(f"GET {url}: {text}")
