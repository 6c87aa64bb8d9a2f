"""The coordinator's state directory (TEMP_DIR): what a run keeps there, and starting anew or resuming.

Layout: ``coordinator.sqlite3`` (the database, :mod:`.store`), ``updates/`` (the update spool, :mod:`.spool`),
``global/`` (the resume copies of the global model, :mod:`.checkpoints`), ``credentials.json`` and the
generated ``<kind>_token`` files (:mod:`.credentials`), ``archive/`` (runs set aside by ``--fresh``).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

from config import RUN_FIELDS, Config
from fedrest.server.store import RunStore

log = logging.getLogger("fl.federation")

DB_NAME = "coordinator.sqlite3"
UPDATES = "updates"
GLOBAL = "global"


def archive_run(temp_dir: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> Path | None:
    """Move a stored run (database, updates, global models, and the checkpoints ``global_model*.pt`` in
    ``models_dir``) to ``TEMP_DIR/archive/<time>/``; None if there is none."""
    temp = Path(temp_dir)
    parts = [p for p in (temp / DB_NAME, temp / (DB_NAME + "-wal"), temp / (DB_NAME + "-shm"),
                         temp / UPDATES, temp / GLOBAL) if p.exists()]
    if models_dir is not None and parts:
        parts += sorted(Path(models_dir).glob("global_model*.pt"))
    if not parts:
        return None
    target = temp / "archive" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    target.mkdir(parents=True)
    for part in parts:
        os.replace(part, target / part.name)
    return target


def stored_run_config(temp_dir: str | os.PathLike) -> dict | None:
    """The configuration a stored run was started with (its public fields), or None when there is no run.

    Raises
    ------
    StoreError
        If the database cannot be read.
    """
    path = Path(temp_dir) / DB_NAME
    if not path.exists():
        return None
    store = RunStore(path)
    try:
        return store.get("config")
    finally:
        store.close()


def resume_config(cfg: Config, stored: dict | None) -> Config:
    """``cfg`` with the run-defining settings (config.RUN_FIELDS) of a stored run; logs the ones it overrides."""
    if not stored:
        return cfg
    changes = {k: stored[k] for k in RUN_FIELDS if k in stored and stored[k] != getattr(cfg, k)}
    if changes:
        log.warning("resuming a stored run: keeping its settings %s (start with --fresh for a new run)",
                    ", ".join(f"{k}={v!r}" for k, v in changes.items()))
    return cfg.replace(**changes)
