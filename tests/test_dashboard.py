"""The web dashboard in a real browser: Debian's Chromium driven by Playwright (no browser download).

Skipped, with the reason printed in the summary (pytest -ra), when Chromium or Playwright is missing; `make test`
installs both. With FL_REQUIRE_BROWSER=1 (set by `.ci/run`) a missing browser fails the test instead: CI never
passes without having looked at the dashboard.
"""

from __future__ import annotations

import os
import shutil

import pytest

from processes import MONITOR_TOKEN, FakeWorker, free_port, procs, status_client, try_status, wait_for  # noqa: F401

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


expect = None  # playwright.sync_api.expect, imported by the browser fixture (Playwright is optional)


def _missing(reason: str) -> None:
    """Skip the dashboard test for ``reason``, or fail it where FL_REQUIRE_BROWSER=1 (CI)."""
    if os.environ.get("FL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"FL_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(f"{reason}; the dashboard was not tested")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        _missing("no Chromium on this machine (apt-get install chromium)")
    global expect
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _missing("Playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def test_dashboard_shows_nodes_and_rounds_and_updates_live(browser, procs, tmp_path):
    port = free_port()
    procs.coordinator(port, "--rounds", "2", "--min-nodes", "2", "--no-eval", "--round-timeout", "120")
    wait_for(lambda: try_status(status_client(port)), 60, "the coordinator", procs)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: problems.append(f"off-site request {r.url}")
            if not r.url.startswith(f"http://127.0.0.1:{port}/") else None)
    page.goto(f"http://127.0.0.1:{port}/#token={MONITOR_TOKEN}")
    expect(page.locator("#state")).to_have_text("waiting_for_nodes", timeout=15000)

    a, b = FakeWorker(port, "alpha-node", 10), FakeWorker(port, "beta-node", 30)
    page.wait_for_selector("#nodes tbody tr:nth-child(2)", timeout=15000)
    rows = page.locator("#nodes tbody tr").all_inner_texts()
    assert any("alpha-node" in r for r in rows) and any("beta-node" in r for r in rows)
    expect(page.locator("#round")).to_have_text("1 / 2", timeout=15000)

    a.upload(1, 1.0, 1)
    b.upload(1, 2.0, 1)
    expect(page.locator("#round")).to_have_text("2 / 2", timeout=15000)
    page.screenshot(path=str(tmp_path / "dashboard_round2.png"), full_page=True)
    a.upload(2, 1.0, 1)
    b.upload(2, 2.0, 1)
    expect(page.locator("#state")).to_have_text("finished", timeout=15000)
    bars = page.evaluate("Chart.getChart('chart-updates').data.datasets[0].data")
    samples = page.evaluate("Chart.getChart('chart-updates').data.datasets[1].data")
    assert bars == [2, 2] and samples == [40, 40]
    assert page.evaluate("Chart.getChart('chart-accuracy').data.labels") == [1, 2]
    assert page.locator("#rounds-bar").evaluate("e => e.style.width") == "100%"
    assert page.locator("#privacy-box").is_hidden()  # no differential privacy in this run
    page.wait_for_timeout(5000)  # a few more refreshes: the charts keep their size (no resize loop)
    for chart in ("chart-accuracy", "chart-duration", "chart-updates", "chart-nodes"):
        assert page.locator(f"#{chart}").bounding_box()["height"] > 150, chart
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert problems == [], problems

    # a phone-sized screen: the page still fits (no horizontal scrolling of the page itself)
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(f"http://127.0.0.1:{port}/#token={MONITOR_TOKEN}")
    expect(phone.locator("#state")).to_have_text("finished", timeout=15000)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    phone.screenshot(path=str(tmp_path / "dashboard_phone.png"), full_page=True)


def test_dashboard_shows_the_privacy_spent(browser, procs):
    port = free_port()
    procs.coordinator(port, "--rounds", "3", "--min-nodes", "2", "--no-eval", "--round-timeout", "120",
                      "--client-fraction", "0.5", "--clip-norm", "1", "--dp-noise-multiplier", "1.0")
    client = status_client(port)
    wait_for(lambda: try_status(client), 60, "the coordinator", procs)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"http://127.0.0.1:{port}/#token={MONITOR_TOKEN}")
    expect(page.locator("#privacy")).to_have_text("ε 0.00 at δ 0.00001", timeout=15000)
    workers = {w.node_id: w for w in (FakeWorker(port, "alpha-node", 10), FakeWorker(port, "beta-node", 30))}
    status = wait_for(lambda: (lambda s: s if s and (s["state"] == "training" or s["model_version"] >= 1) else None)(
        try_status(client)), 30, "round 1", procs)
    if status["model_version"] == 0:  # Poisson sampling: none (then round 1 released the noise alone), one or both
        for node_id in status["current_round"]["participants"]:
            workers[node_id].upload(1, 0.5, 1)
    status = wait_for(lambda: (lambda s: s if s and s["model_version"] >= 1 else None)(try_status(client)), 30,
                      "round 1's commit", procs)
    assert status["history"][0]["epsilon"] > 0

    def shows_a_spent_epsilon():  # a later round sampling no node is released at once: any round's epsilon will do
        text = page.locator("#privacy").inner_text()
        history = (try_status(client) or {}).get("history", [])
        return any(text.startswith(f"ε {r['epsilon']:.2f} at δ") for r in history if r["epsilon"])
    wait_for(shows_a_spent_epsilon, 15, "the dashboard's epsilon", procs)


def test_dashboard_asks_for_a_token_and_reports_an_outage(browser, procs):
    port = free_port()
    procs.coordinator(port, "--rounds", "1", "--min-nodes", "1", "--no-eval")
    wait_for(lambda: try_status(status_client(port)), 60, "the coordinator", procs)
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_selector("#token-form:not([hidden])", timeout=15000)
    assert "Monitor token" in page.inner_text("#token-form")  # the token that opens the status, not the join one
    assert "monitor_token" in page.inner_text("#banner")  # and where to find it
    page.fill("#token", MONITOR_TOKEN)
    page.click("#token-form button")
    expect(page.locator("#state")).to_have_text("waiting_for_nodes", timeout=15000)
    procs.kill("coordinator")
    page.wait_for_selector("#banner:not([hidden])", timeout=20000)
    assert "unreachable since" in page.inner_text("#banner")
