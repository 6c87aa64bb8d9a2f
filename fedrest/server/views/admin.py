"""The operator's calls (admin token): rotate a shared token, ban and unban nodes (see admin.py)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from fedrest.server.auth import federation, require_token
from fedrest.server.credentials import KINDS
from fedrest.server.errors import UnknownNode
from fedrest.server.http_errors import ApiError
from fedrest.server.validation import MAX_NAME_LENGTH, json_object, short_text
from fedrest.server.views import API

bp = Blueprint("admin", __name__, url_prefix=API + "/admin")


@bp.post("/tokens/<kind>")
def rotate_token(kind: str):
    """Replace the join or monitor token (or the admin token itself) now; answers the new one once."""
    require_token("admin")
    if kind not in KINDS:
        raise ApiError(404, "not_found", f"no token kind {kind!r}; one of {', '.join(KINDS)}")
    token = current_app.extensions["credentials"].rotate(kind)
    return jsonify({"kind": kind, "token": token,
                    "note": "the old token no longer works; registered nodes keep their node tokens"})


@bp.post("/nodes/<key>/ban")
def ban(key: str):
    """Ban a node by id or name: its token stops working, it cannot register, its open update is dropped."""
    require_token("admin")
    reason = ""
    if request.content_length:
        reason = json_object().get("reason", "")
        if reason != "":
            reason = short_text(reason, "reason", MAX_NAME_LENGTH)
    node = federation().ban(_node_key(key), reason)
    return jsonify({"node_id": node.node_id, "name": node.name, "status": "banned"})


@bp.delete("/nodes/<key>/ban")
def unban(key: str):
    """Lift a ban (the node may register again with the join token)."""
    require_token("admin")
    node = federation().unban(_node_key(key))
    return jsonify({"node_id": node.node_id, "name": node.name, "status": "offline"})


def _node_key(key: str) -> str:
    if len(key) > MAX_NAME_LENGTH:
        raise UnknownNode(key, f"no node with id or name {key[:MAX_NAME_LENGTH]!r}...")
    return key
