"""Many nodes: /status counts them and lists the featured ones, GET /nodes pages through all of them, /metrics
and the monitors read the counts."""

from __future__ import annotations

import io

from rich.console import Console

from conftest import API, MONITOR, post_update
from fedrest.monitoring import node_counts
from fedrest.server.rounds import Phase
from fedrest.server.status import STATUS_NODES
from text_monitor import render

MANY = STATUS_NODES + 50


def _register_many(fed, count: int) -> list:
    return [fed.register(f"node-{i:04d}", "cpu", 100, {})[0] for i in range(count)]


def test_status_of_many_nodes_counts_them_and_lists_the_open_rounds_first(make_app):
    app = make_app(min_nodes_to_start=15, client_fraction=0.1)
    fed, client = app.extensions["federation"], app.test_client()
    nodes = _register_many(fed, MANY)
    fed.tick()
    participants = fed.state.participants
    assert fed.phase == Phase.TRAINING and len(participants) == 15
    first = min(participants, key=lambda i: fed.nodes[i].name)
    token = fed.register(fed.nodes[first].name, "cpu", 100, {})[1]  # its token, to send its update
    answer = post_update(client, {"headers": {"Authorization": f"Bearer {token}"}}, 1, fed.global_state)
    assert answer.status_code == 202, answer.get_json()
    fed.ban(next(n for n in reversed(nodes) if n.node_id not in participants).node_id)

    status = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert status["node_counts"] == {"total": MANY, "online": MANY - 15, "training": 14, "offline": 0, "banned": 1}
    assert status["nodes_listed"] == "featured"
    listed = [n["node_id"] for n in status["nodes"]]
    owing = sorted((i for i in participants if i != first), key=lambda i: fed.nodes[i].name)
    assert listed == owing + [first]  # the slowest first, then the rest of the round; nobody else is offline
    assert [n["status"] for n in status["nodes"]] == ["training"] * 14 + ["online"]
    assert len(status["current_round"]["participants"]) == 15


def test_get_nodes_pages_through_every_node_once_and_filters_by_status(make_app):
    app = make_app(min_nodes_to_start=10_000)
    fed, client = app.extensions["federation"], app.test_client()
    nodes = _register_many(fed, MANY)
    fed.leave(nodes[3])
    seen = []
    for offset in range(0, MANY, 40):
        page = client.get(f"{API}/nodes?offset={offset}&limit=40", headers=MONITOR).get_json()
        assert page["total"] == MANY and page["offset"] == offset
        seen += [n["name"] for n in page["nodes"]]
    assert seen == sorted(n.name for n in nodes)
    offline = client.get(f"{API}/nodes?status=offline", headers=MONITOR).get_json()
    assert offline["total"] == 1 and [n["node_id"] for n in offline["nodes"]] == [nodes[3].node_id]
    status = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert [n["node_id"] for n in status["nodes"]] == [nodes[3].node_id]  # no round open: the node lost
    for bad in ("limit=0", "limit=501", "offset=-1", "offset=x", "status=asleep"):
        answer = client.get(f"{API}/nodes?{bad}", headers=MONITOR)
        assert answer.status_code == 400 and answer.get_json()["error"] == "bad_request", bad
    assert client.get(f"{API}/nodes").status_code == 401


def test_few_nodes_are_all_listed(client, fed):
    _register_many(fed, 3)
    status = client.get(f"{API}/status", headers=MONITOR).get_json()
    assert status["nodes_listed"] == "all" and len(status["nodes"]) == 3
    assert status["node_counts"]["total"] == 3 and node_counts(status) == status["node_counts"]
    del status["node_counts"]  # what a monitor counts from an older coordinator's answer
    assert node_counts(status) == {"total": 3, "online": 3, "training": 0, "offline": 0, "banned": 0}


def test_metrics_and_the_text_monitor_read_the_counts_of_many_nodes(make_app):
    app = make_app(min_nodes_to_start=10_000)
    fed, client = app.extensions["federation"], app.test_client()
    nodes = _register_many(fed, MANY)
    fed.leave(nodes[0])
    text = client.get("/metrics", headers=MONITOR).get_data(as_text=True)
    assert f'fl_nodes{{status="online"}} {float(MANY - 1)}' in text and 'fl_nodes{status="offline"} 1.0' in text
    status = client.get(f"{API}/status", headers=MONITOR).get_json()
    console = Console(file=io.StringIO(), width=120, height=40)
    console.print(render(status))
    shown = console.file.getvalue()
    assert f"nodes ({MANY}: {MANY - 1} online, 1 offline)" in shown
