"""The usage ledger on a real SQLite file: durable across SIGKILL, idempotent, queryable, summarised."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pytest

from faasmoe.cli import main
from faasmoe.tenancy.ledger import UsageLedger, UsageRecord, parse_since
from faasmoe.tenancy.tenants import TenantStore

REPO = Path(__file__).resolve().parents[2]


def rec(request_id: str, tenant: str = "acme", model: str = "tiny", finished_at: float = 1000.0, **kw) -> UsageRecord:
    base = dict(prompt_tokens=10, completion_tokens=5, expert_invocations=40, expert_compute_s=0.25, cold_starts=1,
                resident_byte_seconds=2.0 * 2**30, started_at=finished_at - 1, ttft_s=0.1)
    return UsageRecord(request_id, tenant, model, finished_at=finished_at, **{**base, **kw})


def test_record_query_round_trip_and_idempotence(tmp_path: Path) -> None:
    with UsageLedger(tmp_path / "state.db") as ledger:
        r = rec("req-1", error="")
        assert ledger.record(r) is True
        assert ledger.record(rec("req-1", prompt_tokens=999)) is False  # a retried write changes nothing
        assert ledger.query() == [r]
    with UsageLedger(tmp_path / "state.db") as ledger:
        assert ledger.query() == [r]


def test_query_filters(tmp_path: Path) -> None:
    with UsageLedger(tmp_path / "state.db") as ledger:
        for i, (tenant, model, t) in enumerate([("acme", "tiny", 100.0), ("acme", "big", 200.0),
                                                ("beta", "tiny", 300.0), ("acme", "tiny", 400.0)]):
            ledger.record(rec(f"r{i}", tenant, model, finished_at=t))
        assert [r.request_id for r in ledger.query(tenant="acme")] == ["r0", "r1", "r3"]
        assert [r.request_id for r in ledger.query(since=200.0)] == ["r1", "r2", "r3"]
        assert [r.request_id for r in ledger.query(tenant="acme", since=150.0, model="tiny")] == ["r3"]
        assert ledger.query(tenant="nobody") == []


def test_summary_per_tenant_and_model(tmp_path: Path) -> None:
    with UsageLedger(tmp_path / "state.db") as ledger:
        ledger.record(rec("a", finished_at=100.0))
        ledger.record(rec("b", finished_at=200.0, status="cancelled", completion_tokens=2))
        ledger.record(rec("c", finished_at=300.0, status="error", error="worker died", cold_starts=0))
        ledger.record(rec("d", tenant="beta", finished_at=300.0))
        rows = ledger.summary()
        assert [(r["tenant"], r["model"]) for r in rows] == [("acme", "tiny"), ("beta", "tiny")]
        acme = rows[0]
        assert (acme["requests"], acme["ok"], acme["cancelled"], acme["errors"]) == (3, 1, 1, 1)
        assert (acme["prompt_tokens"], acme["completion_tokens"], acme["expert_invocations"],
                acme["cold_starts"]) == (30, 12, 120, 2)
        assert acme["expert_compute_s"] == pytest.approx(0.75)
        assert acme["resident_byte_seconds"] == pytest.approx(6.0 * 2**30)
        assert [r["requests"] for r in ledger.summary(tenant="acme", since=150.0)] == [2]
        assert ledger.summary(since=1e9) == []


def test_bad_status_is_rejected() -> None:
    with pytest.raises(ValueError, match="status"):
        rec("x", status="done")


@contextlib.contextmanager
def sigkilled_at_the_end(proc: subprocess.Popen):
    """Run the block against a live writer, then SIGKILL it (and reap it even when the block failed)."""
    try:
        yield
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_usage_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    script = textwrap.dedent(f"""
        import sys, time
        from faasmoe.tenancy.ledger import UsageLedger, UsageRecord
        ledger = UsageLedger({str(db)!r})
        for i in range(20):
            ledger.record(UsageRecord(f"req-{{i}}", "acme", "tiny", prompt_tokens=i, finished_at=1000.0 + i))
        print("recorded", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    with sigkilled_at_the_end(proc):
        assert proc.stdout.readline().strip() == "recorded"
        assert Path(f"{db}-wal").stat().st_size > 0  # the rows are in the WAL, not yet checkpointed
    with UsageLedger(db) as ledger:
        rows = ledger.query(tenant="acme")
    assert [r.prompt_tokens for r in rows] == list(range(20))


def test_ledger_shares_the_tenant_database(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with TenantStore(db) as tenants, UsageLedger(db) as ledger:
        tenants.add_tenant("acme")
        ledger.record(rec("r1"))
        tenants.remove_tenant("acme")  # usage outlives its tenant: it is the bill
        assert [r.request_id for r in ledger.query(tenant="acme")] == ["r1"]


def test_parse_since() -> None:
    now = 1_000_000.0
    assert parse_since("90s", now=now) == now - 90
    assert parse_since("30m", now=now) == now - 1800
    assert parse_since("1h", now=now) == now - 3600
    assert parse_since("2d", now=now) == now - 2 * 86400
    assert parse_since("1.5h", now=now) == now - 5400
    assert parse_since("2026-11-29") == datetime(2026, 11, 29).timestamp()
    assert parse_since("2026-11-29T10:00") == datetime(2026, 11, 29, 10, 0).timestamp()
    assert parse_since("2026-11-29T10:00:00+00:00") == datetime.fromisoformat("2026-11-29T10:00+00:00").timestamp()
    for bad in ("yesterday", "1y", "-1h", "", "2026-13-01"):
        with pytest.raises(ValueError, match="not a time"):
            parse_since(bad)


def test_cli_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "state.db"
    with UsageLedger(db) as ledger:
        ledger.record(rec("old", finished_at=1000.0))
        ledger.record(rec("new", finished_at=datetime(2030, 1, 1).timestamp()))
        ledger.record(rec("other", tenant="beta", model="big", finished_at=datetime(2030, 1, 1).timestamp()))
    out = subprocess.run([sys.executable, "-m", "faasmoe.cli", "usage", "--json", "--state", str(db)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["tenant"], r["model"], r["requests"]) for r in rows] == [("acme", "tiny", 2), ("beta", "big", 1)]

    assert main(["usage", "--tenant", "acme", "--since", "2029-12-31", "--state", str(db)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["tenant", "model", "requests"]
    assert table[1].split()[:3] == ["acme", "tiny", "1"] and len(table) == 2
    assert "2.000" in table[1]  # GiB-seconds
    assert main(["usage", "--tenant", "nobody", "--state", str(db)]) == 0
    assert "no usage recorded for tenant nobody" in capsys.readouterr().out
    assert main(["usage", "--since", "soon", "--state", str(db)]) == 2
    assert "not a time" in capsys.readouterr().err


def test_no_committed_row_is_lost_when_other_processes_open_and_close_the_database(tmp_path: Path) -> None:
    """The server holds two connections (tenants, ledger); `faasmoe usage` in another process opens and closes
    the file. Opening the second connection must not drop the first one's locks: else that other process,
    closing last as far as SQLite can tell, checkpoints and deletes the WAL the server still writes to."""
    db = tmp_path / "state.db"
    TenantStore(db).close()
    script = textwrap.dedent(f"""
        import sys, time
        from faasmoe.tenancy.ledger import UsageLedger, UsageRecord
        from faasmoe.tenancy.tenants import TenantStore
        tenants = TenantStore({str(db)!r})  # the server's two connections, in its order
        ledger = UsageLedger({str(db)!r})
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(10):
            ledger.record(UsageRecord(f"req-{{i}}", "acme", "tiny", prompt_tokens=i, finished_at=1000.0 + i))
        print("recorded", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    with sigkilled_at_the_end(proc):
        assert proc.stdout.readline().strip() == "ready"
        usage = subprocess.run([sys.executable, "-m", "faasmoe.cli", "usage", "--state", str(db), "--json"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert usage.returncode == 0, usage.stderr
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "recorded"
        with UsageLedger(db) as reader:  # another process's view while the writer lives
            assert len(reader.query(tenant="acme")) == 10
    with UsageLedger(db) as ledger:
        assert [r.prompt_tokens for r in ledger.query(tenant="acme")] == list(range(10))
