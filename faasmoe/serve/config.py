"""The TOML config of `faasmoe serve --config faasmoe.toml`: [server], [[models]], [[tenants]].

Loaded and validated once; every error names the file and the key (`faasmoe.toml: models[1].owner:
...`), and unknown keys are errors, so a typo never silently falls back to a default. Relative
paths (model paths, state) are relative to the config file's directory, so the server behaves
the same from any working directory. CLI flags override [server] (merged by the CLI).
"""

from __future__ import annotations

import argparse
import difflib
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from faasmoe.tenancy.limits import ALL_MODELS, InvalidLimit, TenantLimits
from faasmoe.tenancy.tenants import NAME_PATTERN
from runtime.sizes import parse_size

# '/'-separated segments, as Hugging Face ids (Org/Name); no ':', which delimits a function id's tenant.
MODEL_NAME = re.compile(r"(?=.{1,128}$)[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*")
DTYPES = ("float32", "bfloat16", "float16")
SHARING = ("shared", "private")
# Remote experts: a step of MICRO_BATCH_MIN_TOKENS or more (prefills) runs as two groups whose trunk and expert
# work overlap; decode steps go whole. On the payoff's 16-tenant trace (2-core AVX2 VM, A B A B) it took p99 TTFT
# from 0.96 / 1.46 s to 0.83 / 0.76 s at the same ITL; every step split cost ITL (30 vs 21-23 ms, 8 tenants).
REMOTE_MICRO_BATCHES = 2
MICRO_BATCH_MIN_TOKENS = 128


class ConfigError(ValueError):
    """A config file is unreadable or invalid; the message names the file and the key."""


@dataclass
class ServerSettings:
    """[server]: where and how to serve; None means the CLI's default (auto)."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None  # None: one per GPU, else 1
    device: str | None = None  # None: cuda when available, else cpu
    state: Path | None = None  # SQLite for tenants + ledger; None: default_state_path()
    admin_key: str | None = None
    keep_alive: float = 60.0  # default expert keep-alive, seconds


@dataclass
class ModelSpec:
    """[[models]]: one deployed checkpoint and how its expert functions behave."""

    name: str
    path: Path
    sharing: str = "shared"
    owner: str | None = None  # the tenant owning a private model
    expert_block_size: int | None = None  # None: the engine's default
    keep_alive: float | None = None  # None: [server] keep_alive
    trunk_keep_alive: float = 0.0  # 0: never unload the trunk
    dtype: str | None = None  # None: the engine's default
    aliases: list[str] = field(default_factory=list)  # more names clients may call it by
    dedupe: bool = True  # share identical expert blocks and trunk tensors with the other models

    @property
    def private(self) -> bool:
        return self.sharing == "private"


@dataclass
class TenantSpec(TenantLimits):
    """[[tenants]]: a config-declared tenant, created or updated in the state database at start."""

    name: str
    api_keys: list[str] = field(default_factory=list)


@dataclass
class ServeConfig:
    """A whole config file, validated."""

    server: ServerSettings = field(default_factory=ServerSettings)
    models: list[ModelSpec] = field(default_factory=list)
    tenants: list[TenantSpec] = field(default_factory=list)
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict, path: Path) -> ServeConfig:
        """Validate parsed TOML; `path` names the file in errors and anchors relative paths."""
        r = _Reader(path)
        r.keys(data, "", {"server", "models", "tenants"})
        server = _server(r, r.table(data, "server"))
        models = [_model(r, m, f"models[{i}]") for i, m in enumerate(r.array_of_tables(data, "models"))]
        tenants = [_tenant(r, t, f"tenants[{i}]") for i, t in enumerate(r.array_of_tables(data, "tenants"))]
        _cross_check(r, models, tenants)
        return cls(server, models, tenants, path)

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)


class _Reader:
    """Typed getters that raise ConfigError naming file and key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.resolve().parent

    def error(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {message}" if where else f"{self.path}: {message}")

    def keys(self, data: dict, where: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(sorted(allowed))}"
                raise self.error(_join(where, key), f"unknown key{hint}")

    def table(self, data: dict, key: str) -> dict:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "must be a table ([server])")
        return value

    def array_of_tables(self, data: dict, key: str) -> list[dict]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"must be an array of tables ([[{key}]])")
        return value

    def get(self, data: dict, where: str, key: str, kind: str, default: Any = None, *, minimum: float = 0) -> Any:
        if key not in data:
            return default
        value, name = data[key], _join(where, key)
        if kind == "str":
            if not isinstance(value, str) or not value.strip():
                raise self.error(name, f"must be a non-empty string, got {value!r}")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.error(name, f"must be true or false, got {value!r}")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise self.error(name, f"must be an integer >= {minimum:g}, got {value!r}")
            return value
        if kind == "share":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise self.error(name, f"must be a number > 0 (1 = an equal share), got {value!r}")
            return float(value)
        if kind == "seconds":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
                raise self.error(name, f"must be a number of seconds >= {minimum:g}, got {value!r}")
            return float(value)
        if kind == "size":  # 0 = unlimited, otherwise "2GiB" / "500MB" / bytes
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            if isinstance(value, str) and value.strip() == "0":
                return 0
            try:
                return parse_size(value) if isinstance(value, str) else parse_size(repr(value))
            except argparse.ArgumentTypeError as exc:
                raise self.error(name, f"{exc}; 0 means unlimited") from None
        if kind == "path":
            return self.base / Path(self.get(data, where, key, "str")).expanduser()
        if kind == "str_list":
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise self.error(name, f"must be a list of non-empty strings, got {value!r}")
            return list(value)
        raise AssertionError(kind)

    def choice(self, data: dict, where: str, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
        value = self.get(data, where, key, "str", default)
        if value is not None and value not in choices:
            raise self.error(_join(where, key), f"must be one of {', '.join(choices)}, got {value!r}")
        return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _server(r: _Reader, t: dict) -> ServerSettings:
    r.keys(t, "server", _names(ServerSettings))
    d = ServerSettings()
    port = r.get(t, "server", "port", "int", d.port)
    if port > 65535:
        raise r.error("server.port", f"must be at most 65535, got {port}")
    return ServerSettings(
        host=r.get(t, "server", "host", "str", d.host), port=port,
        workers=r.get(t, "server", "workers", "int", d.workers, minimum=1),
        device=r.get(t, "server", "device", "str", d.device),
        state=r.get(t, "server", "state", "path", d.state),
        admin_key=r.get(t, "server", "admin_key", "str", d.admin_key),
        keep_alive=r.get(t, "server", "keep_alive", "seconds", d.keep_alive),
    )


def _model(r: _Reader, t: dict, where: str) -> ModelSpec:
    r.keys(t, where, _names(ModelSpec))
    if "path" not in t:
        raise r.error(f"{where}.path", "missing: the checkpoint directory of this model")
    path = r.get(t, where, "path", "path")
    if not path.is_dir():
        raise r.error(f"{where}.path", f"{path} is not a directory (a Hugging Face checkpoint)")
    name = r.get(t, where, "name", "str", path.name)
    if not MODEL_NAME.fullmatch(name):
        raise r.error(f"{where}.name", f"{name!r}: use letters, digits, '.', '_', '-' and '/' between them (no ':')")
    aliases = r.get(t, where, "aliases", "str_list", [])
    bad = next((a for a in aliases if not MODEL_NAME.fullmatch(a)), None)
    if bad is not None:
        raise r.error(f"{where}.aliases", f"{bad!r}: use letters, digits, '.', '_', '-' and '/' between them (no ':')")
    sharing = r.choice(t, where, "sharing", SHARING, "shared")
    owner = r.get(t, where, "owner", "str")
    if sharing == "private" and owner is None:
        raise r.error(f"{where}.owner", f"missing: private model {name!r} needs the tenant that owns it")
    if sharing == "shared" and owner is not None:
        raise r.error(f"{where}.owner", "only a private model has an owner; set sharing = \"private\" or drop it")
    return ModelSpec(
        name=name, path=path, sharing=sharing, owner=owner,
        expert_block_size=r.get(t, where, "expert_block_size", "int", None, minimum=1),
        keep_alive=r.get(t, where, "keep_alive", "seconds"),
        trunk_keep_alive=r.get(t, where, "trunk_keep_alive", "seconds", 0.0),
        dtype=r.choice(t, where, "dtype", DTYPES, None), aliases=aliases,
        dedupe=r.get(t, where, "dedupe", "bool", True),
    )


_TENANT_KEYS = {"name", "models", "max_concurrent", "tokens_per_minute", "memory_quota", "admin", "api_keys", "weight"}


# TenantLimits field -> its [[tenants]] key
_LIMIT_KEYS = {"allowed_models": "models", "memory_quota_bytes": "memory_quota"}


def _tenant(r: _Reader, t: dict, where: str) -> TenantSpec:
    r.keys(t, where, _TENANT_KEYS)
    if "name" not in t:
        raise r.error(f"{where}.name", "missing")
    name = r.get(t, where, "name", "str")
    if not NAME_PATTERN.fullmatch(name):
        raise r.error(f"{where}.name", f"{name!r}: use 1-63 of a-z 0-9 _ - starting with a letter or digit")
    keys = r.get(t, where, "api_keys", "str_list", [])
    if any(any(c.isspace() for c in k) for k in keys):
        raise r.error(f"{where}.api_keys", "a key must not contain whitespace")
    try:
        return TenantSpec(
            name=name, api_keys=keys,
            allowed_models=r.get(t, where, "models", "str_list", [ALL_MODELS]),
            max_concurrent=r.get(t, where, "max_concurrent", "int", 0),
            tokens_per_minute=r.get(t, where, "tokens_per_minute", "int", 0),
            memory_quota_bytes=r.get(t, where, "memory_quota", "size", 0),
            admin=r.get(t, where, "admin", "bool", False),
            weight=r.get(t, where, "weight", "share", 1.0),
        )
    except InvalidLimit as exc:
        raise r.error(f"{where}.{_LIMIT_KEYS.get(exc.field, exc.field)}", exc.reason) from None


def _cross_check(r: _Reader, models: list[ModelSpec], tenants: list[TenantSpec]) -> None:
    """Names unique; private models owned by declared tenants; tenants list only models they may use."""
    seen: dict[str, int] = {}
    for i, m in enumerate(models):
        if m.name in seen:
            raise r.error(f"models[{i}].name", f"{m.name!r} is already models[{seen[m.name]}]'s name")
        seen[m.name] = i
    declared: dict[str, int] = {}
    for i, t in enumerate(tenants):
        if t.name in declared:
            raise r.error(f"tenants[{i}].name", f"{t.name!r} is already tenants[{declared[t.name]}]'s name")
        declared[t.name] = i
    for i, m in enumerate(models):
        if m.private and m.owner not in declared:
            raise r.error(f"models[{i}].owner", f"{m.owner!r} is not a tenant declared in [[tenants]]")
    by_name = {m.name: m for m in models}
    keys: dict[str, str] = {}
    for i, t in enumerate(tenants):
        for model in t.allowed_models:
            if model == ALL_MODELS:
                continue
            if model not in by_name:
                known = ", ".join(by_name) or "none declared"
                raise r.error(f"tenants[{i}].models", f"unknown model {model!r} (models: {known})")
            if by_name[model].private and by_name[model].owner != t.name:
                raise r.error(f"tenants[{i}].models", f"{model!r} is private to tenant {by_name[model].owner!r}")
        for key in t.api_keys:
            if key in keys and keys[key] != t.name:
                raise r.error(f"tenants[{i}].api_keys", f"a key also listed by tenant {keys[key]!r}")
            keys[key] = t.name
