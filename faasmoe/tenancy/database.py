"""The state file: SQLite in WAL mode, shared by the tenant store and the usage ledger."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def open_database(path: str | Path) -> sqlite3.Connection:
    """Open (creating if missing, mode 0600) a SQLite file in WAL mode, shared by the state stores."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file holds key hashes and billing data: readable by its owner only, like ~/.ssh. A new file is
    # made 0600; an existing one (and its WAL files) is tightened by chmod. Never open and close an
    # existing database file ourselves: closing any descriptor of a file drops every POSIX lock this
    # process holds on it, the locks by which this process's other connections tell other processes
    # they are there; another process closing its connection then checkpoints and deletes the WAL
    # we still write to, and our committed rows are lost (SQLite's "how to corrupt" list, 2.2).
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))  # only where nothing had it open
    except FileExistsError:
        pass
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        _owner_only(file)
    # Autocommit mode: transactions are explicit (`transaction`), so none is left open by accident.
    conn = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        log.warning("%s: SQLite refused WAL mode (journal_mode=%s); concurrent readers may block", path, mode)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    return conn


def _owner_only(path: Path) -> None:
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
            log.warning("%s was readable by others (mode %o); now %o", path, mode, mode & 0o700)
    except FileNotFoundError:
        pass
    except PermissionError as exc:  # someone else's file: SQLite will say if it cannot use it
        log.warning("could not make %s owner-only: %s", path, exc)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT (rollback on error); IMMEDIATE takes the write lock up front so two
    processes never deadlock upgrading a read to a write."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


Migration = Callable[[sqlite3.Connection], None]


def check_schema(conn: sqlite3.Connection, component: str, version: int,
                 migrations: Mapping[int, Migration] | None = None) -> None:
    """Record `component`'s schema version, refusing a file written by a newer faasmoe and migrating
    an older one in place: `migrations[v]` takes the tables from version v-1 to v. Call it inside
    the transaction that then creates the current schema (CREATE ... IF NOT EXISTS), so a new file
    gets the current tables and an old one is upgraded, both at once or not at all."""
    row = conn.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
    if row is None:
        conn.execute("INSERT INTO schema_versions VALUES (?, ?)", (component, version))
        return
    found = row[0]
    if found > version:
        raise ValueError(f"the {component} tables were written by a newer faasmoe (schema {found} > {version})")
    for step in range(found + 1, version + 1):
        (migrations or {})[step](conn)
        log.info("migrated the %s tables to schema %d", component, step)
    if found < version:
        conn.execute("UPDATE schema_versions SET version = ? WHERE component = ?", (version, component))


def default_state_path() -> Path:
    """$FAASMOE_STATE, else $XDG_DATA_HOME/faasmoe/faasmoe.db (~/.local/share/...): never the
    working directory, so running from a checkout writes nothing into it."""
    explicit = os.environ.get("FAASMOE_STATE")
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "faasmoe" / "faasmoe.db"


STATE_HELP = "default: $FAASMOE_STATE, else $XDG_DATA_HOME/faasmoe/faasmoe.db (~/.local/share/faasmoe/faasmoe.db)"
