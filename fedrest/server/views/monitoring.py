"""What monitors read: health (no token), status and Prometheus metrics (monitor or admin token), the
dashboard page and the OpenAPI description (no token; the page asks for the monitor token itself)."""

from __future__ import annotations

from pathlib import Path

from dataclasses import asdict

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from fedrest.server import metrics, validation
from fedrest.server.auth import federation, require_token
from fedrest.server.status import STATUSES, status_json
from fedrest.server.views import API

ROOT = Path(__file__).resolve().parents[3]
STATIC_DIR = ROOT / "static"
OPENAPI_PATH = ROOT / "docs" / "openapi.json"

bp = Blueprint("monitoring", __name__)


@bp.get(API + "/health")
def health():
    fed = federation()
    return jsonify({"status": "ok", "api_version": 1, "state": fed.phase.value, "round": fed.round})


@bp.get(API + "/status")
def status():
    require_token("monitor", "admin")
    return jsonify(status_json(federation().snapshot()))


@bp.get(API + "/nodes")
def nodes():
    """Every node, a page at a time, by name (``offset``, ``limit`` <= 500, optional ``status``); /status lists
    only the featured ones when there are many."""
    require_token("monitor", "admin")
    offset, limit, status = validation.node_page_query(STATUSES)
    total, views = federation().node_page(offset, limit, status)
    return jsonify({"total": total, "offset": offset, "limit": limit, "status": status,
                    "nodes": [asdict(v) for v in views]})


@bp.get(API + "/openapi.json")
def openapi():
    """The OpenAPI 3 description of this API (docs/openapi.json); no token needed."""
    return current_app.response_class(OPENAPI_PATH.read_bytes(), mimetype="application/json")


@bp.get("/metrics")
def prometheus_metrics():
    """``GET /metrics``: Prometheus text format (monitor or admin token as Bearer, unless --no-auth)."""
    require_token("monitor", "admin")
    return Response(metrics.render(current_app.extensions["metrics_registry"]), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/")
def dashboard():
    """``GET /``: the live web dashboard (static page; it reads /api/v1/status with the token it is given)."""
    return current_app.response_class((STATIC_DIR / "dashboard.html").read_bytes(), mimetype="text/html",
                                      headers={"Cache-Control": "no-cache"})
