"""The coordinator's state: nodes, the round state machine, updates and FedAvg (no HTTP here).

Round state machine (one :class:`Federation` per run)::

    waiting_for_nodes --(>= MIN_NODES_TO_START online)--> training(r)
    training(r) --(every live participant answered, or ROUND_TIMEOUT passed)
                   and >= MIN_UPDATES updates--> aggregating(r)
    training(r) --(same, with fewer updates)--> training(r) again, with nodes sampled from those online now
    aggregating(r) --(FedAvg, evaluation, checkpoint)--> training(r+1) | waiting_for_nodes | finished

All mutable state is guarded by one lock. Aggregation, evaluation and checkpoint writing happen in
:meth:`Federation.tick` outside that lock (called by the driver thread), so heartbeats, task polls and status
requests are answered while a round is being aggregated.

Durability (see store.py): nodes with their token digests, the round, its phase and participants, the accepted
updates of the open round and the history live in ``TEMP_DIR/coordinator.sqlite3``. Update bytes are files
``TEMP_DIR/updates/round_<r>/<node_id>.pt`` and the global model of version v is ``TEMP_DIR/global/model_v<v>.pt``;
every file is written atomically (temporary file, fsync, ``os.replace``) before the transaction that refers to
it commits, so a coordinator killed at any moment restarts on a consistent state: the same round and phase,
the global model of the last completed round, every acknowledged update, the same nodes and tokens. A restart
in the middle of aggregation aggregates again from the stored updates (FedAvg is deterministic).

Memory for updates is one model: aggregation streams the stored updates from disk into a float64 accumulator.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Mapping

import torch

import failpoints
from config import RUN_FIELDS, Config
from aggregation import UpdateNormTooLarge, aggregate, clip_update, delta_norm
from credentials import hash_token
from store import RunStore, StoreError
from utils import (FedAvgAccumulator, UpdateRejected, atomic_write_bytes, bytes_to_state_dict,
                   check_compatible, fsync_directory, state_dict_to_bytes, torch_save_bytes)

log = logging.getLogger("fl.federation")

Evaluator = Callable[[Mapping[str, torch.Tensor]], "tuple[float, float]"]
CHECKPOINT_FORMAT = "fl-checkpoint-v1"
WAITING_LOG_EVERY = 10.0  # seconds between "waiting for nodes" log lines
DB_NAME = "coordinator.sqlite3"


class Phase(str, Enum):
    WAITING = "waiting_for_nodes"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    FINISHED = "finished"


class Conflict(Exception):
    """A request that is valid but does not fit the current state (HTTP 409)."""

    def __init__(self, error: str, message: str, **details) -> None:
        super().__init__(message)
        self.error, self.message, self.details = error, message, details


class UnknownNode(KeyError):
    """No node has this id (HTTP 404): the worker should register again."""


class Forbidden(Exception):
    """A request the rules refuse whatever the state (HTTP 403): a banned node, a full federation."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error, self.message = error, message


@dataclass
class Node:
    """A registered worker. Times: ``*_mono`` are the coordinator's monotonic clock (seconds)."""

    node_id: str
    name: str
    device: str
    num_samples: int
    system_info: dict
    token_hash: str
    registered_at: float  # wall clock, seconds since the epoch
    last_seen_mono: float
    last_seen_wall: float
    updates_submitted: int = 0
    rounds_contributed: list = field(default_factory=list)
    last_train_loss: float | None = None
    last_train_accuracy: float | None = None
    instance_id: str | None = None  # the worker process now using this name
    superseded: list = field(default_factory=list)  # instance ids that a later process with this name replaced
    polling: int = 0  # long polls in progress (a node waiting in a poll is alive)
    left: bool = False  # said it leaves (DELETE); offline until its next authenticated request
    banned: bool = False  # removed by the operator: no token works, its name cannot register
    stop_sent: bool = False

    _DURABLE = ("node_id", "name", "device", "num_samples", "system_info", "token_hash", "registered_at",
                "updates_submitted", "rounds_contributed", "last_train_loss", "last_train_accuracy",
                "instance_id", "superseded", "left", "banned")

    def record(self) -> dict:
        """The fields that are stored (liveness is not: it restarts with the coordinator)."""
        return {k: getattr(self, k) for k in self._DURABLE}


@dataclass
class AcceptedUpdate:
    node_id: str
    num_samples: int
    path: str
    train_loss: float | None
    train_accuracy: float | None
    train_seconds: float | None
    received_at: float  # wall clock


@dataclass
class RoundRecord:
    """One completed round, as shown to monitors."""

    round: int
    test_loss: float | None
    test_accuracy: float | None
    num_updates: int
    num_samples: int
    num_participants: int
    node_ids: list
    started_at: float  # wall clock
    finished_at: float
    duration_s: float  # round start (first attempt) to global model saved, wall clock
    aggregation_s: float  # FedAvg
    evaluation_s: float
    mean_train_loss: float | None
    max_train_seconds: float | None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def sample_participants(online: list[str], fraction: float, minimum: int, seed: int, round_number: int,
                        attempt: int) -> list[str]:
    """Client sampling of FedAvg (McMahan et al. 2017, Algorithm 1: m = max(C * K, 1) clients per round).

    Picks max(minimum, ceil(fraction * len(online))) of ``online`` (all of them if fewer), reproducibly from
    (seed, round, attempt). Returns the chosen ids in the order of ``online``.
    """
    k = min(len(online), max(minimum, math.ceil(fraction * len(online))))
    if k == len(online):
        return list(online)
    chosen = set(random.Random(f"{seed}/{round_number}/{attempt}").sample(sorted(online), k))
    return [i for i in online if i in chosen]


def archive_run(temp_dir: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> Path | None:
    """Move a stored run (database, updates, global models, and the checkpoints ``global_model*.pt`` in
    ``models_dir``) to ``TEMP_DIR/archive/<time>/``; None if there is none."""
    temp = Path(temp_dir)
    parts = [p for p in (temp / DB_NAME, temp / (DB_NAME + "-wal"), temp / (DB_NAME + "-shm"),
                         temp / "updates", temp / "global") if p.exists()]
    if models_dir is not None and parts:
        parts += sorted(Path(models_dir).glob("global_model*.pt"))
    if not parts:
        return None
    target = temp / "archive" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    target.mkdir(parents=True)
    for part in parts:
        os.replace(part, target / part.name)
    return target


def stored_run_config(temp_dir: str | os.PathLike) -> dict | None:
    """The configuration a stored run was started with (its public fields), or None when there is no run.

    Raises
    ------
    StoreError
        If the database cannot be read.
    """
    path = Path(temp_dir) / DB_NAME
    if not path.exists():
        return None
    store = RunStore(path)
    try:
        return store.get("config")
    finally:
        store.close()


def resume_config(cfg: Config, stored: dict | None) -> Config:
    """``cfg`` with the run-defining settings (config.RUN_FIELDS) of a stored run; logs the ones it overrides."""
    if not stored:
        return cfg
    changes = {k: stored[k] for k in RUN_FIELDS if k in stored and stored[k] != getattr(cfg, k)}
    if changes:
        log.warning("resuming a stored run: keeping its settings %s (start with --fresh for a new run)",
                    ", ".join(f"{k}={v!r}" for k, v in changes.items()))
    return cfg.replace(**changes)


class Federation:
    """State and rules of one federated run, stored durably under ``config.temp_dir``.

    Parameters
    ----------
    config : the run's settings (for a resumed run, pass it through :func:`resume_config` first).
    initial_state_dict : the global model of round 0 (its keys, shapes and dtypes define valid updates).
    evaluator : returns (test loss, test accuracy) of a state_dict; None disables evaluation.
    clock : monotonic clock in seconds (tests may pass a fake one).

    Raises
    ------
    StoreError
        If a stored run cannot be read or its global model file is missing or damaged.
    """

    def __init__(self, config: Config, initial_state_dict: Mapping[str, torch.Tensor],
                 evaluator: Evaluator | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._evaluator = evaluator
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.nodes: dict[str, Node] = {}
        self._by_name: dict[str, str] = {}
        self._by_token: dict[str, str] = {}
        self.phase = Phase.WAITING
        self.round = 0  # round in progress (training/aggregating) or last one finished
        self.participants: list[str] = []
        self.updates: "OrderedDict[str, AcceptedUpdate]" = OrderedDict()
        self.rejected: dict[str, str] = {}  # node id -> why its update for the open round was refused
        self.rejections: dict[str, int] = {}  # error name -> refused updates since start (monitors)
        self.refusals: dict[str, int] = {}  # error name -> other refused requests since start (rate limits)
        self._bytes_received = 0  # update uploads since this process started
        self._bytes_sent = 0  # global models served since this process started
        self.round_started_mono = 0.0  # deadline base; a restart gives the open round a fresh deadline
        self.round_started_wall = 0.0
        self.round_attempt = 0
        self.history: list[RoundRecord] = []
        self.model_version = 0  # number of rounds aggregated into the global model
        self._state_dir = Path(config.temp_dir)
        self._updates_dir = self._state_dir / "updates"
        self._global_dir = self._state_dir / "global"
        self._last_wait_log = -math.inf
        self._not_before = -math.inf  # monotonic time before which no round opens (back-off after refusals)
        self._refused_streak = 0  # consecutive attempts whose updates were all refused
        self._aggregating = False
        self._stop = threading.Event()
        self._driver: threading.Thread | None = None
        _remove_stale_temporaries([self._state_dir, self._updates_dir, self._global_dir, Path(config.models_dir)])
        self.store = RunStore(self._state_dir / DB_NAME)
        reference = OrderedDict((k, v.detach().cpu().clone()) for k, v in initial_state_dict.items())
        if self.store.is_empty():
            self._new_run(reference)
        else:
            self._resume(reference)

    # ------------------------------------------------------------------ persistence

    def _new_run(self, initial: "OrderedDict[str, torch.Tensor]") -> None:
        self.run_id = secrets.token_hex(6)
        self._set_global(initial)
        atomic_write_bytes(self._global_path(0), self.global_bytes)
        self.store.put({"run_id": self.run_id, "config": self.config.public_dict(), "created_at": time.time(),
                        **self._run_values()})
        log.info("new run %s", self.run_id)

    def _run_values(self) -> dict:
        return {"phase": self.phase.value, "round": self.round, "attempt": self.round_attempt,
                "participants": self.participants, "round_started_wall": self.round_started_wall,
                "model_version": self.model_version}

    def _global_path(self, version: int) -> Path:
        return self._global_dir / f"model_v{version}.pt"

    def _resume(self, reference: "OrderedDict[str, torch.Tensor]") -> None:
        s = self.store
        self.run_id = s.get("run_id")
        self.phase = Phase(s.get("phase"))
        self.round, self.round_attempt = s.get("round"), s.get("attempt")
        self.participants = list(s.get("participants"))
        self.round_started_wall = s.get("round_started_wall")
        self.model_version = s.get("model_version")
        path = self._global_path(self.model_version)
        try:
            state = bytes_to_state_dict(path.read_bytes())
            check_compatible(state, reference)
        except (OSError, UpdateRejected) as exc:
            raise StoreError(f"cannot resume run {self.run_id}: global model version {self.model_version} "
                             f"({path}) is unreadable: {exc}. Start with --fresh for a new run.") from None
        self._set_global(state)
        now = self._clock()
        for record in s.nodes():
            node = Node(**record, last_seen_mono=now, last_seen_wall=time.time())  # a grace of NODE_TIMEOUT
            self.nodes[node.node_id] = node
            self._by_name[node.name] = node.node_id
            if not node.banned:
                self._by_token[node.token_hash] = node.node_id
        for record in s.updates(self.round):
            update = AcceptedUpdate(**record)
            if Path(update.path).exists():
                self.updates[update.node_id] = update
            else:  # pragma: no cover - the file is written and fsynced before its row commits
                log.error("round %d: stored update of %s is missing on disk; leaving it out", self.round,
                          update.node_id)
        self.history = [RoundRecord(**r) for r in s.history()]
        for stale in self._updates_dir.glob("round_*"):  # left behind by a crash after a round's commit
            if stale.name != f"round_{self.round}":
                shutil.rmtree(stale, ignore_errors=True)
        self.round_started_mono = now
        log.info("resumed run %s: %s, round %d/%d (attempt %d), model version %d, %d nodes, %d updates of "
                 "this round kept, %d rounds in the history", self.run_id, self.phase.value, self.round,
                 self.config.communication_rounds, self.round_attempt, self.model_version, len(self.nodes),
                 len(self.updates), len(self.history))

    # ------------------------------------------------------------------ global model

    def _set_global(self, state_dict: "OrderedDict[str, torch.Tensor]") -> None:
        self.global_state = state_dict
        self.global_bytes = state_dict_to_bytes(state_dict)

    def model_bytes(self) -> tuple[int, bytes]:
        """(model version, serialised global model); counted as sent."""
        with self._lock:
            self._bytes_sent += len(self.global_bytes)
            return self.model_version, self.global_bytes

    def count_received(self, num_bytes: int) -> None:
        """Count the body of an update upload (accepted or not)."""
        with self._lock:
            self._bytes_received += num_bytes

    def count_refusal(self, error: str) -> None:
        """Count a refused request that is not an update (e.g. ``too_many_requests``), for monitors."""
        with self._lock:
            self.refusals[error] = self.refusals.get(error, 0) + 1

    def traffic(self) -> dict:
        """Bytes received in uploads and sent as global models since this process started."""
        with self._lock:
            return {"bytes_received": self._bytes_received, "bytes_sent": self._bytes_sent}

    # ------------------------------------------------------------------ nodes

    def register(self, name: str, device: str, num_samples: int, system_info: dict,
                 instance_id: str | None = None) -> tuple[Node, str, bool]:
        """Register a node, or re-register the node already called ``name``.

        Returns (node, new node token, created). Re-registration keeps the node id, its history and
        its participation in the current round, and replaces its token (the old one stops working).
        The node is stored before this returns.

        ``instance_id`` identifies the worker process. When a new process takes a name over (a worker
        restarted after a crash), the process it replaced is remembered: if that one is in fact still
        running and registers again, it gets :class:`Conflict` ``name_in_use`` instead of taking the name
        back, so two workers given the same name do not steal it from each other forever.

        Raises
        ------
        Conflict
            ``name_in_use`` for a process that a later one with the same name replaced.
        Forbidden
            ``banned`` for a name the operator banned; ``node_limit`` when MAX_NODES nodes are registered.
        """
        token = secrets.token_urlsafe(32)
        now_mono, now_wall = self._clock(), time.time()
        with self._changed:
            node_id = self._by_name.get(name)
            created = node_id is None
            if not created and self.nodes[node_id].banned:
                raise Forbidden("banned", f"the operator banned the node {name!r}")
            if created and len(self.nodes) >= self.config.max_nodes:
                raise Forbidden("node_limit", f"the federation is full: MAX_NODES={self.config.max_nodes} "
                                "nodes are registered")
            if created:
                node_id = secrets.token_hex(8)
                node = Node(node_id, name, device, num_samples, system_info, hash_token(token), now_wall,
                            now_mono, now_wall, instance_id=instance_id)
            else:
                node = self.nodes[node_id]
                if instance_id is not None and instance_id in node.superseded:
                    raise Conflict("name_in_use", f"another worker registered later as {name!r}; give every "
                                   "worker its own --name", node_id=node_id)
                if instance_id != node.instance_id and node.instance_id is not None:
                    node.superseded = (node.superseded + [node.instance_id])[-16:]
                    log.warning("node %s (%s): a new worker process took the name over", name, node_id)
                node.instance_id = instance_id
                self._by_token.pop(node.token_hash, None)
                node.device, node.num_samples, node.system_info = device, num_samples, system_info
                node.token_hash = hash_token(token)
                node.last_seen_mono, node.last_seen_wall = now_mono, now_wall
                node.stop_sent = node.left = False
            self.store.save_node(node_id, name, node.record())
            self.nodes[node_id] = node
            self._by_name[name] = node_id
            self._by_token[node.token_hash] = node_id
            self._changed.notify_all()
        log.info("%s node %s (%s) on %s with %d samples", "registered" if created else "re-registered",
                 name, node_id, device, num_samples)
        return node, token, created

    def authenticate(self, token: str) -> Node | None:
        """The node holding ``token`` (and mark it alive), or None."""
        with self._lock:
            node_id = self._by_token.get(hash_token(token))
            if node_id is None:
                return None
            node = self.nodes[node_id]
            node.left = False
            self._touch(node)
            return node

    def _touch(self, node: Node) -> None:
        node.last_seen_mono, node.last_seen_wall = self._clock(), time.time()

    def get_node(self, node_id: str) -> Node:
        """Raises :class:`UnknownNode` for an unknown id."""
        with self._lock:
            try:
                return self.nodes[node_id]
            except KeyError:
                raise UnknownNode(node_id) from None

    def leave(self, node: Node) -> None:
        """A worker says it is leaving: it is offline from now and no longer waited for."""
        with self._changed:
            node.left = True
            self._changed.notify_all()
        log.info("node %s (%s) left", node.name, node.node_id)

    def _find_node(self, key: str) -> Node:
        """The node whose id or name is ``key`` (lock held); raises :class:`UnknownNode`."""
        node = self.nodes.get(key) or self.nodes.get(self._by_name.get(key, ""))
        if node is None:
            raise UnknownNode(key)
        return node

    def ban(self, key: str, reason: str = "") -> Node:
        """Remove a node (by id or name) for good: its token stops working, its name cannot register again,
        and an update it sent for the open round is dropped (unless that round is already being aggregated).

        Raises
        ------
        UnknownNode
            If no node has this id or name.
        """
        with self._changed:
            node = self._find_node(key)
            node.banned = node.left = True
            self._by_token.pop(node.token_hash, None)
            dropped = self.phase == Phase.TRAINING and self.updates.pop(node.node_id, None)
            if node.node_id in self.participants and self.phase == Phase.TRAINING:
                self.participants = [i for i in self.participants if i != node.node_id]
                self.rejected.pop(node.node_id, None)
            self.store.ban_node(node.node_id, node.record(), self._run_values())
            if dropped:
                Path(dropped.path).unlink(missing_ok=True)
            self._changed.notify_all()
        log.warning("node %s (%s) banned by the operator%s%s", node.name, node.node_id,
                    f": {reason}" if reason else "", "; its update for this round was dropped" if dropped else "")
        return node

    def unban(self, key: str) -> Node:
        """Allow a banned node (by id or name) to register again (it needs the join token).

        Raises
        ------
        UnknownNode
            If no node has this id or name.
        """
        with self._changed:
            node = self._find_node(key)
            node.banned = False
            self.store.save_node(node.node_id, node.name, node.record())
        log.warning("node %s (%s) unbanned by the operator", node.name, node.node_id)
        return node

    def _is_online(self, node: Node, now: float) -> bool:
        if node.left:
            return False
        return node.polling > 0 or now - node.last_seen_mono <= self.config.node_timeout

    def node_status(self, node: Node, now: float | None = None) -> str:
        """"offline", "training" (a participant of the open round that has not answered) or "online"."""
        now = self._clock() if now is None else now
        if node.banned:
            return "banned"
        if not self._is_online(node, now):
            return "offline"
        return "training" if self._owes_answer(node.node_id) else "online"

    def _owes_answer(self, node_id: str) -> bool:
        """A participant of the open round that has neither an accepted nor a refused update."""
        return (self.phase == Phase.TRAINING and node_id in self.participants and node_id not in self.updates
                and node_id not in self.rejected)

    # ------------------------------------------------------------------ tasks

    def _task(self, node: Node) -> dict:
        if self.phase == Phase.FINISHED:
            node.stop_sent = True
            return {"action": "stop", "round": self.round, "model_version": self.model_version,
                    "reason": f"all {self.config.communication_rounds} rounds are done"}
        if self._owes_answer(node.node_id):
            c = self.config
            return {"action": "train", "round": self.round, "model_version": self.model_version,
                    "model": c.model, "dataset": c.dataset,
                    "deadline_s": round(self._deadline() - self._clock(), 3),
                    "settings": {"local_epochs": c.local_epochs, "batch_size": c.batch_size,
                                 "learning_rate": c.learning_rate, "momentum": c.momentum,
                                 "seed": c.seed}}
        return {"action": "wait", "round": self.round, "model_version": self.model_version,
                "state": self.phase.value}

    def wait_for_task(self, node: Node, wait: float) -> dict:
        """The node's task; while it is "wait", block up to ``wait`` seconds for a change (long poll)."""
        deadline = self._clock() + wait
        with self._changed:
            node.polling += 1
            try:
                while True:
                    task = self._task(node)
                    remaining = deadline - self._clock()
                    if task["action"] != "wait" or remaining <= 0 or self._stop.is_set() or node.left:
                        return task
                    self._changed.wait(min(remaining, 1.0))
            finally:
                node.polling -= 1
                if not node.left:
                    self._touch(node)

    # ------------------------------------------------------------------ updates

    def _check_can_submit(self, node: Node, round_number: int) -> None:
        if self.phase != Phase.TRAINING or round_number != self.round:
            raise Conflict("stale_round", f"round {round_number} is not open; the current round is "
                           f"{self.round} ({self.phase.value})", current_round=self.round,
                           state=self.phase.value)
        if node.node_id in self.updates:
            raise Conflict("duplicate_update", f"node {node.node_id} already submitted an update for round "
                           f"{round_number}", current_round=self.round, state=self.phase.value)
        if node.node_id not in self.participants:
            raise Conflict("not_participant", f"node {node.node_id} is not a participant of round "
                           f"{round_number}; wait for the next round", current_round=self.round,
                           state=self.phase.value)

    def submit_update(self, node: Node, round_number: int, metadata: Mapping, data: bytes) -> AcceptedUpdate:
        """Validate and durably store one update. Nothing is changed unless it is accepted.

        The bytes are written and fsynced, then the update's row commits; only then does this return (and
        the API answer 202), so an acknowledged update survives a crash of the coordinator.

        Parameters
        ----------
        metadata : validated metadata: ``num_samples`` (int >= 1) and optional ``train_loss``,
            ``train_accuracy``, ``train_seconds`` (floats).
        data : the serialised state_dict.

        Raises
        ------
        Conflict
            Stale round, duplicate submission, or a node that is not a participant.
        UpdateRejected
            Undecodable payload, keys/shapes/dtypes that differ from the global model, non-finite values.
        """
        with self._lock:
            self._check_can_submit(node, round_number)
            reference = self.global_state
        update = bytes_to_state_dict(data)
        check_compatible(update, reference)
        limit = self.config.max_update_norm
        norm = delta_norm(update, reference) if limit > 0 else 0.0
        del update
        if norm > limit:
            raise UpdateNormTooLarge(f"the change from the global model has L2 norm {norm:.4g}, above "
                                     f"MAX_UPDATE_NORM={limit:g}")
        round_dir = self._updates_dir / f"round_{round_number}"
        round_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{node.node_id}.", suffix=".tmp", dir=round_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        final = round_dir / f"{node.node_id}.pt"
        with self._changed:
            try:
                self._check_can_submit(node, round_number)
            except Conflict:
                os.unlink(tmp)
                raise
            os.replace(tmp, final)
            fsync_directory(round_dir)  # the rename itself survives a power loss before we answer 202
            accepted = AcceptedUpdate(node.node_id, int(metadata["num_samples"]), str(final),
                                      metadata.get("train_loss"), metadata.get("train_accuracy"),
                                      metadata.get("train_seconds"), time.time())
            record = node.record()
            record.update(updates_submitted=node.updates_submitted + 1, last_train_loss=accepted.train_loss,
                          last_train_accuracy=accepted.train_accuracy)
            self.store.add_update(round_number, node.node_id, asdict(accepted), record)
            self.updates[node.node_id] = accepted
            self.rejected.pop(node.node_id, None)
            node.updates_submitted += 1
            node.last_train_loss, node.last_train_accuracy = accepted.train_loss, accepted.train_accuracy
            self._touch(node)
            self._changed.notify_all()
            log.info("round %d: update %d/%d from %s (%d samples, change norm %s)", round_number,
                     len(self.updates), len(self.participants), node.name, accepted.num_samples,
                     f"{norm:.3g}" if limit > 0 else "not checked")
        return accepted

    def record_rejection(self, node: Node, round_number: int, error: str, reason: str) -> None:
        """Count a refused update (400/413) as this node's answer for the open round, and log it.

        The round then stops waiting for the node and the node is not asked to train again in this attempt
        (sending the same work again would be refused again). Refusals for other rounds only count.
        """
        with self._changed:
            self.rejections[error] = self.rejections.get(error, 0) + 1
            counts = self.phase == Phase.TRAINING and round_number == self.round and self._owes_answer(node.node_id)
            if counts:
                self.rejected[node.node_id] = reason
                self._changed.notify_all()
        log.warning("round %d: refused the update of %s (%s: %s)%s", round_number, node.name, error, reason,
                    "" if counts else "; not a pending participant")

    # ------------------------------------------------------------------ the state machine

    def _deadline(self) -> float:
        return self.round_started_mono + self.config.round_timeout

    def _online_ids(self, now: float) -> list[str]:
        return [n.node_id for n in sorted(self.nodes.values(), key=lambda n: n.name) if self._is_online(n, now)]

    def _open_round(self, number: int, attempt: int, now: float, reason: str) -> None:
        """Open round ``number`` (attempt ``attempt``) with sampled online nodes; the caller persists."""
        online = self._online_ids(now)
        c = self.config
        self.round, self.round_attempt, self.phase = number, attempt, Phase.TRAINING
        self.participants = sample_participants(online, c.client_fraction, c.min_nodes_to_start, c.seed,
                                                number, attempt)
        self.updates = OrderedDict()
        self.rejected = {}
        if attempt > 1:  # the files of the attempt that failed (their rows go with the start_round commit)
            shutil.rmtree(self._updates_dir / f"round_{number}", ignore_errors=True)
        self.round_started_mono = now
        if attempt == 1:
            self.round_started_wall = time.time()
        log.info("round %d/%d started (%s) with %d of %d online nodes: %s", number, c.communication_rounds,
                 reason, len(self.participants), len(online),
                 ", ".join(self.nodes[i].name for i in self.participants))

    def _enter_waiting(self) -> None:
        self.phase = Phase.WAITING
        self.participants = []
        self._last_wait_log = -math.inf

    def tick(self) -> None:
        """Advance the state machine by at most one step; aggregates outside the lock when a round closes."""
        with self._changed:
            now = self._clock()
            if self.phase == Phase.WAITING:
                self._tick_waiting(now)
                return
            if self.phase == Phase.AGGREGATING:  # a restart in the middle of aggregation: do it again
                if self._aggregating:
                    return
                log.info("round %d: aggregating the %d stored updates again after a restart", self.round,
                         len(self.updates))
            elif self.phase != Phase.TRAINING or not self._round_closes(now):
                return
            self._aggregating = True
            updates = list(self.updates.values())
            reference = self.global_state
            number, num_participants = self.round, len(self.participants)
            self._changed.notify_all()
        try:
            self._aggregate(number, num_participants, updates, reference)
        finally:
            self._aggregating = False

    def _tick_waiting(self, now: float) -> None:
        if now < self._not_before:
            return
        online = len(self._online_ids(now))
        if online >= self.config.min_nodes_to_start:
            self._open_round(self.round + 1, 1, now, f"{online} nodes online")
            self.store.start_round(self._run_values())
            self._changed.notify_all()
        elif now - self._last_wait_log >= WAITING_LOG_EVERY:
            self._last_wait_log = now
            log.info("waiting for nodes: %d online, %d needed to start round %d", online,
                     self.config.min_nodes_to_start, self.round + 1)

    def _round_closes(self, now: float) -> bool:
        """Whether the open round closes now; restarts it (and returns False) when too few updates came."""
        missing = [i for i in self.participants if i not in self.updates]
        live_missing = [i for i in missing if i not in self.rejected and self._is_online(self.nodes[i], now)]
        timed_out = now >= self._deadline()
        if live_missing and not timed_out:
            return False
        if len(self.updates) < self.config.min_updates:
            why = (f"ROUND_TIMEOUT={self.config.round_timeout:g}s passed" if timed_out else
                   "every participant still online has answered")
            log.warning("round %d: %s with %d of MIN_UPDATES=%d updates; starting it again", self.round, why,
                        len(self.updates), self.config.min_updates)
            if self.rejected and len(self.rejected) + len(self.updates) == len(self.participants):
                self._refused_streak += 1
                delay = min(self.config.round_timeout, 2.0 ** self._refused_streak)
                log.error("round %d: the coordinator refused %d of the updates (%s); check the training settings "
                          "(e.g. --learning-rate) and MAX_UPDATE_BYTES; next attempt in %.0fs", self.round,
                          len(self.rejected), "; ".join(sorted(set(self.rejected.values())))[:500], delay)
                self._not_before = now + delay
                self.round -= 1  # the next round to open is this one again, after the back-off
                self._enter_waiting()
            elif len(self._online_ids(now)) >= self.config.min_nodes_to_start:
                self._open_round(self.round, self.round_attempt + 1, now, f"attempt {self.round_attempt + 1}")
            else:
                self.round -= 1  # the next round to open is this one again
                self._enter_waiting()
            self.store.start_round(self._run_values())
            self._changed.notify_all()
            return False
        if missing:
            log.warning("round %d: closing with %d of %d updates (%s); missing: %s", self.round,
                        len(self.updates), len(self.participants),
                        "deadline passed" if timed_out else "the others are offline",
                        ", ".join(self.nodes[i].name for i in missing))
        self.phase = Phase.AGGREGATING
        self.store.put(self._run_values())
        return True

    def _aggregate(self, number: int, num_participants: int, updates: list[AcceptedUpdate],
                   reference) -> None:
        t0 = time.perf_counter()
        c = self.config
        acc = FedAvgAccumulator(reference) if c.aggregation == "fedavg" else None  # streams: one model in memory
        loaded = []  # the robust rules need every update at once
        clipped = 0
        updates = sorted(updates, key=lambda u: u.node_id)  # a fixed order: the same run, the same bits
        for u in list(updates):
            try:
                with open(u.path, "rb") as f:
                    state = bytes_to_state_dict(f.read())
                check_compatible(state, reference)
            except (OSError, UpdateRejected) as exc:  # the stored file was lost or damaged on disk
                log.error("round %d: cannot read the stored update of %s (%s); leaving it out", number,
                          u.node_id, exc)
                updates.remove(u)
                continue
            if c.clip_norm > 0:
                state, scale = clip_update(state, reference, c.clip_norm)
                clipped += scale < 1.0
            if acc is not None:
                acc.add(state, u.num_samples)
            else:
                loaded.append((state, u.num_samples))
            del state
        if not updates:
            with self._changed:
                log.error("round %d: no stored update could be read; starting the round again", number)
                self._open_round(number, self.round_attempt + 1, self._clock(), "stored updates unreadable")
                self.store.start_round(self._run_values())
                self._changed.notify_all()
            return
        if acc is not None:
            new_state = acc.result()
        else:
            new_state = aggregate(loaded, reference, c.aggregation, trim_fraction=c.trim_fraction)
        del acc, loaded
        if clipped:
            log.info("round %d: clipped %d of %d updates to CLIP_NORM=%g", number, clipped, len(updates),
                     c.clip_norm)
        t1 = time.perf_counter()
        test_loss = test_accuracy = None
        if self._evaluator is not None:
            try:
                test_loss, test_accuracy = self._evaluator(new_state)
            except Exception:  # noqa: BLE001 - a pluggable evaluator must not stop the run; logged in full
                log.exception("round %d: evaluation failed; the round is recorded without test metrics", number)
            if test_loss is not None and not (math.isfinite(test_loss) and math.isfinite(test_accuracy)):
                log.warning("round %d: the global model's test loss is %s (the model diverged); recorded as "
                            "unknown", number, test_loss)
                test_loss = None
        t2 = time.perf_counter()
        record = RoundRecord(
            round=number, test_loss=test_loss, test_accuracy=test_accuracy, num_updates=len(updates),
            num_samples=sum(u.num_samples for u in updates), num_participants=num_participants,
            node_ids=[u.node_id for u in updates], started_at=self.round_started_wall, finished_at=0.0,
            duration_s=0.0, aggregation_s=t1 - t0, evaluation_s=t2 - t1,
            mean_train_loss=_mean(u.train_loss for u in updates),
            max_train_seconds=max((u.train_seconds for u in updates if u.train_seconds is not None),
                                  default=None))
        new_bytes = state_dict_to_bytes(new_state)
        atomic_write_bytes(self._global_path(number), new_bytes)
        failpoints.hit("aggregate.before_checkpoint")
        if self.config.save_model:
            try:
                self._save_checkpoint(number, new_state, record)
            except OSError as exc:
                log.error("round %d: could not save the global model in %s: %s", number,
                          self.config.models_dir, exc)
        failpoints.hit("aggregate.before_commit")
        with self._changed:
            self._commit_round(number, new_state, new_bytes, record, updates)
        shutil.rmtree(self._updates_dir / f"round_{number}", ignore_errors=True)
        for old in self._global_dir.glob("model_v*.pt"):
            if old != self._global_path(number):
                old.unlink(missing_ok=True)

    def _commit_round(self, number: int, new_state, new_bytes: bytes, record: RoundRecord,
                      updates: list[AcceptedUpdate]) -> None:
        """Make round ``number``'s aggregate the global model and open what comes next, in one transaction."""
        self.global_state, self.global_bytes = new_state, new_bytes
        self.model_version = number
        record.finished_at = time.time()
        record.duration_s = record.finished_at - self.round_started_wall
        self.history.append(record)
        contributors = {}
        for u in updates:
            node = self.nodes.get(u.node_id)
            if node is not None:
                node.rounds_contributed.append(number)
                contributors[node.node_id] = node.record()
        self.updates = OrderedDict()
        self._refused_streak = 0
        now = self._clock()
        if number >= self.config.communication_rounds:
            self.phase = Phase.FINISHED
            self.participants = []
        elif len(self._online_ids(now)) >= self.config.min_nodes_to_start:
            self._open_round(number + 1, 1, now, "previous round done")
        else:
            self._enter_waiting()
        self.store.finish_round(number, asdict(record), self._run_values(), contributors)
        acc_text = "n/a" if record.test_accuracy is None else f"{record.test_accuracy:.4f}"
        loss_text = "n/a" if record.test_loss is None else f"{record.test_loss:.4f}"
        log.info("round %d/%d done: %d updates, %d samples, test accuracy %s, test loss %s, %.1fs",
                 number, self.config.communication_rounds, record.num_updates, record.num_samples,
                 acc_text, loss_text, record.duration_s)
        if self.phase == Phase.FINISHED:
            log.info("all %d rounds done; telling workers to stop", number)
        self._changed.notify_all()

    def _save_checkpoint(self, number: int, state_dict, record: RoundRecord) -> None:
        checkpoint = {"format": CHECKPOINT_FORMAT, "model_name": self.config.model, "round": number,
                      "state_dict": state_dict, "test_loss": record.test_loss,
                      "test_accuracy": record.test_accuracy, "config": self.config.public_dict()}
        data = torch_save_bytes(checkpoint)
        models = Path(self.config.models_dir)
        atomic_write_bytes(models / f"global_model_round_{number}.pt", data)
        failpoints.hit("checkpoint.between_files")
        atomic_write_bytes(models / "global_model.pt", data)

    # ------------------------------------------------------------------ driver thread

    def start(self) -> None:
        """Start the driver thread that calls :meth:`tick` (every 0.2 s, or at once on a change)."""
        if self._driver is None:
            self._driver = threading.Thread(target=self._drive, name="round-driver", daemon=True)
            self._driver.start()

    def _drive(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - last resort: the driver thread must outlive any bug
                log.exception("the round driver failed; trying again in 1 s")
                self._stop.wait(1.0)
            with self._changed:
                self._changed.wait(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the driver thread (waits for an aggregation in progress) and wake long polls."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._driver is not None:
            self._driver.join(timeout)
            self._driver = None

    @property
    def finished(self) -> bool:
        return self.phase == Phase.FINISHED

    def all_told_to_stop(self) -> bool:
        """True when the run is finished and every node still online has been told to stop."""
        with self._lock:
            now = self._clock()
            return self.finished and all(n.stop_sent or not self._is_online(n, now) for n in self.nodes.values())

    # ------------------------------------------------------------------ monitors

    def status(self) -> dict:
        """A JSON-ready snapshot for monitors (see docs/API.md for the fields)."""
        with self._lock:
            now = self._clock()
            nodes = [{
                "node_id": n.node_id, "name": n.name, "device": n.device, "status": self.node_status(n, now),
                "num_samples": n.num_samples, "updates_submitted": n.updates_submitted,
                "rounds_contributed": list(n.rounds_contributed),
                "last_train_loss": n.last_train_loss, "last_train_accuracy": n.last_train_accuracy,
                "last_seen_s_ago": round(max(0.0, now - n.last_seen_mono), 3),
                "last_heartbeat": n.last_seen_wall, "registered_at": n.registered_at,
                "system_info": n.system_info,
            } for n in sorted(self.nodes.values(), key=lambda n: n.name)]
            in_round = self.phase in (Phase.TRAINING, Phase.AGGREGATING)
            return {
                "api_version": 1, "run_id": self.run_id, "state": self.phase.value, "round": self.round,
                "total_rounds": self.config.communication_rounds, "model_version": self.model_version,
                "model": self.config.model, "dataset": self.config.dataset,
                "aggregation": self.config.aggregation,
                "min_nodes_to_start": self.config.min_nodes_to_start,
                "client_fraction": self.config.client_fraction, "min_updates": self.config.min_updates,
                "current_round": {
                    "round": self.round, "participants": list(self.participants),
                    "updates_received": len(self.updates), "updates_refused": len(self.rejected),
                    "attempt": self.round_attempt,
                    "elapsed_s": round(now - self.round_started_mono, 3),
                    "timeout_s": self.config.round_timeout,
                } if in_round else None,
                "updates_refused_total": dict(self.rejections),
                "requests_refused_total": dict(self.refusals),
                "nodes": nodes,
                "history": [asdict(r) for r in self.history],
            }


def _remove_stale_temporaries(directories) -> None:
    """Delete ``.*.tmp`` files that an interrupted atomic write left behind (never loaded)."""
    for directory in directories:
        if directory.is_dir():
            for leftover in list(directory.glob(".*.tmp")) + list(directory.glob("*/.*.tmp")):
                leftover.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by the coordinator (weights-only, never runs code).

    Returns a dict with ``format``, ``model_name``, ``round``, ``state_dict``, ``test_loss``,
    ``test_accuracy`` and ``config``.

    Raises
    ------
    ValueError
        If the file is not such a checkpoint.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return obj
