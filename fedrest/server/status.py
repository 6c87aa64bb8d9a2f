"""A typed snapshot of the federation for monitors, and the status JSON built from it.

:meth:`fedrest.server.federation.Federation.snapshot` takes a :class:`Snapshot` under the federation's lock;
``GET /api/v1/status`` answers :func:`status_json` of it (fields: docs/API.md) and ``GET /metrics`` reads the
same snapshot (:mod:`.metrics`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    participants: list
    updates_received: int
    updates_refused: int
    attempt: int
    elapsed_s: float  # since this attempt opened (or since the coordinator restarted)
    timeout_s: float


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
        "nodes": [asdict(n) for n in s.nodes],
        "history": [asdict(r) for r in s.history],
        "privacy": None if s.privacy is None else dict(s.privacy),
    }


def take_snapshot(federation, now: float) -> Snapshot:
    """A :class:`Snapshot` of ``federation`` at monotonic time ``now``; the caller holds its lock."""
    st, c = federation.state, federation.config
    nodes = [NodeView(n.node_id, n.name, n.device, federation.node_status(n, now), n.num_samples,
                      n.updates_submitted, list(n.rounds_contributed), n.last_train_loss, n.last_train_accuracy,
                      round(max(0.0, now - n.last_seen_mono), 3), n.last_seen_wall, n.registered_at, n.system_info)
             for n in federation.registry.sorted_by_name()]
    current = None
    if st.in_round:
        answered = st.evaluations if st.phase.value == "evaluating" else st.updates  # evaluators while evaluating
        current = OpenRound(st.round, list(st.expected_answers() or st.participants), len(answered),
                            len(st.refused), st.attempt, round(now - st.started_mono, 3), c.round_timeout)
    return Snapshot(federation.run_id, st.phase.value, st.round, c.communication_rounds, st.model_version,
                    federation.task.name, federation.task.model_name, c.dataset, c.aggregation,
                    federation.strategy.describe(), c.min_nodes_to_start,
                    c.client_fraction, c.min_updates, current,
                    dict(federation.updates_refused_total), dict(federation.requests_refused_total), nodes,
                    list(st.history), federation.traffic["bytes_received"], federation.traffic["bytes_sent"],
                    None if federation.privacy is None else federation.privacy.describe(st.model_version))


__all__ = ["NodeView", "OpenRound", "RoundRecord", "Snapshot", "status_json", "take_snapshot"]
