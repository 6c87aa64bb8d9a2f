"""Update uploads, ``POST /api/v1/rounds/<round>/updates`` (multipart: metadata JSON + state_dict file, and for
SCAFFOLD a control_variate file), and
federated evaluations of a global model, ``POST /api/v1/rounds/<round>/evaluation`` (JSON)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from fedrest.serialization import UpdateRejected
from fedrest.server import validation
from fedrest.server.auth import federation, require_node
from fedrest.server.views import API

bp = Blueprint("rounds", __name__, url_prefix=API)


@bp.post("/rounds/<int:round_number>/updates")
def submit_update(round_number: int):
    """202 once the update is fsynced and committed; a refused one (400/413) is the node's answer. A stale round,
    a duplicate (409) or all upload slots taken (503 busy, Retry-After) are answered before the body is read."""
    fed = federation()
    node = require_node()
    fed.check_can_submit(node, round_number)
    slots = current_app.extensions["upload_slots"]
    if not slots.try_acquire():
        fed.count_refused_request("busy")
        raise slots.busy()
    try:
        fed.count_received(request.content_length or 0)
        metadata, data, control = validation.update_upload(node, fed.config.max_update_bytes,
                                                           fed.strategy.uses_control_variates)
        accepted = fed.submit_update(node, round_number, metadata, data, control)
    except UpdateRejected as refusal:
        fed.record_refusal(node, round_number, refusal)
        raise
    finally:
        slots.release()
    return jsonify({"accepted": True, "round": round_number, "node_id": node.node_id,
                    "num_samples": accepted.num_samples}), 202


@bp.post("/rounds/<int:round_number>/evaluation")
def submit_evaluation(round_number: int):
    """202 once the worker's metrics of global model ``round_number`` on its held-out data are stored."""
    node = require_node()
    num_samples, metrics = validation.evaluation()
    federation().submit_evaluation(node, round_number, num_samples, metrics)
    return jsonify({"accepted": True, "round": round_number, "node_id": node.node_id}), 202
