"""How a node learns its next task: ``GET /task``, answered at once, after a wait in a thread, or parked.

Functions of a :class:`~fedrest.server.federation.Federation` (``fed``; its methods delegate here). Each takes the
federation's lock itself. The parked long polls of the coordinator's server (:mod:`.long_polls`) use
:func:`poll_task` and :func:`settle_polls`; Flask's development server and test client wait in a thread
(:func:`wait_for_task`). Both give the same answers at the same moments.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Collection, Mapping

from fedrest.server.registry import Node
from fedrest.server.store import StoreBusy

log = logging.getLogger("fl.federation")


class Changes(threading.Condition):
    """The federation's condition (its one lock); ``notify_all`` also calls the change listeners (the parked long
    polls: :meth:`Federation.add_change_listener`)."""

    def __init__(self, lock) -> None:
        super().__init__(lock)
        self.listeners: list[Callable[[], None]] = []
        self.generation = 0  # notify_all calls so far: a waiter that was busy can tell it missed one

    def notify_all(self) -> None:
        self.generation += 1
        super().notify_all()
        for listener in list(self.listeners):
            listener()


def wait_for_task(fed, node: Node, wait: float) -> dict:
    """The node's task; while it is "wait", block up to ``wait`` seconds (in this thread) for a change."""
    deadline = fed.clock() + wait
    with fed.changed:
        node.polling += 1
        try:
            while True:
                task = task_of(fed, node)
                remaining = deadline - fed.clock()
                if task["action"] != "wait" or remaining <= 0 or fed.stopping.is_set() or node.left:
                    return task
                fed.changed.wait(min(remaining, 1.0))
        finally:
            node.polling -= 1
            if not node.left:
                fed.touch(node)


def task_of(fed, node: Node, stopped: dict | None = None) -> dict:
    """The node's task now (call under the lock). A node told to stop is gone from then on (offline, after a
    restart too): stored at once, or added to ``stopped`` (node id -> (name, record)) to store together."""
    task = fed.state.task(node.node_id, fed.config, fed.clock(), fed.task, fed.strategy.client_settings())
    if task["action"] == "stop" and not node.stop_sent:  # the worker exits now
        node.stop_sent = node.left = True
        if stopped is None:
            try:
                fed.store.save_node(node.node_id, node.name, node.record())
            except StoreBusy:  # not told after all: it asks again
                node.stop_sent = node.left = False
                raise
        else:
            stopped[node.node_id] = (node.name, node.record())
    return task


def task_signature(fed) -> tuple:
    """What a waiting node's task depends on besides the node itself: (phase, round, attempt, model version,
    stopping). While it is unchanged, no "wait" turns into another task. Cheap; read without the lock too."""
    st = fed.state
    return st.phase, st.round, st.attempt, st.model_version, fed.stopping.is_set()


def poll_task(fed, node: Node, park: bool) -> tuple[dict, bool, tuple]:
    """One look at the node's task for a long poll that waits without a thread (:mod:`.long_polls`).

    Returns (task, parked, signature): ``parked`` when ``park`` and the task is "wait" (the caller then holds
    the poll and later calls :func:`settle_polls`), and the :func:`task_signature` it was decided on."""
    with fed.changed:
        task = task_of(fed, node)
        parked = park and task["action"] == "wait" and not fed.stopping.is_set() and not node.left
        if not node.left:
            fed.touch(node)
        return task, parked, task_signature(fed)


def settle_polls(fed, parked: Mapping[str, int], check: Collection[str],
                 due: Collection[str]) -> tuple[tuple, dict[str, dict]]:
    """Bring the parked long polls up to date, in one call under the lock (:mod:`.long_polls`).

    Parameters
    ----------
    parked : node id -> the number of its polls parked now (for the nodes whose number changed): a node with
        parked polls counts as online.
    check : the parked nodes to look at (all of them after the :func:`task_signature` changed).
    due : the nodes among ``check`` whose poll reached its deadline: answered whatever their task.

    Returns (the task signature looked at, node id -> task for each node of ``check`` to answer now: its task is
    no longer "wait", or it is due, left, unknown, or the coordinator is stopping).
    """
    answers, stopped = {}, {}
    with fed.changed:
        nodes = fed.registry.nodes
        for node_id, count in parked.items():
            if node_id in nodes:
                nodes[node_id].parked = count
                fed.touch(nodes[node_id])
        stopping = fed.stopping.is_set()
        for node_id in check:
            node = nodes.get(node_id)
            if node is None:
                answers[node_id] = fed.state.task(node_id, fed.config, fed.clock(), fed.task)
                continue
            task = task_of(fed, node, stopped)
            if task["action"] != "wait" or stopping or node.left or node_id in due:
                answers[node_id] = task
        if stopped and not fed.store.closed:
            try:
                fed.store.save_nodes(stopped)
            except StoreBusy as exc:  # they stop all the same; a restart counts them offline after NODE_TIMEOUT
                log.warning("could not store that %d nodes were told to stop: %s", len(stopped), exc)
        return task_signature(fed), answers
