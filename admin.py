"""Operator commands for a running coordinator (admin token): rotate tokens, ban and unban nodes.

    python admin.py rotate join|monitor|admin      # the old token stops working at once
    python admin.py ban NODE [--reason TEXT]        # NODE: a node id or name
    python admin.py unban NODE

Common flags: ``--coordinator-address`` (default 127.0.0.1:5000), ``--ca-cert`` for https, and the admin token
from ``--admin-token``, else env FL_ADMIN_TOKEN, else the file ``--temp-dir``/admin_token the coordinator wrote.
A rotated token is printed once and also written (mode 0600) to the coordinator's TEMP_DIR/<kind>_token.

Exit status: 0 done; 1 refused or unreachable (the message says why); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import config as config_module
from config import ADMIN_FIELDS
from fedrest.client import (CoordinatorClient, CoordinatorError, CoordinatorUnreachable, CoordinatorUntrusted,
                            make_session)
from fedrest.server.credentials import KINDS, token_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Operator commands for a running coordinator. The admin token: "
        "--admin-token, else env FL_ADMIN_TOKEN, else the file TEMP_DIR/admin_token.")
    config_module.add_arguments(parser, ADMIN_FIELDS)
    commands = parser.add_subparsers(dest="command", required=True)
    rotate = commands.add_parser("rotate", help="replace a shared token now")
    rotate.add_argument("kind", choices=KINDS)
    ban = commands.add_parser("ban", help="ban a node (by id or name)")
    ban.add_argument("node")
    ban.add_argument("--reason", default="", help="logged by the coordinator")
    unban = commands.add_parser("unban", help="let a banned node register again")
    unban.add_argument("node")
    return parser


def _admin_token(cfg, parser) -> str:
    if cfg.admin_token:
        return cfg.admin_token
    path = token_path(cfg.temp_dir, "admin")
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        parser.error(f"no admin token: pass --admin-token or FL_ADMIN_TOKEN, or run where {path} is readable ({exc})")
        raise  # pragma: no cover - parser.error exits


def main(argv=None) -> int:
    """Run one operator command; returns the exit status."""
    parser = build_parser()
    cfg, args = config_module.parse_config(parser, ADMIN_FIELDS, argv)
    token = _admin_token(cfg, parser)
    try:
        client = CoordinatorClient(cfg.coordinator_address, token=token,
                                   session=make_session(total_retries=2, ca_cert=cfg.ca_cert))
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        if args.command == "rotate":
            answer = client.rotate_token(args.kind)
            print(f"new {args.kind} token (the old one no longer works): {answer['token']}")
        elif args.command == "ban":
            answer = client.ban(args.node, args.reason)
            print(f"banned node {answer['name']} ({answer['node_id']})")
        else:
            answer = client.unban(args.node)
            print(f"unbanned node {answer['name']} ({answer['node_id']}); it may register again")
    except CoordinatorError as exc:
        print(f"error: refused: {exc.message} (HTTP {exc.status} {exc.error})", file=sys.stderr)
        return 1
    except (CoordinatorUnreachable, CoordinatorUntrusted) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
