"""The federation: one run's state behind one lock, and the operations the API calls on it.

:class:`Federation` is a façade over parts with one job each and no lock of their own, called under its lock:

- :class:`~fedrest.server.registry.NodeRegistry`: nodes, names, token digests, liveness, bans;
- :class:`~fedrest.server.spool.UpdateSpool`: the update files of the open round;
- :class:`~fedrest.server.round_state.RoundState`: phase, round, participants, the open round's updates;
- :mod:`~fedrest.server.rounds`: the pure decisions of the round state machine (what happens next);
- :class:`~fedrest.server.store.RunStore`: the database every change is committed to;
- :mod:`~fedrest.server.checkpoints`: the global model's resume copy and the user's checkpoints;
- :class:`~fedrest.server.driver.RoundDriver`: the driver thread, the one place that applies the decisions;
- :mod:`~fedrest.server.closing`: the aggregation, evaluation and files of a closed round, outside the lock (so
  heartbeats, task polls and status requests are answered meanwhile).

Durability: every file is written atomically before the transaction that refers to it commits, so a
coordinator killed at any moment restarts on a consistent state (the same round and phase, the global model of
the last completed round, every acknowledged update, the same nodes and tokens). A restart in the middle of
aggregation aggregates again from the stored updates (aggregation is deterministic).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Collection, Mapping

import torch

from config import Config
from fedrest.aggregation import Strategy, make_strategy
from fedrest.files import remove_stale_temporaries
from fedrest.serialization import UpdateRejected, state_dict_to_bytes
from fedrest.server import intake, polls
from fedrest.server.checkpoints import GlobalModels
from fedrest.server.credentials import hash_token, new_token
from fedrest.server.errors import TaskMismatch
from fedrest.server.evaluation import Evaluator
from fedrest.server.driver import RoundDriver
from fedrest.server.registry import Node, NodeRegistry
from fedrest.server.round_state import RoundState
from fedrest.server.rounds import Phase
from fedrest.server.spool import AcceptedUpdate, UpdateSpool
from fedrest.server.state_dir import DB_NAME, GLOBAL, UPDATES, privacy_budget
from fedrest.server.status import NodeView, Snapshot, node_page, take_snapshot
from fedrest.server.resume import read_stored_run
from fedrest.server.store import RunStore, StoreBusy
from fedrest.tasks.fingerprint import TaskIdentity, differences

log = logging.getLogger("fl.federation")

__all__ = ["Federation", "Node", "Phase"]


class Federation:
    """State and rules of one federated run, stored durably under ``config.temp_dir``.

    Parameters
    ----------
    config : the run's settings (for a resumed run, pass it through :func:`state_dir.prepare_start` first).
    initial_state_dict : the global model of round 0 (its keys, shapes and dtypes define valid updates).
    evaluator : returns the test metrics of a state_dict (:mod:`.evaluation`); None disables evaluation.
    clock : monotonic clock in seconds (tests may pass a fake one).
    task : the task's identity (default: the built-in task of ``config``, fingerprinted from the initial model).
    parameter_keys : the state_dict keys that are the model's parameters (a server optimizer steps only those;
        default: every floating tensor).
    strategy : the run's strategy (default: :func:`~fedrest.aggregation.make_strategy` of ``config``; a task's
        own, :meth:`Task.make_strategy`).

    Attributes (read them under the lock, or in tests): ``state`` (:class:`RoundState`), ``registry``,
    ``spool``, ``store``, ``global_state`` / ``global_bytes`` (the global model), ``updates_refused_total``
    and ``requests_refused_total`` (error name -> count since this process started).

    Raises
    ------
    StoreError
        If a stored run cannot be read or its global model file is missing or damaged.
    """

    def __init__(self, config: Config, initial_state_dict: Mapping[str, torch.Tensor],
                 evaluator: Evaluator | None = None, clock: Callable[[], float] = time.monotonic,
                 task: TaskIdentity | None = None, parameter_keys: Collection[str] | None = None,
                 strategy: Strategy | None = None) -> None:
        self.config = config
        self.task = task or TaskIdentity.builtin(config, initial_state_dict)
        self.evaluator = evaluator
        self.clock = clock
        self._lock = threading.Lock()
        self.changed = polls.Changes(self._lock)  # the one lock, notified on every change
        self.registry = NodeRegistry(config.node_timeout, config.max_nodes)
        self.strategy = strategy if strategy is not None else make_strategy(config, parameter_keys)
        self.privacy = privacy_budget(config)
        self.state = RoundState()
        self.updates_refused_total: dict[str, int] = {}
        self.requests_refused_total: dict[str, int] = {}
        self.traffic = {"bytes_received": 0, "bytes_sent": 0}  # update uploads, global models served
        self._control_cache: tuple[int, bytes] = (-1, b"")  # (model version, SCAFFOLD's c as served)
        state_dir = Path(config.temp_dir)
        self.spool = UpdateSpool(state_dir / UPDATES)
        self.global_models = GlobalModels(state_dir / GLOBAL)
        self.stopping = threading.Event()  # set by stop(): the driver ends, long polls answer at once
        self.driver = RoundDriver(self)
        remove_stale_temporaries([state_dir, self.spool.directory, self.global_models.directory,
                                  Path(config.models_dir)])
        self.privacy_key = self.global_models.privacy_key() if self.privacy is not None else None
        self.store = RunStore(state_dir / DB_NAME)
        reference = OrderedDict((k, v.detach().cpu().clone()) for k, v in initial_state_dict.items())
        if self.store.is_empty():
            self._new_run(reference)
        else:
            self._resume(reference)

    @property
    def rounds_to_run(self) -> int:
        """COMMUNICATION_ROUNDS, or fewer when the DP epsilon budget allows fewer."""
        return self.privacy.rounds_allowed if self.privacy is not None else self.config.communication_rounds

    # Read-only views of the round state that the HTTP layer and monitors use.
    phase = property(lambda self: self.state.phase)
    round = property(lambda self: self.state.round)
    model_version = property(lambda self: self.state.model_version)
    finished = property(lambda self: self.state.phase == Phase.FINISHED)
    nodes = property(lambda self: self.registry.nodes, doc="Every registered node by id.")

    # ------------------------------------------------------------------ persistence

    def _new_run(self, initial: "OrderedDict[str, torch.Tensor]") -> None:
        self.run_id = secrets.token_hex(6)
        self._set_global(initial)
        self.global_models.write(0, self.global_bytes)
        self.store.put({"run_id": self.run_id, "config": self.config.public_dict(), "created_at": time.time(),
                        **self.state.values()})
        log.info("new run %s", self.run_id)

    def _resume(self, reference: "OrderedDict[str, torch.Tensor]") -> None:
        now = self.clock()
        self.run_id, state, self.state, self.strategy.state = read_stored_run(
            self.store, self.global_models, self.spool, reference, now, self.strategy.has_state)
        self._set_global(state)
        self.store.put({"config": self.config.public_dict()})  # a run that completed no round may have new settings
        self.registry.load(self.store.nodes(), now, time.time(), self.state.expected_answers())
        self.spool.remove_other_rounds(self.state.round)
        st = self.state
        log.info("resumed run %s: %s, round %d/%d (attempt %d), model version %d, %d nodes, %d updates of "
                 "this round kept, %d rounds in the history", self.run_id, st.phase.value, st.round,
                 self.config.communication_rounds, st.attempt, st.model_version, len(self.nodes),
                 len(st.updates), len(st.history))

    # ------------------------------------------------------------------ global model and counters

    def _set_global(self, state_dict: "OrderedDict[str, torch.Tensor]") -> None:
        self.global_state = state_dict
        self.global_bytes = state_dict_to_bytes(state_dict)

    def model_bytes(self) -> tuple[int, bytes]:
        """(model version, serialised global model); counted as sent."""
        with self._lock:
            self.traffic["bytes_sent"] += len(self.global_bytes)
            return self.state.model_version, self.global_bytes

    def control_variate_bytes(self) -> tuple[int, bytes]:
        """(model version, serialised SCAFFOLD global control variate of that version); counted as sent. Only
        for a strategy that :attr:`~fedrest.aggregation.Strategy.uses_control_variates`."""
        with self._lock:
            version, cached = self._control_cache
            if version != self.state.model_version:
                version = self.state.model_version
                cached = state_dict_to_bytes(self.strategy.control_variate(self.global_state))
                self._control_cache = version, cached
            self.traffic["bytes_sent"] += len(cached)
            return version, cached

    def is_busy(self) -> bool:
        """Whether the federation's lock is held now (a hint: it may change at once)."""
        return self._lock.locked()

    def count_received(self, num_bytes: int) -> None:
        """Count the body of an update upload (accepted or not)."""
        with self._lock:
            self.traffic["bytes_received"] += num_bytes

    def count_refused_request(self, error: str) -> None:
        """Count a refused request that is not an update (e.g. ``too_many_requests``), for monitors."""
        with self._lock:
            self.requests_refused_total[error] = self.requests_refused_total.get(error, 0) + 1

    # ------------------------------------------------------------------ nodes

    def register(self, name: str, device: str, num_samples: int, system_info: dict, instance_id: str | None = None,
                 task: dict | None = None, eval_samples: int = 0) -> tuple[Node, str, bool]:
        """Register a node, or re-register the node already called ``name`` (same id, history and place in
        the open round; a new token, the old one stops working). Stored before this returns.

        Returns (node, new node token, created). The rules, and how ``instance_id`` (the worker process) keeps
        two workers given one name from stealing it from each other: :meth:`NodeRegistry.prepare_registration`.

        ``task``: the worker's task fingerprint (:mod:`fedrest.tasks.fingerprint`; none from earlier versions). A
        mismatch is refused, and a node registered as ``name`` is gone (not waited for, not sampled) until it fits.

        Raises
        ------
        Conflict
            ``name_in_use`` for a process that a later one with the same name replaced; ``task_mismatch`` naming
            the first differences of ``task`` from the coordinator's.
        Forbidden
            ``banned`` for a name the operator banned; ``node_limit`` when MAX_NODES nodes are registered.
        """
        token = new_token()
        found = differences(self.task.fingerprint, task) if task is not None else []
        if found:  # the node that had this name (if any) is gone until its task fits
            with self.changed, self.store.transaction():
                gone = self.registry.mark_gone(name)
                if gone is not None:
                    self.store.save_node(gone.node_id, gone.name, gone.record())
            raise TaskMismatch(name, found)
        with self.changed, self.store.transaction():  # the database first: a locked one changes nothing
            node, created = self.registry.prepare_registration(name, device, num_samples, system_info,
                                                               instance_id, hash_token(token), self.clock(),
                                                               time.time(), eval_samples)
            self.store.save_node(node.node_id, name, node.record())
            self.registry.add(node)
            self.changed.notify_all()
        log.info("%s node %s (%s) on %s with %d samples", "registered" if created else "re-registered",
                 name, node.node_id, device, num_samples)
        return node, token, created

    def authenticate(self, token: str) -> Node | None:
        """The node holding ``token`` (and mark it alive), or None."""
        with self._lock:
            node = self.registry.by_token(hash_token(token))
            if node is not None:
                node.left = False
                self.touch(node)
            return node

    def touch(self, node: Node) -> None:
        """Mark ``node`` seen now (call under the lock)."""
        node.last_seen_mono, node.last_seen_wall = self.clock(), time.time()

    def get_node(self, node_id: str) -> Node:
        """Raises :class:`UnknownNode` for an unknown id."""
        with self._lock:
            return self.registry.get(node_id)

    def leave(self, node: Node) -> None:
        """A worker says it is leaving: it is offline from now (after a restart too) and no longer waited for."""
        with self.changed, self.store.transaction():
            node.left = True
            self.store.save_node(node.node_id, node.name, node.record())
            self.changed.notify_all()
        log.info("node %s (%s) left", node.name, node.node_id)

    def ban(self, key: str, reason: str = "") -> Node:
        """Remove a node (by id or name) for good: its token stops working, its name cannot register again,
        and an update it sent for the open round is dropped (unless that round is already being aggregated).

        Raises
        ------
        UnknownNode
            If no node has this id or name.
        """
        with self.changed, self.store.transaction():
            node = self.registry.find(key)
            self.registry.ban(node)
            dropped = self.state.drop_participant(node.node_id)
            self.store.ban_node(node.node_id, node.record(), self.state.values())
            if dropped:
                Path(dropped.path).unlink(missing_ok=True)
                if dropped.control_path:
                    Path(dropped.control_path).unlink(missing_ok=True)
            self.changed.notify_all()
        log.warning("node %s (%s) banned by the operator%s%s", node.name, node.node_id,
                    f": {reason}" if reason else "", "; its update for this round was dropped" if dropped else "")
        return node

    def unban(self, key: str) -> Node:
        """Allow a banned node (by id or name) to register again (it needs the join token). Raises
        :class:`UnknownNode` as :meth:`ban` does."""
        with self.changed, self.store.transaction():
            node = self.registry.find(key)
            node.banned = False
            self.store.save_node(node.node_id, node.name, node.record())
        log.warning("node %s (%s) unbanned by the operator", node.name, node.node_id)
        return node

    def node_status(self, node: Node, now: float | None = None) -> str:
        """"banned", "offline", "training" (a participant of the open round that has not answered) or
        "online"."""
        now = self.clock() if now is None else now
        if node.banned:
            return "banned"
        if not self.registry.is_online(node, now):
            return "offline"
        return "training" if self.state.owes_answer(node.node_id) else "online"

    # ------------------------------------------------------------------ tasks

    def wait_for_task(self, node: Node, wait: float) -> dict:
        """The node's task, waiting up to ``wait`` seconds in this thread for it to change
        (:func:`.polls.wait_for_task`)."""
        return polls.wait_for_task(self, node, wait)

    def task_signature(self) -> tuple:
        """What a waiting node's task depends on besides the node (:func:`.polls.task_signature`)."""
        return polls.task_signature(self)

    def poll_task(self, node: Node, park: bool) -> tuple[dict, bool, tuple]:
        """One look at the node's task for a parked long poll (:func:`.polls.poll_task`)."""
        return polls.poll_task(self, node, park)

    def settle_polls(self, parked: Mapping[str, int], check: Collection[str],
                     due: Collection[str]) -> tuple[tuple, dict[str, dict]]:
        """Bring the parked long polls up to date (:func:`.polls.settle_polls`)."""
        return polls.settle_polls(self, parked, check, due)

    def add_change_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every change of the federation (under its lock, from the thread that made
        the change: it must return at once)."""
        self.changed.listeners.append(listener)

    def remove_change_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling a listener of :meth:`add_change_listener`."""
        if listener in self.changed.listeners:
            self.changed.listeners.remove(listener)

    # ------------------------------------------------------------------ updates (fedrest.server.intake)

    def check_can_submit(self, node: Node, round_number: int) -> None:
        """Raises Conflict unless ``node`` may upload an update for ``round_number`` now (checked again later)."""
        with self.changed:
            self.state.check_can_submit(node.node_id, round_number)

    def submit_update(self, node: Node, round_number: int, metadata: Mapping, data: bytes | Path,
                      control: bytes | Path | None = None) -> AcceptedUpdate:
        """Check and durably store one update (:func:`.intake.submit_update`)."""
        return intake.submit_update(self, node, round_number, metadata, data, control)

    def submit_evaluation(self, node: Node, round_number: int, num_samples: int, metrics: dict) -> None:
        """Store a federated evaluation (:func:`.intake.submit_evaluation`)."""
        intake.submit_evaluation(self, node, round_number, num_samples, metrics)

    def record_refusal(self, node: Node, round_number: int, refusal: UpdateRejected) -> None:
        """Count and log a refused update (:func:`.intake.record_refusal`)."""
        intake.record_refusal(self, node, round_number, refusal)

    # ------------------------------------------------------------------ rounds (fedrest.server.driver)

    def tick(self) -> None:
        """Advance the state machine by at most one step (see :meth:`RoundDriver.tick`)."""
        self.driver.tick()

    def start(self) -> None:
        """Start the driver thread that advances the rounds (every 0.5 s, or at once on a change)."""
        self.driver.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the driver thread (waits for an aggregation in progress), wake long polls, and store when each
        node was last seen (so that a restart tells the nodes that were alive from those long gone)."""
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()
        self.driver.join(timeout)
        with self.changed:
            if not self.store.closed:
                try:
                    self.store.save_nodes({n.node_id: (n.name, n.record()) for n in self.nodes.values()})
                except StoreBusy as exc:  # a restart then counts nodes seen since the last write as gone
                    log.warning("could not store when each node was last seen: %s", exc)

    def all_told_to_stop(self) -> bool:
        """True when the run is finished and every node still online has been told to stop."""
        with self._lock:
            now = self.clock()
            return self.finished and all(n.stop_sent or not self.registry.is_online(n, now)
                                         for n in self.nodes.values())

    def snapshot(self) -> Snapshot:
        """The state for monitors, taken under the lock (see :mod:`.status`)."""
        with self._lock:
            now = self.clock()
            return take_snapshot(self, now)

    def node_page(self, offset: int, limit: int, status: str | None = None) -> tuple[int, list[NodeView]]:
        """(how many nodes match, a page of them by name) for ``GET /nodes`` (:func:`.status.node_page`)."""
        with self._lock:
            return node_page(self, self.clock(), offset, limit, status)
