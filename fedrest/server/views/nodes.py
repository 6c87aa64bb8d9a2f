"""Workers' calls about themselves: register, heartbeat, leave, the next task, the global model (and SCAFFOLD's
global control variate)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, request

from fedrest.server import validation
from fedrest.server.auth import federation, require_node, require_own_node, require_token
from fedrest.server.errors import TaskMismatch
from fedrest.server.http_errors import ApiError
from fedrest.server.views import API

log = logging.getLogger("fl.coordinator")
bp = Blueprint("nodes", __name__, url_prefix=API)


@bp.post("/nodes")
def register():
    require_token("join")
    body = validation.registration()
    fed = federation()
    try:
        node, token, created = fed.register(**body)
    except TaskMismatch as exc:
        log.warning("refused the registration of %s: %s", body["name"], "; ".join(exc.details["differences"]))
        raise
    return jsonify({"node_id": node.node_id, "node_token": token, "name": node.name,
                    "heartbeat_interval": fed.config.heartbeat_interval,
                    "node_timeout": fed.config.node_timeout, "run_id": fed.run_id, "task": fed.task.name,
                    "model": fed.task.model_name, "dataset": fed.config.dataset}), (201 if created else 200)


@bp.post("/nodes/<node_id>/heartbeat")
def heartbeat(node_id: str):
    node = require_own_node(node_id)
    fed = federation()
    return jsonify({"node_id": node.node_id, "round": fed.round, "state": fed.phase.value,
                    "model_version": fed.model_version, "node_status": fed.node_status(node),
                    "heartbeat_interval": fed.config.heartbeat_interval})


@bp.delete("/nodes/<node_id>")
def leave(node_id: str):
    node = require_own_node(node_id)
    federation().leave(node)
    return jsonify({"node_id": node.node_id, "status": "offline"})


@bp.get("/task")
def task():
    """The node's next task. A long poll (``wait`` > 0) through the coordinator's server is parked without a
    thread (:mod:`fedrest.server.long_polls` reads ``fl.parked``); elsewhere the view waits in its thread."""
    node = require_node()
    wait = validation.long_poll_wait()
    scope = request.environ.get("asgi.scope")
    if scope is None or not scope.get("fl.long_poll"):
        return jsonify(federation().wait_for_task(node, wait))
    task, parked, signature = federation().poll_task(node, park=wait > 0)
    if parked:
        scope["fl.parked"] = (node.node_id, wait, signature)
    return jsonify(task)


@bp.get("/model")
def model():
    require_node()
    fed = federation()
    version, data = fed.model_bytes()
    return Response(data, mimetype="application/octet-stream",
                    headers={"X-Model-Version": str(version), "X-Model-Name": fed.task.model_name,
                             "Cache-Control": "no-store"})


@bp.get("/control-variate")
def control_variate():
    """SCAFFOLD's global control variate c of the current model version (a state_dict of the model's
    parameters); 404 for other strategies."""
    require_node()
    fed = federation()
    if not fed.strategy.uses_control_variates:
        raise ApiError(404, "no_control_variate", f"the strategy of this run, {fed.strategy.name}, has no control "
                                                  "variate (only scaffold has)")
    version, data = fed.control_variate_bytes()
    return Response(data, mimetype="application/octet-stream",
                    headers={"X-Model-Version": str(version), "Cache-Control": "no-store"})
