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
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from config import ALIASES, RUN_FIELDS, Config, flag_name
from fedrest.privacy import PrivacySettings
from fedrest.server.store import RunStore

log = logging.getLogger("fl.federation")

DB_NAME = "coordinator.sqlite3"
LOCK_NAME = "coordinator.lock"
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
    target = new_archive_dir(temp)
    for part in parts:
        os.replace(part, target / part.name)
    return target


def new_archive_dir(temp_dir: str | os.PathLike, suffix: str = "") -> Path:
    """A new, empty ``TEMP_DIR/archive/<time>-<random><suffix>/`` (created here)."""
    target = Path(temp_dir) / "archive" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}{suffix}"
    target.mkdir(parents=True)
    return target


class StartRefused(Exception):
    """The coordinator will not start on this state directory as asked; the message says why and what to do."""


class RunFinished(StartRefused):
    """The stored run is finished; ``stored`` is it (the caller says how to start a new one)."""

    def __init__(self, stored: "StoredRun", temp_dir) -> None:
        super().__init__(f"{describe(stored, temp_dir)}: that run is finished")
        self.stored = stored


class StateDirLock:
    """One coordinator per state directory: an exclusive ``flock`` on ``TEMP_DIR/coordinator.lock``, taken
    before anything else touches the directory and held until the process ends (the kernel releases it then,
    even after kill -9). The file says who holds it, so that a second coordinator can name it.

    Where ``fcntl`` does not exist (Windows) nothing is locked and a warning says so.
    """

    def __init__(self, temp_dir: str | os.PathLike) -> None:
        self.path = Path(temp_dir) / LOCK_NAME
        self._file = None

    def acquire(self, holder: str) -> None:
        """Take the lock and write ``holder`` (who we are) into the file.

        Raises
        ------
        StartRefused
            When another process holds it (the message names that process and what to do).
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            log.warning("cannot lock %s on this platform: make sure only one coordinator uses it", self.path.parent)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "another process"
            f.close()
            raise StartRefused(f"{self.path.parent} is in use by another coordinator ({other}). Stop that one, "
                               "or give this one its own --temp-dir (and --port)") from None
        self._file = f
        self.describe(holder)

    def release(self) -> None:
        """Give the lock up (closing the file releases the ``flock``), as launch.py does once it has set the
        previous run aside, before its coordinator takes the lock."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def describe(self, holder: str) -> None:
        """Replace what the lock file says about its holder (for example once the port is known)."""
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(holder + "\n")
            self._file.flush()


@dataclass(frozen=True)
class StoredRun:
    """What a stored run is: its id, settings, phase, round, completed rounds (``model_version``)."""

    run_id: str
    config: dict
    phase: str
    round: int
    model_version: int

    @property
    def total_rounds(self) -> int:
        return int(self.config.get("communication_rounds", 0))


def stored_run(temp_dir: str | os.PathLike) -> StoredRun | None:
    """The run stored in ``temp_dir``, or None when there is none.

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
        if store.is_empty():
            return None
        return StoredRun(store.get("run_id"), store.get("config") or {}, store.get("phase"), store.get("round"),
                         store.get("model_version"))
    finally:
        store.close()


FRESH_WITHOUT_ID = ("?", "true", "1", "yes", "on")  # --fresh given without the id of the run to set aside


def prepare_start(cfg: Config, explicit: Collection[str] | None = None, resume_finished: bool = True) -> Config:
    """Set a stored run aside (``--fresh=RUN_ID``) or work out the settings of the run to resume.

    ``--fresh`` names the run it sets aside, so a command that is run again after a restart (with the same
    ``--fresh``) resumes the new run instead of throwing it away. A resumed run keeps the settings it started
    with (config.RUN_FIELDS), unless it has completed no round yet: then the new ones replace them.
    ``explicit`` are the fields the command line or environment gave; one that differs from a run's settings
    after its first round is refused (None: such differences are only logged). With ``resume_finished`` False,
    a finished run is not resumed (a command line that did not mean to serve it).

    Raises
    ------
    StartRefused
        ``--fresh`` without a run id while a run is stored, or settings given that differ from those of a run
        that has completed rounds; :class:`RunFinished` for a finished run when ``resume_finished`` is False.
    StoreError
        If the stored run cannot be read.
    """
    stored = stored_run(cfg.temp_dir)
    if cfg.fresh is not None:
        if stored is None:
            log.info("--fresh: no stored run in %s; starting a new one", cfg.temp_dir)
        elif cfg.fresh in FRESH_WITHOUT_ID:
            raise StartRefused(f"--fresh needs the id of the run to set aside: {describe(stored, cfg.temp_dir)}. "
                               f"To start a new run instead, add --fresh={stored.run_id}")
        elif cfg.fresh == stored.run_id:
            archived = archive_run(cfg.temp_dir, cfg.models_dir)
            log.warning("--fresh=%s: the stored run was moved to %s; starting a new run", cfg.fresh, archived)
            stored = None
        else:
            log.warning("--fresh=%s: that run is no longer the stored one (it was set aside already); resuming "
                        "run %s. Leave --fresh out of the command from now on", cfg.fresh, stored.run_id)
    if stored is not None and stored.phase == "finished" and not resume_finished:
        raise RunFinished(stored, cfg.temp_dir)
    return cfg if stored is None else resume_settings(cfg, stored, explicit)


def describe(stored: StoredRun, temp_dir) -> str:
    """One line about a stored run: ``temp holds run 1a2b3c (training, 3/5 rounds done)``."""
    return (f"{temp_dir} holds run {stored.run_id} ({stored.phase}, {stored.model_version}/{stored.total_rounds} "
            "rounds done)")


def _flag(name: str) -> str:
    """The flag users type for a field: its short alias when it has one (``--rounds``)."""
    return (ALIASES.get(name) or [flag_name(name)])[0]


def resume_settings(cfg: Config, stored: StoredRun, explicit: Collection[str] | None = None) -> Config:
    """``cfg`` with the run-defining settings (config.RUN_FIELDS) of ``stored`` (see :func:`prepare_start`).

    Raises
    ------
    StartRefused
        When a field in ``explicit`` differs from the settings of a run that has completed rounds.
    """
    changes = {k: stored.config[k] for k in RUN_FIELDS if k in stored.config and stored.config[k] != getattr(cfg, k)}
    given = set(changes) if explicit is None else set(changes) & set(explicit)
    if stored.model_version == 0:  # nothing trained yet: what is given now replaces, the rest stays as stored
        if given:
            log.info("run %s has completed no round: it takes the new settings %s", stored.run_id,
                     ", ".join(f"{k}={getattr(cfg, k)!r}" for k in sorted(given)))
        return cfg.replace(**{k: v for k, v in changes.items() if k not in given})
    if not changes:
        return cfg
    conflicts = [k for k in changes if k in given] if explicit is not None else []
    if conflicts:
        was = " ".join(f"{_flag(k)}={stored.config[k]}" for k in conflicts)
        now = " ".join(f"{_flag(k)}={getattr(cfg, k)}" for k in conflicts)
        raise StartRefused(f"{describe(stored, cfg.temp_dir)} and was started with {was}; this command gives "
                           f"{now}. To resume that run, leave these settings out (or give its values); to start a "
                           f"new run instead, add --fresh={stored.run_id} (the old one moves to "
                           f"{Path(cfg.temp_dir) / 'archive'})")
    log.warning("resuming run %s: keeping its settings %s (to start a new run instead: --fresh=%s)", stored.run_id,
                ", ".join(f"{k}={v!r}" for k, v in changes.items()), stored.run_id)
    return cfg.replace(**changes)


def privacy_budget(config: Config) -> PrivacySettings | None:
    """The run's DP settings (None without DP); raises StartRefused when the epsilon budget allows no round at all."""
    privacy = PrivacySettings.of(config)
    if privacy is None:
        return None
    if privacy.rounds_allowed == 0:
        raise StartRefused(f"DP_EPSILON_BUDGET={config.dp_epsilon_budget:g} allows no round: one round spends "
                           f"epsilon {privacy.epsilon(1):.3g} at delta {config.dp_delta:g} (noise multiplier "
                           f"{config.dp_noise_multiplier:g}, client fraction {config.client_fraction:g}); raise the "
                           "budget or the noise multiplier, or lower the client fraction")
    if privacy.rounds_allowed < config.communication_rounds:
        log.warning("DP_EPSILON_BUDGET=%g allows %d of the %d rounds (epsilon %.3g after them, %.3g after one "
                    "more); the run stops there", config.dp_epsilon_budget, privacy.rounds_allowed,
                    config.communication_rounds, privacy.epsilon(privacy.rounds_allowed),
                    privacy.epsilon(privacy.rounds_allowed + 1))
    return privacy
