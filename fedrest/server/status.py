"""A typed snapshot of the federation for monitors, and the status JSON built from it.

:meth:`fedrest.server.federation.Federation.snapshot` takes a :class:`Snapshot` under the federation's lock;
``GET /api/v1/status`` answers :func:`status_json` of it (fields: docs/API.md) and ``GET /metrics`` reads the
same snapshot (:mod:`.metrics`).

Many nodes: the snapshot always counts the nodes by status (``node_counts``), one pass over the registry; it
lists every node only up to STATUS_NODES of them. Beyond, ``nodes`` holds the ones a monitor should see first
(:func:`featured_nodes`): the open round's nodes that still owe an answer (the slowest), then its other
participants, then the nodes most recently lost; the full list is paged by ``GET /api/v1/nodes``
(:func:`node_page`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from fedrest.server.rounds import RoundRecord


@dataclass(frozen=True)
class NodeView:
    """One node as monitors see it. ``status``: online, training, offline or banned."""

    node_id: str
    name: str
    device: str
    status: str
    num_samples: int
    updates_submitted: int
    rounds_contributed: list
    last_train_loss: float | None
    last_train_accuracy: float | None
    last_seen_s_ago: float  # seconds
    last_heartbeat: float  # wall clock of the last request, seconds since the epoch
    registered_at: float
    system_info: dict


@dataclass(frozen=True)
class OpenRound:
    """The round in training, aggregation or federated evaluation (then ``participants`` are the evaluators and
    ``updates_received`` the evaluations received)."""

    round: int
    participants: list  # node ids, the first STATUS_NODES of them
    num_participants: int  # all of them
    updates_received: int
    updates_refused: int
    attempt: int
    elapsed_s: float  # since this attempt opened (or since the coordinator restarted)
    timeout_s: float
    aggregation_error: str | None = None  # why the last aggregation of this round failed (it is tried again)
    aggregation_retry_in_s: float | None = None  # seconds until that next try


@dataclass(frozen=True)
class Snapshot:
    """The federation at one instant. Counters (``*_total``, bytes) count since this process started,
    except the history, which is the whole run's."""

    run_id: str
    state: str
    round: int
    total_rounds: int
    model_version: int
    task: str
    model: str
    dataset: str
    aggregation: str
    strategy: dict  # the strategy's name and settings (Strategy.describe)
    min_nodes_to_start: int
    client_fraction: float
    min_updates: int
    current_round: OpenRound | None
    updates_refused_total: dict  # error name -> refused update uploads
    requests_refused_total: dict  # error name -> other refused requests (rate limits)
    nodes: list  # of NodeView, by name
    history: list  # of RoundRecord, by round
    bytes_received: int  # update uploads
    bytes_sent: int  # global models served
    privacy: dict | None = None  # DP-FedAvg's settings and epsilon spent (PrivacySettings.describe); None: off
    node_counts: dict = field(default_factory=dict)  # "total" and each status -> number of nodes
    updates_submitted_total: int = 0  # updates accepted from every node, the whole run


def status_json(snapshot: Snapshot) -> dict:
    """The body of ``GET /api/v1/status`` (see docs/API.md)."""
    s = snapshot
    return {
        "api_version": 1, "run_id": s.run_id, "state": s.state, "round": s.round,
        "total_rounds": s.total_rounds, "model_version": s.model_version, "task": s.task, "model": s.model,
        "dataset": s.dataset, "aggregation": s.aggregation, "strategy": dict(s.strategy),
        "min_nodes_to_start": s.min_nodes_to_start,
        "client_fraction": s.client_fraction, "min_updates": s.min_updates,
        "current_round": None if s.current_round is None else asdict(s.current_round),
        "updates_refused_total": dict(s.updates_refused_total),
        "requests_refused_total": dict(s.requests_refused_total),
        "node_counts": dict(s.node_counts),
        "nodes_listed": "all" if len(s.nodes) == s.node_counts.get("total", 0) else "featured",
        "nodes": [asdict(n) for n in s.nodes],
        "history": [asdict(r) for r in s.history],
        "privacy": None if s.privacy is None else dict(s.privacy),
    }


STATUS_NODES = 100  # up to this many nodes, /status lists them all; beyond, the featured ones
STATUSES = ("online", "training", "offline", "banned")


def node_view(federation, node, now: float, status: str | None = None) -> NodeView:
    """How monitors see ``node`` at monotonic time ``now`` (call under the federation's lock)."""
    n = node
    return NodeView(n.node_id, n.name, n.device, status or federation.node_status(n, now), n.num_samples,
                    n.updates_submitted, list(n.rounds_contributed), n.last_train_loss, n.last_train_accuracy,
                    round(max(0.0, now - n.last_seen_mono), 3), n.last_seen_wall, n.registered_at, n.system_info)


def featured_nodes(federation, statuses: dict, now: float, limit: int = STATUS_NODES) -> list:
    """At most ``limit`` node ids: the open round's nodes that owe an answer, then its other nodes, then the
    offline nodes most recently seen (each group by name)."""
    st, nodes = federation.state, federation.registry.nodes
    expected = [i for i in st.expected_answers() if i in nodes]
    answered = st.evaluations if st.phase.value == "evaluating" else st.updates
    by_name = lambda ids: sorted(ids, key=lambda i: nodes[i].name)  # noqa: E731
    chosen = by_name(i for i in expected if i not in answered and i not in st.refused)[:limit]
    chosen += by_name(i for i in expected if i in answered or i in st.refused)[:limit - len(chosen)]
    if len(chosen) < limit:
        offline = [i for i, status in statuses.items() if status == "offline"]
        offline.sort(key=lambda i: -nodes[i].last_seen_mono)
        chosen += offline[:limit - len(chosen)]
    return chosen


def node_page(federation, now: float, offset: int, limit: int, status: str | None = None) -> tuple[int, list]:
    """(how many nodes match, the NodeViews of ``limit`` of them from ``offset``), by name; ``status``: only
    nodes with that status. Call under the federation's lock."""
    nodes = federation.registry.sorted_by_name()
    if status is not None:
        views = [(n, s) for n in nodes if (s := federation.node_status(n, now)) == status]
    else:
        views = [(n, None) for n in nodes]
    return len(views), [node_view(federation, n, now, s) for n, s in views[offset:offset + limit]]


def take_snapshot(federation, now: float) -> Snapshot:
    """A :class:`Snapshot` of ``federation`` at monotonic time ``now``; the caller holds its lock."""
    st, c = federation.state, federation.config
    registry = federation.registry
    statuses = {i: federation.node_status(n, now) for i, n in registry.nodes.items()}
    counts = Counter(statuses.values())
    node_counts = {"total": len(statuses), **{k: counts.get(k, 0) for k in STATUSES}}
    if len(statuses) <= STATUS_NODES:
        nodes = [node_view(federation, n, now, statuses[n.node_id]) for n in registry.sorted_by_name()]
    else:
        nodes = [node_view(federation, registry.nodes[i], now, statuses[i])
                 for i in featured_nodes(federation, statuses, now)]
    current = None
    if st.in_round:
        answered = st.evaluations if st.phase.value == "evaluating" else st.updates  # evaluators while evaluating
        failure = federation.driver.failure if st.phase.value == "aggregating" else None
        expected = st.expected_answers() or st.participants
        current = OpenRound(st.round, list(expected[:STATUS_NODES]), len(expected), len(answered),
                            len(st.refused), st.attempt, round(now - st.started_mono, 3), c.round_timeout,
                            None if failure is None else failure[0],
                            None if failure is None else round(max(0.0, failure[1] - now), 3))
    return Snapshot(federation.run_id, st.phase.value, st.round, c.communication_rounds, st.model_version,
                    federation.task.name, federation.task.model_name, c.dataset, c.aggregation,
                    federation.strategy.describe(), c.min_nodes_to_start,
                    c.client_fraction, c.min_updates, current,
                    dict(federation.updates_refused_total), dict(federation.requests_refused_total), nodes,
                    list(st.history), federation.traffic["bytes_received"], federation.traffic["bytes_sent"],
                    None if federation.privacy is None else federation.privacy.describe(st.model_version),
                    node_counts, sum(n.updates_submitted for n in registry.nodes.values()))


__all__ = ["NodeView", "OpenRound", "RoundRecord", "Snapshot", "featured_nodes", "node_page", "node_view",
           "status_json", "take_snapshot"]
