"""Who may call what: Bearer tokens (join, monitor, admin, node) and the per-credential rate limits.

Workers register with the join token and then use their own node token; monitors and the dashboard read with
the monitor token; the operator uses the admin token. With ``--no-auth``, join and monitor access need no
token (admin access always does). Each call is counted against its credential's token bucket (429 with
Retry-After when empty); the per-address limit is counted once per request by the app (:func:`rate_limit`).
"""

from __future__ import annotations

import re

from flask import current_app, request

from fedrest.server.errors import UnknownNode
from fedrest.server.federation import Federation, Node
from fedrest.server.http_errors import ApiError
from fedrest.server.ratelimit import retry_after_header

MAX_TOKEN_LENGTH = 512  # characters of a Bearer token; longer ones are refused unread
NODE_ID = re.compile(r"[0-9a-f]{16}")


def federation() -> Federation:
    """The app's federation (``app.extensions["federation"]``)."""
    return current_app.extensions["federation"]


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip() or len(value) > MAX_TOKEN_LENGTH:
        return None
    return value.strip()


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def rate_limit(key: str, limiter_name: str = "credential_limiter", per: str = "credential") -> None:
    """Count one request against ``key``'s bucket of that limiter.

    Raises
    ------
    ApiError
        429 with Retry-After when the bucket is empty (counted as a refused request).
    """
    limiter = current_app.extensions[limiter_name]
    if limiter is None:
        return
    wait = limiter.acquire(key)
    if wait > 0:
        federation().count_refused_request("too_many_requests")
        raise ApiError(429, "too_many_requests", f"rate limit of {limiter.rate:g} requests/s per {per} "
                       f"exceeded; retry in {wait:.1f}s", headers={"Retry-After": retry_after_header(wait)},
                       retry_after_s=round(wait, 3))


def require_token(*kinds: str) -> str:
    """Check the Bearer token against the shared tokens of ``kinds`` (join, monitor, admin); returns the kind.

    Raises
    ------
    ApiError
        401 for a missing or wrong token, 429 past the credential's rate limit.
    """
    if current_app.config["FL_NO_AUTH"] and kinds != ("admin",):
        return kinds[0]
    token = _bearer()
    names = " or ".join(f"{k} token" for k in kinds)
    if token is None:
        raise _unauthorized(f"expected the header Authorization: Bearer <{names}>")
    credentials = current_app.extensions["credentials"]
    for kind in kinds:
        if credentials.verify(kind, token):
            if kind != "join":
                rate_limit(kind)
            return kind
    raise _unauthorized(f"wrong {names}")


def require_node() -> Node:
    """The node whose token is the Bearer token (it counts as alive from now).

    Raises
    ------
    ApiError
        401 for a missing or unknown node token, 429 past the node's rate limit.
    """
    token = _bearer()
    if token is None:
        raise _unauthorized("expected the header Authorization: Bearer <node token>")
    node = federation().authenticate(token)
    if node is None:
        raise _unauthorized("unknown, revoked or expired node token; register again")
    rate_limit("node:" + node.node_id)
    return node


def require_own_node(node_id: str) -> Node:
    """:func:`require_node` for a URL naming ``node_id``: a node may only act as itself.

    Raises
    ------
    UnknownNode
        404 for an id that no node has (checked first: the worker should register again).
    ApiError
        401 as :func:`require_node`; 403 when the token is another node's.
    """
    if not NODE_ID.fullmatch(node_id):
        raise UnknownNode(node_id)
    federation().get_node(node_id)
    node = require_node()
    if node.node_id != node_id:
        raise ApiError(403, "forbidden", "a node may only act as itself")
    return node
