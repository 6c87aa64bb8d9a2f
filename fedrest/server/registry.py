"""The node registry: who is registered, under which name and token digest, and who is alive.

Lock-free: the federation (:mod:`.federation`) calls it under its own lock and stores what changes. Times
``*_mono`` are the coordinator's monotonic clock, ``*_wall`` seconds since the epoch.

Liveness: a node is online while it has a long poll open or made any authenticated request within
NODE_TIMEOUT seconds, unless it said it leaves (DELETE) or was banned.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Collection

from fedrest.server.errors import Conflict, Forbidden, UnknownNode

log = logging.getLogger("fl.federation")


@dataclass
class Node:
    """A registered worker."""

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
    polling: int = 0  # long polls in progress in a thread (a node waiting in a poll is alive)
    parked: int = 0  # long polls parked without a thread (fedrest.server.long_polls)
    left: bool = False  # said it leaves (DELETE); offline until its next authenticated request
    banned: bool = False  # removed by the operator: no token works, its name cannot register
    stop_sent: bool = False
    eval_samples: int = 0  # examples held out for federated evaluation (0: it is never asked to evaluate)

    _DURABLE = ("node_id", "name", "device", "num_samples", "system_info", "token_hash", "registered_at",
                "updates_submitted", "rounds_contributed", "last_train_loss", "last_train_accuracy",
                "instance_id", "superseded", "left", "banned", "last_seen_wall", "eval_samples")

    def record(self) -> dict:
        """The fields that are stored. ``last_seen_wall`` is as fresh as the node's last stored change
        (registration, update, leave) or the coordinator's last clean stop, not every request."""
        return {k: getattr(self, k) for k in self._DURABLE}


class NodeRegistry:
    """Nodes by id, name and token digest.

    Parameters
    ----------
    node_timeout : seconds without a request before a node counts as offline.
    max_nodes : most registered nodes (banned ones included).
    """

    def __init__(self, node_timeout: float, max_nodes: int) -> None:
        self.node_timeout = node_timeout
        self.max_nodes = max_nodes
        self.nodes: dict[str, Node] = {}
        self._by_name: dict[str, str] = {}
        self._by_token: dict[str, str] = {}

    def load(self, records, now_mono: float, now_wall: float, expected: Collection[str] = ()) -> None:
        """Put stored nodes back after a restart.

        A node gets a grace of NODE_TIMEOUT to show it is alive when it was seen within NODE_TIMEOUT before
        (its stored ``last_seen_wall``) or is in ``expected`` (the participants of the open round); any other
        node (it left, or was last seen long ago) stays offline until its next request.
        """
        for record in records:
            record = dict(record)
            seen_wall = record.pop("last_seen_wall", None) or now_wall  # rows of earlier versions have none
            age = max(0.0, now_wall - seen_wall)
            alive = record["node_id"] in expected or age <= self.node_timeout
            self.add(Node(**record, last_seen_mono=now_mono if alive else now_mono - age,
                          last_seen_wall=now_wall if alive else seen_wall))

    def add(self, node: Node) -> None:
        """Index ``node`` by id, name and (unless banned) token digest."""
        self.nodes[node.node_id] = node
        self._by_name[node.name] = node.node_id
        if not node.banned:
            self._by_token[node.token_hash] = node.node_id

    def prepare_registration(self, name: str, device: str, num_samples: int, system_info: dict,
                             instance_id: str | None, token_hash: str, now_mono: float,
                             now_wall: float, eval_samples: int = 0) -> tuple[Node, bool]:
        """The node that registering ``name`` gives: a new one (not yet added: store it, then :meth:`add`
        it), or the existing one updated with the new token and facts. Returns (node, created).

        Raises
        ------
        Forbidden
            ``banned`` for a banned name; ``node_limit`` when MAX_NODES nodes are registered.
        Conflict
            ``name_in_use`` for a worker process that a later one with the same name replaced.
        """
        node_id = self._by_name.get(name)
        if node_id is not None and self.nodes[node_id].banned:
            raise Forbidden("banned", f"the operator banned the node {name!r}")
        if node_id is None:
            if len(self.nodes) >= self.max_nodes:
                raise Forbidden("node_limit", f"the federation is full: MAX_NODES={self.max_nodes} "
                                "nodes are registered")
            return Node(secrets.token_hex(8), name, device, num_samples, system_info, token_hash, now_wall,
                        now_mono, now_wall, instance_id=instance_id, eval_samples=eval_samples), True
        node = self.nodes[node_id]
        if instance_id is not None and instance_id in node.superseded:
            raise Conflict("name_in_use", f"another worker registered later as {name!r}; give every "
                           "worker its own --name", node_id=node_id)
        if instance_id != node.instance_id and node.instance_id is not None:
            node.superseded = (node.superseded + [node.instance_id])[-16:]
            if not node.left:  # a worker that left and came back is no news
                log.warning("node %s (%s): a new worker process took the name over", name, node_id)
        node.instance_id = instance_id
        self._by_token.pop(node.token_hash, None)
        node.device, node.num_samples, node.system_info = device, num_samples, system_info
        node.eval_samples = eval_samples
        node.token_hash = token_hash
        node.last_seen_mono, node.last_seen_wall = now_mono, now_wall
        node.stop_sent = node.left = False
        return node, False

    def mark_gone(self, name: str) -> Node | None:
        """The node registered as ``name`` counts as gone (offline, never sampled) until it registers again;
        returns it when this changed it (to store), else None."""
        node = self.nodes.get(self._by_name.get(name, ""))
        if node is None or node.left or node.banned:
            return None
        node.left = True
        return node

    def by_token(self, token_hash: str) -> Node | None:
        """The node holding the token with this digest, or None (banned nodes hold none)."""
        node_id = self._by_token.get(token_hash)
        return None if node_id is None else self.nodes[node_id]

    def get(self, node_id: str) -> Node:
        """Raises :class:`UnknownNode` for an unknown id."""
        try:
            return self.nodes[node_id]
        except KeyError:
            raise UnknownNode(node_id) from None

    def find(self, key: str) -> Node:
        """The node whose id or name is ``key``; raises :class:`UnknownNode`."""
        node = self.nodes.get(key) or self.nodes.get(self._by_name.get(key, ""))
        if node is None:
            raise UnknownNode(key, f"no node with id or name {key!r}")
        return node

    def ban(self, node: Node) -> None:
        """Revoke the node's token and mark it banned (and gone)."""
        node.banned = node.left = True
        self._by_token.pop(node.token_hash, None)

    def count_clients(self) -> int:
        """The federation's clients: registered nodes that are not banned (online or not; SCAFFOLD's N)."""
        return sum(1 for n in self.nodes.values() if not n.banned)

    def is_online(self, node: Node, now: float) -> bool:
        if node.left:
            return False
        return node.polling > 0 or node.parked > 0 or now - node.last_seen_mono <= self.node_timeout

    def online(self, now: float) -> set[str]:
        """Ids of the online nodes (no order: what a decision needs every tick)."""
        return {n.node_id for n in self.nodes.values() if self.is_online(n, now)}

    def online_ids(self, now: float) -> list[str]:
        """Ids of the online nodes, ordered by name (the order client sampling draws from)."""
        return [n.node_id for n in sorted(self.nodes.values(), key=lambda n: n.name) if self.is_online(n, now)]

    def sorted_by_name(self) -> list[Node]:
        return sorted(self.nodes.values(), key=lambda n: n.name)
