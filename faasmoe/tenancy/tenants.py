"""Tenants, their API keys and limits, in SQLite (the same file as the usage ledger by default).

Keys are stored as salted SHA-256 hashes only; the plaintext is returned once, when issued. API
keys are 192 random bits, so one fast hash per request is enough (a slow KDF protects guessable
passwords, not random keys). Nothing is cached: a `faasmoe tenant remove` from another process
takes effect on the server's next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from faasmoe.tenancy.database import check_schema, open_database, transaction
from faasmoe.tenancy.limits import ALL_MODELS, TenantLimits

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_SCHEMA_VERSION = 3
# Where a tenant or key came from, so that the config file stays the truth: a tenant or key the
# config declared goes when the config no longer does; one made by `faasmoe tenant` stays.
FROM_CONFIG = "config"
FROM_CLI = "cli"  # a tenant made by `faasmoe tenant add`
ISSUED = "issued"  # a key the store generated (tenant add, tenant key, a config tenant's first key)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    allowed_models TEXT NOT NULL,
    max_concurrent INTEGER NOT NULL,
    tokens_per_minute INTEGER NOT NULL,
    memory_quota_bytes INTEGER NOT NULL,
    admin INTEGER NOT NULL,
    created_at REAL NOT NULL,
    source TEXT,  -- FROM_CONFIG or FROM_CLI, NULL: made before sources were recorded (schema 1)
    weight REAL NOT NULL DEFAULT 1.0  -- its fair share of a shared model (schema 3)
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    source TEXT  -- FROM_CONFIG or ISSUED, NULL as above
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant);
"""


def _add_sources(conn) -> None:
    """Schema 1 -> 2: where tenants and keys came from. Old rows get NULL: unknown, so never removed
    until a config declares them again (which claims them)."""
    conn.execute("ALTER TABLE tenants ADD COLUMN source TEXT")
    conn.execute("ALTER TABLE api_keys ADD COLUMN source TEXT")


def _add_weights(conn) -> None:
    """Schema 2 -> 3: each tenant's share of a shared model; old tenants get the default, 1."""
    conn.execute("ALTER TABLE tenants ADD COLUMN weight REAL NOT NULL DEFAULT 1.0")


_MIGRATIONS = {2: _add_sources, 3: _add_weights}


@dataclass
class Tenant(TenantLimits):
    """A tenant and its limits."""

    name: str
    created_at: float = 0.0
    source: str | None = None  # FROM_CONFIG, FROM_CLI, or None for a tenant older than schema 2


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"tenant name {name!r}: use 1-63 of a-z 0-9 _ - starting with a letter or digit")
    return name


def _check_key_text(key: str) -> str:
    if not isinstance(key, str) or not key or any(c.isspace() for c in key):
        raise ValueError("an API key must be a non-empty string without whitespace")
    return key


class TenantStore:
    """Tenants and hashed API keys in one SQLite file; safe to call from an event loop's thread and others."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = open_database(self.path)
        self._lock = threading.Lock()
        with self._lock, transaction(self._conn) as conn:
            check_schema(conn, "tenants", _SCHEMA_VERSION, _MIGRATIONS)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            # OR IGNORE + reread: two processes creating the file at once agree on one salt.
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('key_salt', ?)", (secrets.token_hex(16),))
            self._salt = bytes.fromhex(conn.execute("SELECT value FROM meta WHERE key = 'key_salt'").fetchone()[0])

    # --- tenants --------------------------------------------------------------------------------

    def add_tenant(self, name: str, *, allowed_models: Sequence[str] = (ALL_MODELS,), max_concurrent: int = 0,
                   tokens_per_minute: int = 0, memory_quota_bytes: int = 0,
                   admin: bool = False, weight: float = 1.0) -> tuple[Tenant, str]:
        """Create a tenant and its first API key; the plaintext key is returned here and never again."""
        limits = TenantLimits(allowed_models=list(allowed_models), max_concurrent=max_concurrent,
                              tokens_per_minute=tokens_per_minute, memory_quota_bytes=memory_quota_bytes, admin=admin,
                              weight=weight)
        tenant = Tenant(validate_name(name), created_at=time.time(), source=FROM_CLI, **vars(limits))
        key = self._new_key(name)
        with self._lock, transaction(self._conn) as conn:
            if self._row(conn, name) is not None:
                raise ValueError(f"tenant {name!r} already exists")
            self._insert(conn, tenant)
            self._insert_key(conn, name, key, ISSUED)
        log.info("added tenant %s", name)
        return tenant, key

    def ensure_tenant(self, name: str, limits: TenantLimits | None = None,
                      api_keys: Iterable[str] = ()) -> tuple[Tenant, str | None]:
        """Make a config-declared tenant exist with these limits and exactly these fixed keys: a key the
        config listed before and no longer does is revoked (keys issued by the store stay). A new key is
        generated (and returned, once) only when the tenant is new and no fixed keys are given."""
        limits = limits.limits() if limits is not None else TenantLimits()
        fixed = [_check_key_text(k) for k in api_keys]
        new_key = None
        with self._lock, transaction(self._conn) as conn:
            existing = self._row(conn, validate_name(name))
            if existing is None:
                tenant = Tenant(name, created_at=time.time(), source=FROM_CONFIG, **vars(limits))
                self._insert(conn, tenant)
                if not fixed:
                    new_key = self._new_key(name)
                    self._insert_key(conn, name, new_key, ISSUED)
                log.info("added tenant %s from the config", name)
            else:
                # One from before sources were recorded is claimed by the config that declares it.
                source = existing.source or FROM_CONFIG
                tenant = Tenant(name, created_at=existing.created_at, source=source, **vars(limits))
                if existing.limits() != limits:
                    self._update(conn, name, vars(limits))
                    log.info("updated tenant %s's limits from the config", name)
                if existing.source is None:
                    conn.execute("UPDATE tenants SET source = ? WHERE name = ?", (source, name))
            hashes = [self._hash(key) for key in fixed]
            for digest in hashes:
                owner = conn.execute("SELECT tenant FROM api_keys WHERE key_hash = ?", (digest,)).fetchone()
                if owner is None:
                    conn.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?)", (digest, name, time.time(), FROM_CONFIG))
                elif owner[0] != name:
                    raise ValueError(f"tenant {name!r}: one of its api_keys already belongs to tenant {owner[0]!r}")
                else:
                    conn.execute("UPDATE api_keys SET source = ? WHERE key_hash = ?", (FROM_CONFIG, digest))
            revoked = conn.execute(
                f"DELETE FROM api_keys WHERE tenant = ? AND source = ? AND key_hash NOT IN ({','.join('?' * len(hashes))})",
                (name, FROM_CONFIG, *hashes)).rowcount
            if revoked:
                log.warning("revoked %d key(s) of tenant %s that the config no longer lists", revoked, name)
        return tenant, new_key

    def remove_config_tenants(self, keep: Iterable[str]) -> list[str]:
        """Remove the tenants a config declared that are not in `keep` (the config now); their keys go
        with them, their usage stays in the ledger. Tenants made by `faasmoe tenant add` stay."""
        keep = list(keep)
        with self._lock, transaction(self._conn) as conn:
            names = [row[0] for row in conn.execute(
                f"SELECT name FROM tenants WHERE source = ? AND name NOT IN ({','.join('?' * len(keep))})",
                (FROM_CONFIG, *keep))]
            for name in names:
                conn.execute("DELETE FROM tenants WHERE name = ?", (name,))  # keys go by ON DELETE CASCADE
        for name in names:
            log.warning("removed tenant %s and its keys: the config no longer declares it", name)
        return names

    def get(self, name: str) -> Tenant | None:
        with self._lock:
            return self._row(self._conn, name)

    def list_tenants(self) -> list[Tenant]:
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM tenants ORDER BY name").fetchall()
        return [_tenant(row) for row in rows]

    def update_limits(self, name: str, **limits: object) -> Tenant:
        """Change some of allowed_models, max_concurrent, tokens_per_minute, memory_quota_bytes, admin."""
        with self._lock, transaction(self._conn) as conn:
            new = self._require(conn, name).replace(**limits)
            self._update(conn, name, {k: getattr(new, k) for k in limits})
            return self._row(conn, name)

    def remove_tenant(self, name: str) -> int:
        """Delete a tenant and its keys (usage rows stay in the ledger); returns how many keys were revoked."""
        with self._lock, transaction(self._conn) as conn:
            self._require(conn, name)
            keys = conn.execute("SELECT COUNT(*) FROM api_keys WHERE tenant = ?", (name,)).fetchone()[0]
            conn.execute("DELETE FROM tenants WHERE name = ?", (name,))  # keys go by ON DELETE CASCADE
        log.info("removed tenant %s and its %d key(s)", name, keys)
        return keys

    # --- keys -----------------------------------------------------------------------------------

    def add_key(self, name: str) -> str:
        """Issue another API key for an existing tenant (plaintext returned once)."""
        key = self._new_key(name)
        with self._lock, transaction(self._conn) as conn:
            self._require(conn, name)
            self._insert_key(conn, name, key, ISSUED)
        return key

    def key_count(self, name: str) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM api_keys WHERE tenant = ?", (name,)).fetchone()[0]

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning `key`, or None for an unknown, revoked or malformed key."""
        if not isinstance(key, str) or not key or len(key) > 512:
            return None
        digest = self._hash(key)
        with self._lock:
            row = self._conn.execute(
                "SELECT k.key_hash, t.* FROM api_keys k JOIN tenants t ON t.name = k.tenant WHERE k.key_hash = ?",
                (digest,)).fetchone()
        # The index lookup already matched; compare_digest keeps the final check constant-time anyway.
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        return _tenant(row[1:])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TenantStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------

    def _hash(self, key: str) -> str:
        return hashlib.sha256(self._salt + key.encode()).hexdigest()

    @staticmethod
    def _new_key(name: str) -> str:
        return f"fm-{name}-{secrets.token_urlsafe(24)}"  # 24 bytes -> 32 url-safe characters

    def _insert_key(self, conn, name: str, key: str, source: str) -> None:
        conn.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?)", (self._hash(key), name, time.time(), source))

    @staticmethod
    def _insert(conn, t: Tenant) -> None:
        conn.execute("INSERT INTO tenants (name, allowed_models, max_concurrent, tokens_per_minute, memory_quota_bytes, "
                     "admin, created_at, source, weight) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (t.name, json.dumps(t.allowed_models), t.max_concurrent, t.tokens_per_minute,
                      t.memory_quota_bytes, int(t.admin), t.created_at, t.source, t.weight))

    @staticmethod
    def _update(conn, name: str, limits: dict) -> None:
        for column, value in limits.items():  # column names are TenantLimits fields, never input
            if column == "allowed_models":
                value = json.dumps(value)
            conn.execute(f"UPDATE tenants SET {column} = ? WHERE name = ?", (value, name))

    @staticmethod
    def _row(conn, name: str) -> Tenant | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM tenants WHERE name = ?", (name,)).fetchone()
        return None if row is None else _tenant(row)

    def _require(self, conn, name: str) -> Tenant:
        tenant = self._row(conn, name)
        if tenant is None:
            raise ValueError(f"no tenant named {name!r}")
        return tenant


# By name: a migrated file has its columns in the order they were added.
_COLUMNS = "name, allowed_models, max_concurrent, tokens_per_minute, memory_quota_bytes, admin, created_at, source, weight"


def _tenant(row: Sequence) -> Tenant:
    name, models, max_concurrent, tpm, quota, admin, created_at, source, weight = row
    return Tenant(name, created_at, source, allowed_models=json.loads(models), max_concurrent=max_concurrent,
                  tokens_per_minute=tpm, memory_quota_bytes=quota, admin=bool(admin), weight=weight)
