"""`faasmoe serve --config` files: the documented example loads; every mistake names file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from faasmoe.serve.config import ConfigError, ServeConfig

EXAMPLE = """
[server]
host = "0.0.0.0"
port = 8001
workers = 2
device = "cpu"
state = "faasmoe.db"
admin_key = "admin-secret"
keep_alive = 60

[[models]]
name = "tiny"
path = "models/tiny-qwen2_moe"
expert_block_size = 4
keep_alive = 30
dtype = "float32"

[[models]]
name = "acme-ft"
path = "models/acme"
sharing = "private"
owner = "acme"
trunk_keep_alive = 120

[[tenants]]
name = "acme"
models = ["tiny", "acme-ft"]
max_concurrent = 4
tokens_per_minute = 20000
memory_quota = "2GiB"
api_keys = ["fm-acme-fixed-key-0123456789"]

[[tenants]]
name = "ops"
models = ["*"]
admin = true
"""


def write(tmp_path: Path, text: str) -> Path:
    for model in ("models/tiny-qwen2_moe", "models/acme"):
        (tmp_path / model).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "faasmoe.toml"
    path.write_text(text)
    return path


def test_example_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = ServeConfig.load(write(tmp_path, EXAMPLE))
    s = cfg.server
    assert (s.host, s.port, s.workers, s.device, s.admin_key, s.keep_alive) == ("0.0.0.0", 8001, 2, "cpu",
                                                                                "admin-secret", 60.0)
    assert s.state == tmp_path / "faasmoe.db"
    tiny, private = cfg.models
    assert (tiny.name, tiny.path, tiny.sharing, tiny.owner) == ("tiny", tmp_path / "models/tiny-qwen2_moe",
                                                                "shared", None)
    assert (tiny.expert_block_size, tiny.keep_alive, tiny.trunk_keep_alive, tiny.dtype) == (4, 30.0, 0.0, "float32")
    assert private.private and private.owner == "acme" and private.keep_alive is None and private.dtype is None
    acme, ops = cfg.tenants
    assert (acme.allowed_models, acme.max_concurrent, acme.tokens_per_minute, acme.memory_quota_bytes) == \
        (["tiny", "acme-ft"], 4, 20000, 2 << 30)
    assert acme.api_keys == ["fm-acme-fixed-key-0123456789"] and not acme.admin
    assert ops.admin and ops.allowed_models == ["*"] and ops.memory_quota_bytes == 0
    assert cfg.model("acme-ft") is private and cfg.model("nope") is None


def test_everything_is_optional(tmp_path: Path) -> None:
    cfg = ServeConfig.load(write(tmp_path, ""))
    assert cfg.models == [] and cfg.tenants == []
    assert (cfg.server.host, cfg.server.port, cfg.server.workers, cfg.server.state) == ("127.0.0.1", 8000, None, None)
    cfg = ServeConfig.load(write(tmp_path, '[[models]]\npath = "models/acme"\n[[tenants]]\nname = "t"\n'
                                           'memory_quota = 1048576'))
    assert cfg.models[0].name == "acme" and cfg.tenants[0].allowed_models == ["*"]  # name defaults to the directory
    assert cfg.tenants[0].memory_quota_bytes == 1 << 20


@pytest.mark.parametrize("old, new, key, message", [
    ("keep_alive = 60", "keep_alve = 60", "server.keep_alve", "did you mean 'keep_alive'"),
    ("dtype = \"float32\"", "dtyp = \"float32\"", "models[0].dtyp", "did you mean 'dtype'"),
    ("admin = true", "admin = true\ncolour = 1", "tenants[1].colour", "unknown key"),
    ("[server]", "[serve]\n[server]", "serve", "did you mean 'server'"),
    ("port = 8001", "port = \"8001\"", "server.port", "integer"),
    ("port = 8001", "port = 70000", "server.port", "65535"),
    ("workers = 2", "workers = 0", "server.workers", ">= 1"),
    ("keep_alive = 60", "keep_alive = -1", "server.keep_alive", "seconds"),
    ("expert_block_size = 4", "expert_block_size = 0", "models[0].expert_block_size", ">= 1"),
    ("dtype = \"float32\"", "dtype = \"fp8\"", "models[0].dtype", "float32, bfloat16, float16"),
    ("sharing = \"private\"", "sharing = \"public\"", "models[1].sharing", "shared, private"),
    ("owner = \"acme\"", "", "models[1].owner", "missing"),
    ("owner = \"acme\"", "owner = \"nobody\"", "models[1].owner", "'nobody' is not a tenant declared"),
    ("name = \"acme-ft\"", "name = \"tiny\"", "models[1].name", "already models[0]"),
    ("name = \"acme-ft\"", "name = \"org:model\"", "models[1].name", "no ':'"),
    ("path = \"models/acme\"", "path = \"models/missing\"", "models[1].path", "not a directory"),
    ("name = \"ops\"", "name = \"acme\"", "tenants[1].name", "already tenants[0]"),
    ("name = \"ops\"", "name = \"Ops\"", "tenants[1].name", "a-z 0-9"),
    ("models = [\"*\"]", "models = [\"tiny\", \"ghost\"]", "tenants[1].models", "unknown model 'ghost'"),
    ("models = [\"*\"]", "models = [\"acme-ft\"]", "tenants[1].models", "private to tenant 'acme'"),
    ("models = [\"*\"]", "models = [\"*\", \"tiny\"]", "tenants[1].models", "alone"),
    ("models = [\"*\"]", "models = \"*\"", "tenants[1].models", "list"),
    ("memory_quota = \"2GiB\"", "memory_quota = \"2 gigs\"", "tenants[0].memory_quota", "not a size"),
    ("memory_quota = \"2GiB\"", "memory_quota = -5", "tenants[0].memory_quota", "not a size"),
    ("admin = true", "admin = \"yes\"", "tenants[1].admin", "true or false"),
    ("admin = true", "admin = true\napi_keys = [\"fm-acme-fixed-key-0123456789\"]", "tenants[1].api_keys",
     "also listed by tenant 'acme'"),
])
def test_mistakes_name_file_and_key(tmp_path: Path, old: str, new: str, key: str, message: str) -> None:
    assert EXAMPLE.count(old) == 1
    path = write(tmp_path, EXAMPLE.replace(old, new))
    with pytest.raises(ConfigError) as err:
        ServeConfig.load(path)
    text = str(err.value)
    assert text.startswith(f"{path}: {key}:"), text
    assert message in text, text


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        ServeConfig.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        ServeConfig.load(write(tmp_path, "[server\n").rename(tmp_path / "bad.toml"))
    with pytest.raises(ConfigError, match="models: must be an array of tables"):
        ServeConfig.load(write(tmp_path, "models = 3"))
    assert issubclass(ConfigError, ValueError)  # so the CLI prints it as `faasmoe: error: ...`
