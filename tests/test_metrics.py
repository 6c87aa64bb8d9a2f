"""GET /metrics: Prometheus text format, parsed back with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from conftest import MONITOR, API, JOIN_TOKEN, bearer, filled_state_dict, post_update, register

JOIN = bearer(JOIN_TOKEN)


def scrape(client) -> dict:
    response = client.get("/metrics", headers=MONITOR)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_follow_the_run(make_app):
    app = make_app(min_nodes_to_start=2, communication_rounds=3, evaluator=lambda sd: (0.5, 0.875))
    client, fed = app.test_client(), app.extensions["federation"]
    before = scrape(client)
    assert before[("fl_rounds_completed_total", ())] == 0 and before[("fl_current_round", ())] == 0
    assert before[("fl_total_rounds", ())] == 3
    assert ("fl_test_accuracy", ()) not in before  # nothing evaluated yet
    a, b = register(client, "a", num_samples=10), register(client, "b", num_samples=10)
    fed.tick()
    model = client.get(f"{API}/model", headers=a["headers"])
    ok = post_update(client, a, 1, filled_state_dict(1.0, 1), {"num_samples": 10})
    bad = post_update(client, b, 1, filled_state_dict(float("nan"), 1), {"num_samples": 10})
    assert (ok.status_code, bad.status_code) == (202, 400)
    fed.tick()
    m = scrape(client)
    assert m[("fl_rounds_completed_total", ())] == 1 and m[("fl_current_round", ())] == 2
    assert m[("fl_updates_accepted_total", ())] == 1
    assert m[("fl_updates_rejected_total", (("reason", "invalid_update"),))] == 1
    assert m[("fl_nodes", (("status", "training"),))] == 2 and m[("fl_nodes", (("status", "offline"),))] == 0
    assert m[("fl_bytes_sent_total", ())] == len(model.data)
    assert m[("fl_bytes_received_total", ())] > 2 * len(model.data)  # two uploads of a model each
    assert m[("fl_test_accuracy", ())] == 0.875 and m[("fl_test_loss", ())] == 0.5
    assert m[("fl_round_duration_seconds_count", ())] == 1
    assert m[("fl_aggregation_duration_seconds_count", ())] == 1
    assert m[("fl_aggregation_duration_seconds_bucket", (("le", "+Inf"),))] == 1
    assert m[("fl_aggregation_duration_seconds_sum", ())] == fed.state.history[0].aggregation_s


def test_metrics_need_the_join_token(client):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer("wrong-token-xyz")).get_json()["error"] == "unauthorized"


def test_each_app_has_its_own_registry(make_app, tmp_path):
    first = make_app()
    register(first.test_client(), "only-in-first")
    second_fed = make_app(fresh=first.extensions["federation"].run_id).extensions["federation"]
    assert second_fed.nodes == {}
    assert scrape(first.test_client())[("fl_nodes", (("status", "online"),))] == 1


def test_dashboard_page_is_served_with_a_strict_content_security_policy(client):
    page = client.get("/")
    try:
        assert page.status_code == 200 and page.mimetype == "text/html"
        assert "static/vendor/chart.umd.min.js" in page.get_data(as_text=True)
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert page.headers["X-Content-Type-Options"] == "nosniff"
    finally:
        page.close()
    script = client.get("/static/vendor/chart.umd.min.js")
    try:
        assert script.status_code == 200 and b"Chart.js v4" in script.get_data()[:200]
    finally:
        script.close()
