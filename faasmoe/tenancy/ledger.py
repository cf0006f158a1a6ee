"""The durable usage ledger: one row per finished request, metered down to expert invocations.

The frontend calls `UsageLedger.record` before a response completes. The row is committed in a
WAL transaction before `record` returns, so a SIGKILL of the process afterwards loses nothing
(`synchronous=NORMAL` trades only power-loss durability of the last commits for no fsync per
request). The ledger may share its SQLite file with the tenant store.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from faasmoe.tenancy.database import check_schema, open_database, transaction

log = logging.getLogger(__name__)

# "running": a request's usage so far, checkpointed while it streams, so that a crash of the server
# loses at most the last checkpoint interval; its final row replaces it.
STATUSES = ("ok", "cancelled", "error", "running")
_SCHEMA_VERSION = 1


@dataclass
class UsageRecord:
    """What one request cost: tokens, expert work and memory, and how it ended."""

    request_id: str
    tenant: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    expert_invocations: float = 0.0  # a share of batched calls: fractions add up across requests
    expert_compute_s: float = 0.0
    cold_starts: float = 0.0
    resident_byte_seconds: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    status: str = "ok"
    ttft_s: float | None = None  # time to first token; None when no token was produced
    error: str = ""  # the error message when status is "error"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"UsageRecord.status must be one of {', '.join(STATUSES)}, got {self.status!r}")
        if not self.request_id:
            raise ValueError("UsageRecord.request_id must not be empty")


_FIELDS = [f.name for f in dataclasses.fields(UsageRecord)]
_SUMMED = ("prompt_tokens", "completion_tokens", "expert_invocations", "expert_compute_s", "cold_starts",
           "resident_byte_seconds")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    expert_invocations REAL NOT NULL,
    expert_compute_s REAL NOT NULL,
    cold_starts REAL NOT NULL,
    resident_byte_seconds REAL NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    status TEXT NOT NULL,
    ttft_s REAL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS usage_by_tenant ON usage (tenant, finished_at);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (finished_at);
"""


class UsageLedger:
    """Append-only usage rows in SQLite; `record` is idempotent on request_id."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = open_database(self.path)
        self._lock = threading.Lock()
        with self._lock, transaction(self._conn) as conn:
            check_schema(conn, "ledger", _SCHEMA_VERSION)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def record(self, r: UsageRecord) -> bool:
        """Commit one request's usage (replacing its checkpoint, if any); False (and no change) when its
        final usage was already recorded."""
        inserted = self._upsert(r)
        if not inserted:
            log.info("usage of request %s was already recorded; ignoring the duplicate", r.request_id)
        return inserted

    def checkpoint(self, r: UsageRecord) -> bool:
        """Commit a streaming request's usage so far (status "running"); never overwrites a final row."""
        if r.status != "running":
            raise ValueError("a checkpoint has status 'running'")
        return self._upsert(r)

    def _upsert(self, r: UsageRecord) -> bool:
        values = [getattr(r, name) for name in _FIELDS]
        updates = ", ".join(f"{name} = excluded.{name}" for name in _FIELDS if name != "request_id")
        sql = (f"INSERT INTO usage ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))}) "
               f"ON CONFLICT (request_id) DO UPDATE SET {updates} WHERE usage.status = 'running'")
        with self._lock, transaction(self._conn) as conn:
            return conn.execute(sql, values).rowcount == 1

    def query(self, tenant: str | None = None, since: float | None = None,
              model: str | None = None) -> list[UsageRecord]:
        """Rows finished at or after `since` (epoch seconds), oldest first."""
        where, params = _filters(tenant, since, model)
        sql = f"SELECT {', '.join(_FIELDS)} FROM usage{where} ORDER BY finished_at, request_id"
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [UsageRecord(*row) for row in rows]

    def summary(self, tenant: str | None = None, since: float | None = None) -> list[dict]:
        """Totals per (tenant, model): requests by status, tokens, invocations, compute, cold starts, byte-s."""
        where, params = _filters(tenant, since, None)
        sums = ", ".join(f"TOTAL({name})" for name in _SUMMED)
        sql = (f"SELECT tenant, model, COUNT(*), SUM(status = 'ok'), SUM(status = 'cancelled'), "
               f"SUM(status = 'error'), SUM(status = 'running'), {sums} FROM usage{where} "
               "GROUP BY tenant, model ORDER BY tenant, model")
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        out = []
        for tenant_name, model, requests, ok, cancelled, errors, running, *totals in rows:
            # "running": still streaming, or cut off by a crash with the usage of its last checkpoint
            row = {"tenant": tenant_name, "model": model, "requests": requests, "ok": ok,
                   "cancelled": cancelled, "errors": errors, "running": running}
            for name, total in zip(_SUMMED, totals):
                row[name] = total if name.endswith("_s") or name.endswith("seconds") else int(total)
            out.append(row)
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> UsageLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _filters(tenant: str | None, since: float | None, model: str | None) -> tuple[str, list]:
    clauses, params = [], []
    for clause, value in (("tenant = ?", tenant), ("finished_at >= ?", since), ("model = ?", model)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EARLIEST = datetime(1, 1, 2).timestamp()  # what `since` can still be shown as a date


def parse_since(text: str, now: float | None = None) -> float:
    """'90s', '30m', '1h', '2d', '1w' ago, or an ISO date/datetime ('2026-11-29', '2026-11-29T10:00';
    local time unless it names a zone, as `journalctl --since`) -> epoch seconds."""
    match = _DURATION.fullmatch(text)
    if match:
        now = time.time() if now is None else now
        since = now - float(match.group(1)) * _UNIT_S[match.group(2)]
        if not math.isfinite(since) or since < _EARLIEST:  # 9…9d is -inf: not JSON, not a time
            raise ValueError(f"not a time: {text!r} is further back than any usage can be")
        return since
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"not a time: {text!r} (e.g. 90s, 30m, 1h, 2d, 2026-11-29, 2026-11-29T10:00)") from None
