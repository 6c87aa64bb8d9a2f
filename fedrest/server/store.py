"""Durable state of a coordinator's run in SQLite (stdlib sqlite3, WAL journal, synchronous=FULL).

What is stored (one database per run directory, ``TEMP_DIR/coordinator.sqlite3``):

- ``run``: one row of key/value pairs: run id, the configuration the run was started with, the phase, the
  round, its attempt and participants, the model version, when the round started (wall clock).
- ``nodes``: every registered node with the SHA-256 digest of its token (never the token).
- ``updates``: the accepted updates of the open round (metadata; the bytes are files next to the database).
- ``history``: one JSON record per completed round.

Every method runs in one transaction; a method returns only after the commit reached the disk, so what was
acknowledged survives ``kill -9`` and power loss. The caller serialises access (the federation's lock); the
connection may be used from any thread. A change that touches memory too opens :meth:`RunStore.transaction`
*before* it changes anything: the methods called inside it join that transaction.

Another process may hold the database's write lock (an operator's ``sqlite3`` shell, a backup). A write then
waits at most BUSY_TIMEOUT_S and raises :class:`StoreBusy`; for BUSY_HOLD_OFF_S after that, writes raise it at
once. So the federation's lock, under which writes run, is never held long while the database is blocked (the
API answers 503 ``store_busy`` with Retry-After; reads come from memory and keep answering).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger("fl.federation")

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 0.2  # the longest a write waits for another process's write lock on the database, seconds
BUSY_HOLD_OFF_S = 1.0  # after a write found the database locked, writes fail at once for this long, seconds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (round, node_id)
);
CREATE TABLE IF NOT EXISTS history (round INTEGER PRIMARY KEY, record TEXT NOT NULL);
"""


class StoreError(RuntimeError):
    """The database is from an incompatible version or unreadable."""


class StoreBusy(RuntimeError):
    """Another process holds the database's write lock: nothing was written; try again in ``retry_after_s``."""

    def __init__(self, path: Path, retry_after_s: float) -> None:
        super().__init__(f"the run database {path} is locked by another process (an sqlite3 shell or a backup "
                         "holding a write transaction?); nothing was written")
        self.retry_after_s = retry_after_s


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class RunStore:
    """Transactions on the run database at ``path`` (created with its schema when missing).

    Raises
    ------
    StoreError
        If the file exists but is not a database of this schema version.
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._closed = False
        self._clock = clock
        self._busy_until = -float("inf")  # monotonic time until which writes raise StoreBusy at once
        self._blocked_since: float | None = None  # when writes first found the database locked (this episode)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            version = self.get("schema_version")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable run database: {exc}") from None
        if version is None:
            self.put({"schema_version": SCHEMA_VERSION})
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, this coordinator reads {SCHEMA_VERSION}")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._closed = True

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction around a block: the database's write lock is taken now (``BEGIN IMMEDIATE``),
        so open it before changing memory; the store's methods called in the block join it; it commits (fsynced)
        when the block ends and rolls back if the block raises. Nested blocks join the outer one.

        Raises
        ------
        StoreBusy
            At once, when another process holds the write lock (waiting at most BUSY_TIMEOUT_S): nothing is
            written, and the block does not run.
        """
        with self._lock:
            if self._db.in_transaction:  # an outer block of this thread (the lock keeps other threads out)
                yield
                return
            self._begin()
            try:
                yield
            except BaseException:
                self._rollback()
                raise
            self._commit()

    def _begin(self) -> None:
        if self._clock() < self._busy_until:
            raise StoreBusy(self.path, self._busy_until - self._clock())
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc):
                raise
            raise self._blocked() from None
        if self._blocked_since is not None:
            log.warning("the run database is writable again after %.1f s", self._clock() - self._blocked_since)
            self._blocked_since = None

    def _blocked(self) -> StoreBusy:
        """Refuse writes at once for BUSY_HOLD_OFF_S (say so once per episode of a locked database); returns the
        StoreBusy to raise."""
        now = self._clock()
        self._busy_until = now + BUSY_HOLD_OFF_S
        busy = StoreBusy(self.path, BUSY_HOLD_OFF_S)
        if self._blocked_since is None:
            self._blocked_since = now
            log.warning("%s: requests that change the run are answered 503 until it is free", busy)
        return busy

    def _commit(self) -> None:
        try:
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:  # pragma: no cover - WAL: the write lock is ours since BEGIN
            self._rollback()
            if not _is_locked(exc):
                raise
            raise self._blocked() from None

    def _rollback(self) -> None:
        if self._db.in_transaction:  # SQLite may have rolled back by itself (a full disk, an I/O error)
            self._db.execute("ROLLBACK")

    def _transaction(self, statements: Iterable[tuple[str, tuple]]) -> None:
        with self.transaction():
            for sql, params in statements:
                self._db.execute(sql, params)

    # ------------------------------------------------------------------ run keys

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM run WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def is_empty(self) -> bool:
        """True when no run was ever started in this database."""
        return self.get("run_id") is None

    @staticmethod
    def _put_statements(values: dict) -> list[tuple[str, tuple]]:
        return [("INSERT INTO run (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                 (key, json.dumps(value))) for key, value in values.items()]

    def put(self, values: dict) -> None:
        """Set run keys (JSON values) in one transaction."""
        self._transaction(self._put_statements(values))

    # ------------------------------------------------------------------ nodes

    def save_node(self, node_id: str, name: str, record: dict) -> None:
        self._transaction([(
            "INSERT INTO nodes (node_id, name, record) VALUES (?, ?, ?) "
            "ON CONFLICT(node_id) DO UPDATE SET name = excluded.name, record = excluded.record",
            (node_id, name, json.dumps(record)))])

    def save_nodes(self, records: dict[str, tuple[str, dict]]) -> None:
        """Store many nodes (node id -> (name, record)) in one transaction."""
        self._transaction([(
            "INSERT INTO nodes (node_id, name, record) VALUES (?, ?, ?) "
            "ON CONFLICT(node_id) DO UPDATE SET name = excluded.name, record = excluded.record",
            (node_id, name, json.dumps(record))) for node_id, (name, record) in records.items()])

    def ban_node(self, node_id: str, record: dict, values: dict) -> None:
        """Store a banned node, drop its update of the open round and set the run keys, in one transaction."""
        self._transaction([("UPDATE nodes SET record = ? WHERE node_id = ?", (json.dumps(record), node_id)),
                           ("DELETE FROM updates WHERE node_id = ?", (node_id,))] + self._put_statements(values))

    def nodes(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM nodes ORDER BY name").fetchall()
        return [json.loads(r[0]) for r in rows]

    # ------------------------------------------------------------------ updates

    def add_update(self, round_number: int, node_id: str, record: dict, node_record: dict) -> None:
        """Record an accepted update and its node's new counters in one transaction."""
        self._transaction([
            ("INSERT INTO updates (round, node_id, record) VALUES (?, ?, ?)",
             (round_number, node_id, json.dumps(record))),
            ("UPDATE nodes SET record = ? WHERE node_id = ?", (json.dumps(node_record), node_id)),
        ])

    def updates(self, round_number: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM updates WHERE round = ? ORDER BY rowid",
                                    (round_number,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    # ------------------------------------------------------------------ rounds

    def start_round(self, values: dict) -> None:
        """Open a round (or a new attempt of it): set run keys and drop every stored update (an attempt starts
        with none; only the open attempt's updates are ever stored)."""
        statements = self._put_statements(values)
        statements.append(("DELETE FROM updates", ()))
        self._transaction(statements)

    def finish_round(self, round_number: int, history_record: dict, values: dict,
                     node_records: dict[str, dict]) -> None:
        """Commit a completed round: its history row, the run keys, node counters; its updates are dropped."""
        statements = [("INSERT OR REPLACE INTO history (round, record) VALUES (?, ?)",
                       (round_number, json.dumps(history_record))),
                      ("DELETE FROM updates WHERE round = ?", (round_number,))]
        statements += [("UPDATE nodes SET record = ? WHERE node_id = ?", (json.dumps(rec), node_id))
                       for node_id, rec in node_records.items()]
        statements += self._put_statements(values)
        self._transaction(statements)

    def put_history(self, round_number: int, history_record: dict) -> None:
        """Replace the history row of a committed round (its test metrics, evaluated after the commit)."""
        self._transaction([("INSERT OR REPLACE INTO history (round, record) VALUES (?, ?)",
                            (round_number, json.dumps(history_record)))])

    def history(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM history ORDER BY round").fetchall()
        return [json.loads(r[0]) for r in rows]
