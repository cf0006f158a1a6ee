"""Tenant store on a real SQLite file: hashed keys, revocation, limits, config-declared tenants, CLI."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from faasmoe.cli import main
from faasmoe.tenancy.database import default_state_path
from faasmoe.tenancy.limits import TenantLimits
from faasmoe.tenancy.tenants import Tenant, TenantStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path):
    with TenantStore(tmp_path / "state.db") as s:
        yield s


def _file_bytes(db: Path) -> bytes:
    # The plaintext must be in none of SQLite's files: the database, its WAL and shared memory.
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_issued_key_authenticates_and_is_never_stored(store: TenantStore) -> None:
    tenant, key = store.add_tenant("acme", allowed_models=["tiny"], max_concurrent=4, tokens_per_minute=20000,
                                   memory_quota_bytes=2 << 30)
    assert key.startswith("fm-acme-") and len(key) == len("fm-acme-") + 32
    assert store.authenticate(key) == tenant
    assert tenant.allowed_models == ["tiny"]
    second = store.add_key("acme")
    assert second != key and store.authenticate(second).name == "acme"
    assert store.key_count("acme") == 2
    for bad in ("", key + "x", key[:-1], "fm-acme-" + "A" * 32, None):
        assert store.authenticate(bad) is None
    data = _file_bytes(store.path)
    assert key.encode() not in data and second.encode() not in data
    assert key[len("fm-acme-"):].encode() not in data


def test_wal_mode_and_persistence_across_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with TenantStore(db) as s:
        _, key = s.add_tenant("acme")
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.stat().st_mode & 0o077 == 0  # owner-only: it holds key hashes and billing data
    with TenantStore(db) as s:  # the salt is stored with the database, so old keys still check out
        assert s.authenticate(key).name == "acme"


def test_removed_tenant_keys_stop_working_even_for_a_running_server(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with TenantStore(db) as server, TenantStore(db) as cli:  # two connections, as server + `faasmoe tenant`
        _, key = cli.add_tenant("acme")
        assert server.authenticate(key).name == "acme"
        assert cli.remove_tenant("acme") == 1
        assert server.authenticate(key) is None
        assert server.get("acme") is None and server.list_tenants() == []
        _, again = cli.add_tenant("acme")  # a new tenant of the same name does not inherit the old key
        assert server.authenticate(key) is None and server.authenticate(again).name == "acme"


def test_errors_name_the_field(store: TenantStore) -> None:
    for bad in ("Acme", "-x", "", "a" * 64, "a b", "a/b"):
        with pytest.raises(ValueError, match="tenant name"):
            store.add_tenant(bad)
    store.add_tenant("acme")
    with pytest.raises(ValueError, match="already exists"):
        store.add_tenant("acme")
    for call in (lambda: store.remove_tenant("nope"), lambda: store.add_key("nope"),
                 lambda: store.update_limits("nope", max_concurrent=1)):
        with pytest.raises(ValueError, match="no tenant named 'nope'"):
            call()
    with pytest.raises(ValueError, match="max_concurrent"):
        store.update_limits("acme", max_concurrent=-1)
    with pytest.raises(ValueError, match="unknown tenant limit.*max_concurent"):
        store.update_limits("acme", max_concurent=1)
    with pytest.raises(ValueError, match="allowed_models"):
        store.add_tenant("other", allowed_models=["*", "tiny"])
    assert [t.name for t in store.list_tenants()] == ["acme"]


def test_update_limits_applies_to_the_next_authentication(store: TenantStore) -> None:
    _, key = store.add_tenant("acme", tokens_per_minute=100)
    updated = store.update_limits("acme", tokens_per_minute=500, allowed_models=["a", "b"], admin=True)
    assert (updated.tokens_per_minute, updated.allowed_models, updated.admin) == (500, ["a", "b"], True)
    assert store.authenticate(key) == updated == store.get("acme")


def test_ensure_tenant_creates_once_then_updates(store: TenantStore) -> None:
    tenant, key = store.ensure_tenant("acme", TenantLimits(allowed_models=["tiny"], max_concurrent=2))
    assert key is not None and store.authenticate(key) == tenant
    tenant2, key2 = store.ensure_tenant("acme", TenantLimits(allowed_models=["tiny"], max_concurrent=2))
    assert key2 is None and tenant2 == tenant and store.key_count("acme") == 1
    tenant3, _ = store.ensure_tenant("acme", TenantLimits(allowed_models=["*"], max_concurrent=8))
    assert tenant3.max_concurrent == 8 and tenant3.created_at == tenant.created_at
    assert store.authenticate(key).max_concurrent == 8


def test_ensure_tenant_with_fixed_keys(store: TenantStore) -> None:
    fixed = "fm-beta-fixed-key-from-config-0001"
    tenant, key = store.ensure_tenant("beta", api_keys=[fixed])
    assert key is None and store.authenticate(fixed) == tenant
    store.ensure_tenant("beta", api_keys=[fixed])  # idempotent on restart
    assert store.key_count("beta") == 1
    assert fixed.encode() not in _file_bytes(store.path)
    with pytest.raises(ValueError, match="already belongs to tenant 'beta'"):
        store.ensure_tenant("gamma", api_keys=[fixed])
    assert store.get("gamma") is None  # the failed call left nothing behind
    with pytest.raises(ValueError, match="API key"):
        store.ensure_tenant("delta", api_keys=["has space"])


def test_tenant_defaults() -> None:
    t = Tenant("x")
    assert t.allowed_models == ["*"] and (t.max_concurrent, t.tokens_per_minute, t.memory_quota_bytes) == (0, 0, 0)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faasmoe.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_cli_tenant_round_trip_in_subprocesses(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    added = _cli("tenant", "add", "acme", "--models", "tiny,big", "--max-concurrent", "3",
                 "--tokens-per-minute", "900", "--memory-quota", "2GiB", "--state", str(db))
    assert added.returncode == 0, added.stderr
    key = next(w for w in added.stdout.split() if w.startswith("fm-acme-"))
    assert "will not be shown again" in added.stdout
    with TenantStore(db) as s:
        t = s.authenticate(key)
        assert (t.allowed_models, t.max_concurrent, t.tokens_per_minute, t.memory_quota_bytes) == \
            (["tiny", "big"], 3, 900, 2 << 30)
    listed = _cli("tenant", "list", env={"FAASMOE_STATE": str(db)})  # $FAASMOE_STATE is the default --state
    assert listed.returncode == 0, listed.stderr
    assert "acme" in listed.stdout and "tiny,big" in listed.stdout and "fm-" not in listed.stdout


def test_default_state_is_the_user_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, work = tmp_path / "home", tmp_path / "checkout"
    work.mkdir()
    monkeypatch.delenv("FAASMOE_STATE", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    added = subprocess.run([sys.executable, "-m", "faasmoe.cli", "tenant", "add", "acme"], cwd=work,
                           capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)})
    assert added.returncode == 0, added.stderr
    assert (home / ".local/share/faasmoe/faasmoe.db").exists() and not list(work.iterdir())
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_state_path() == tmp_path / "xdg" / "faasmoe" / "faasmoe.db"
    monkeypatch.setenv("FAASMOE_STATE", str(tmp_path / "explicit.db"))
    assert default_state_path() == tmp_path / "explicit.db"


def test_cli_tenant_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process: each `python -m faasmoe.cli` costs seconds of imports, the subprocess test covers that path.
    db = str(tmp_path / "cli.db")
    assert main(["tenant", "list", "--state", db]) == 2
    assert "no state database" in capsys.readouterr().err and not Path(db).exists()
    assert main(["tenant", "add", "acme", "--state", db]) == 0
    key = next(w for w in capsys.readouterr().out.split() if w.startswith("fm-acme-"))
    assert main(["tenant", "add", "root", "--admin", "--memory-quota", "0", "--state", db]) == 0
    capsys.readouterr()
    assert main(["tenant", "add", "acme", "--state", db]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["tenant", "key", "acme", "--state", db]) == 0
    key2 = next(w for w in capsys.readouterr().out.split() if w.startswith("fm-acme-"))
    assert main(["tenant", "remove", "acme", "--state", db]) == 0
    assert "2 key(s)" in capsys.readouterr().out
    assert main(["tenant", "remove", "acme", "--state", db]) == 2
    assert "no tenant named 'acme'" in capsys.readouterr().err
    with TenantStore(db) as s:
        assert s.authenticate(key) is None and s.authenticate(key2) is None
        assert [(t.name, t.admin) for t in s.list_tenants()] == [("root", True)]


def test_an_existing_world_readable_state_file_is_made_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with TenantStore(db):
        pass
    for file in (db, tmp_path / "state.db-wal"):
        if file.exists():
            file.chmod(0o644)
    with TenantStore(db) as store:
        store.add_tenant("acme")
    assert db.stat().st_mode & 0o777 == 0o600
    assert all(f.stat().st_mode & 0o077 == 0 for f in tmp_path.iterdir() if f.name.startswith("state.db"))


_SCHEMA_1 = """
CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
INSERT INTO schema_versions VALUES ('tenants', 1);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tenants (name TEXT PRIMARY KEY, allowed_models TEXT NOT NULL, max_concurrent INTEGER NOT NULL,
    tokens_per_minute INTEGER NOT NULL, memory_quota_bytes INTEGER NOT NULL, admin INTEGER NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE api_keys (key_hash TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
    created_at REAL NOT NULL);
INSERT INTO meta VALUES ('key_salt', '00112233445566778899aabbccddeeff');
INSERT INTO tenants VALUES ('old', '["*"]', 0, 0, 0, 0, 1.0);
"""


def test_a_schema_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    import hashlib

    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA_1)
    key = "fm-old-0123456789abcdefghijklmnopqrstuv"
    digest = hashlib.sha256(bytes.fromhex("00112233445566778899aabbccddeeff") + key.encode()).hexdigest()
    conn.execute("INSERT INTO api_keys VALUES (?, 'old', 1.0)", (digest,))
    conn.commit()
    conn.close()
    with TenantStore(db) as store:
        assert store.authenticate(key).name == "old"  # rows and salt survive
        assert store.get("old").source is None  # unknown: never removed for not being in a config
        assert store.get("old").weight == 1.0  # schema 3's share: the default for a tenant from before
        assert store.remove_config_tenants([]) == []
        store.ensure_tenant("old", api_keys=[key])  # a config that declares it claims it
        assert store.get("old").source == "config"
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT version FROM schema_versions WHERE component = 'tenants'").fetchone() == (3,)
    conn.close()
    with TenantStore(db) as store:  # reopening a migrated file is a no-op
        assert store.authenticate(key).name == "old"
        assert store.remove_config_tenants([]) == ["old"] and store.authenticate(key) is None


def test_the_config_is_the_truth_for_its_own_tenants_and_keys(store: TenantStore) -> None:
    k1, k2 = "fm-cfg-key-one-0123456789abcdefghij", "fm-cfg-key-two-0123456789abcdefghij"
    store.ensure_tenant("cfg", api_keys=[k1, k2])
    _, cli_key = store.add_tenant("handmade")
    extra = store.add_key("cfg")  # issued by `faasmoe tenant key`: not the config's to revoke
    store.ensure_tenant("cfg", api_keys=[k2])  # k1 left the config
    assert store.authenticate(k1) is None and store.authenticate(k2).name == "cfg"
    assert store.authenticate(extra).name == "cfg"
    assert store.remove_config_tenants(["cfg"]) == []
    assert store.remove_config_tenants([]) == ["cfg"]  # cfg left the config
    assert store.authenticate(k2) is None and store.authenticate(extra) is None
    assert store.authenticate(cli_key).name == "handmade"  # made by `faasmoe tenant add`: stays


def test_tenants_added_and_removed_from_the_cli_apply_to_a_running_server_at_once(tmp_path: Path) -> None:
    """`faasmoe tenant add|remove` on the live state file: a removed tenant's key answers 401 (not 500 from a
    WAL deleted under the server), a new tenant's key works, both on the next request."""
    import functools
    import subprocess
    import sys

    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    from ..processes import free_port, serving
    from .test_serve_process import status_of

    model = init_checkpoint(tmp_path / "tiny", "qwen2_moe", seed=1, progress=False)
    db = tmp_path / "state.db"

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "faasmoe.cli", "tenant", *args, "--state", str(db)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def key_of(output: str) -> str:
        return next(word for line in output.splitlines() for word in line.split() if word.startswith("fm-"))

    old = key_of(cli("add", "old"))
    port = free_port()
    server = serving(port, str(model), "--port", str(port), "--workers", "1", "--device", "cpu", "--state", str(db))
    status = functools.partial(status_of, port)
    try:
        assert status(old) == 200
        new = key_of(cli("add", "new"))
        assert status(new) == 200
        cli("remove", "old")
        assert status(old) == 401
        assert status(new) == 200
        assert Path(f"{db}-wal").exists()  # the server's WAL is still there for it
    finally:
        assert server.stop() == 0, server.output
