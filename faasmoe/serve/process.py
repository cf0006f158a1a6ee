"""`faasmoe serve` and `faasmoe frontend`: the scheduler, the local pool and the HTTP frontend.

`serve` runs all three in one process (the scheduler on the same event loop, workers as
child processes); `frontend` joins an existing scheduler. Both build the deployments from
the TOML config and the MODEL_DIR arguments, open the tenant store and the usage ledger,
and serve the OpenAI API until SIGINT/SIGTERM, when they drain in-flight requests, stop the
workers and exit 0.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiohttp import web

from faasmoe.engine.deployments import Deployment, Deployments, DeploymentSpec
from faasmoe.engine.executors import InProcessExpertExecutor, RemoteExpertExecutor
from faasmoe.engine.functions import FunctionCatalog
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.content import DigestCache
from faasmoe.model.experts import LocalExpertExecutor
from faasmoe.model.moe_model import load_expert_blocks
from faasmoe.model.shared_tensors import SharedTensors
from faasmoe.serve.config import MICRO_BATCH_MIN_TOKENS, MODEL_NAME, REMOTE_MICRO_BATCHES, ModelSpec, ServeConfig
from faasmoe.serve.devices import resolve_devices, trunk_device
from faasmoe.tenancy.admission import Admission
from faasmoe.tenancy.database import default_state_path
from faasmoe.tenancy.ledger import UsageLedger
from runtime.budgets import kv_cache_budget
from runtime.client import DEADLINE_FACTOR, DEADLINE_MIN_S, RuntimeClient
from runtime.cluster import workers_json
from runtime.compute import ComputeThread
from runtime.metrics import merge_expositions
from runtime.scheduler import Scheduler, SchedulerConfig
from runtime.transport import Address

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0
SCHEDULER_TIMEOUT_S = 30.0  # how long `frontend` keeps dialing its scheduler (backing off) before giving up


class SchedulerUnreachable(ConnectionError):
    """The scheduler gave no routing table in time; the message says where and what was seen."""


@dataclass
class ServeOptions:
    """`faasmoe serve` / `faasmoe frontend` flags; None = take it from the config file or the default."""

    model_dirs: list[Path] = field(default_factory=list)
    served_model_names: list[str] | None = None  # one MODEL_DIR: its name, then aliases; several: one name each
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: off
    access_log: bool = False  # one line per HTTP request on stdout
    tool_call_parser: str | None = None  # hermes | mistral; None: each model's family's
    auto_tool_choice: bool = True  # tool_choice "auto" allowed (vLLM's --enable-auto-tool-choice)
    config: Path | None = None
    host: str | None = None
    port: int | None = None
    workers: int | None = None
    device: str | None = None
    api_key: str | None = None
    admin_key: str | None = None
    keep_alive: float | None = None
    expert_block_size: int | None = None
    trunk_keep_alive: float | None = None
    whole_model_keep_alive: float = 0.0  # --experts in-process: unload trunk and experts together when idle; 0: never
    dtype: str | None = None
    state: Path | None = None
    worker_memory: int | None = None
    host_cache: int | None = None  # per local worker; None: budgets.host_cache_budget (none on CPU)
    host_ttl: float | None = None  # seconds a block may sit unused in a worker's host cache; None: 600
    scheduler: str | None = None  # `frontend`: an existing scheduler
    token: str | None = None
    eviction: str = "lru"
    experts: str = "remote"  # "remote": expert functions on workers; "in-process": all resident here (baseline)
    scheduler_timeout: float = SCHEDULER_TIMEOUT_S
    kv_cache_memory: int | None = None  # per model; None: budgets.kv_cache_budget()
    invoke_timeout: float = DEADLINE_MIN_S  # the least an invoke may take before it is retried elsewhere
    invoke_timeout_factor: float = DEADLINE_FACTOR  # x the worker's measured compute for the call's rows
    micro_batches: int | None = None  # None: REMOTE_MICRO_BATCHES with remote experts, 1 in process
    micro_batch_min_tokens: int = MICRO_BATCH_MIN_TOKENS  # a step splits only with at least this many tokens


def merged_config(opts: ServeOptions) -> ServeConfig:
    """The TOML config (if any) with MODEL_DIR arguments added as shared models and flags on top."""
    if opts.whole_model_keep_alive and opts.experts != "in-process":
        raise ValueError("--whole-model-keep-alive needs --experts in-process (remote experts scale to zero on "
                         "their own: use --keep-alive and --trunk-keep-alive)")
    config = ServeConfig.load(opts.config) if opts.config else ServeConfig()
    s = config.server
    for name in ("host", "port", "workers", "device", "admin_key"):
        if getattr(opts, name) is not None:
            setattr(s, name, getattr(opts, name))
    if opts.keep_alive is not None:
        s.keep_alive = opts.keep_alive
    if opts.state is not None:
        s.state = opts.state
    names = list(opts.served_model_names or [])
    if names and len(opts.model_dirs) != 1 and len(names) != len(opts.model_dirs):
        raise ValueError(f"--served-model-name: {len(names)} names for {len(opts.model_dirs)} MODEL_DIRs; give the "
                         "names of one MODEL_DIR (the first is its name, the rest aliases) or one name per MODEL_DIR")
    bad = next((n for n in names if not MODEL_NAME.fullmatch(n)), None)
    if bad is not None:
        raise ValueError(f"--served-model-name {bad!r}: use letters, digits, '.', '_', '-' and '/' between them")
    for i, path in enumerate(opts.model_dirs):
        path = Path(path)
        _check_model_dir(path)
        if names and len(opts.model_dirs) == 1:
            name, aliases = names[0], names[1:]
        else:
            name, aliases = (names[i] if names else default_model_name(path)), []
        if config.model(name) is None:
            config.models.append(ModelSpec(name=name, path=path, aliases=aliases))
    if not config.models:
        raise ValueError("nothing to serve: give MODEL_DIR arguments or [[models]] in --config")
    for model in config.models:
        _check_model_dir(model.path)
        if not (model.path / "config.json").exists():
            raise ValueError(f"model {model.name!r}: no config.json in {model.path}")
        if opts.expert_block_size is not None:
            model.expert_block_size = opts.expert_block_size
        if opts.trunk_keep_alive is not None:
            model.trunk_keep_alive = opts.trunk_keep_alive
        if opts.dtype is not None:
            model.dtype = opts.dtype
    return config


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (a Hugging Face checkpoint directory is expected)")


def default_model_name(path: Path) -> str:
    """A MODEL_DIR's served name: its directory's, or the repo id of a Hugging Face cache snapshot
    (`.../models--Org--Name/snapshots/<hash>` is `Org/Name`, not the hash)."""
    for where in (Path(os.path.abspath(path)), Path(path).resolve()):  # the path as given, then links followed
        repo = where.parent.parent.name
        if where.parent.name == "snapshots" and repo.startswith("models--") and len(repo) > len("models--"):
            return repo[len("models--"):].replace("--", "/")  # the cache spells '/' as '--'; ids hold no '--'
    return Path(path).resolve().name


def check_port_free(host: str, port: int) -> None:
    """Fail at once when the HTTP port is taken, before the scheduler and workers start (seconds)."""
    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own bind: TIME_WAIT is fine
            try:
                sock.bind(address)
            except OSError as exc:
                raise _listen_error(host, port, exc) from None


def _listen_error(host: str, port: int, exc: OSError) -> ValueError:
    if exc.errno == errno.EADDRINUSE:
        return ValueError(f"port {port} on {host} is already in use (another server listens there): stop it or "
                          "choose another --port")
    return ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (a redirection made later included)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def access_logger() -> logging.Logger:
    """`--access-log`: aiohttp's access lines (client, time, request line, status, bytes) on stdout."""
    logger = logging.getLogger("faasmoe.access")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


class FrontendProcess:
    """Everything one `faasmoe serve` (or `frontend`) process runs, and its orderly shutdown."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.config = merged_config(opts)
        self.scheduler: Scheduler | None = None
        self.client: RuntimeClient | None = None
        self.compute = ComputeThread("trunk")
        self.deployments = Deployments()
        # One name per content across every model served here: shared expert functions, shared trunk tensors.
        self.functions = FunctionCatalog()
        self.digest_cache = DigestCache()
        self.shared_tensors = SharedTensors()
        self.runner: web.AppRunner | None = None
        self.tenants = None
        self.ledger: UsageLedger | None = None
        self.printed_keys: dict[str, str] = {}

    @functools.cached_property
    def trunk_device(self) -> str:
        """Where every model's trunk runs, resolved once as the pool's devices are: with no --device on a
        GPU box the trunk is on the GPU too, and --device cuda:1 means cuda:1."""
        return trunk_device(self.config.server.device)

    def _state_path(self) -> Path:
        return self.config.server.state or default_state_path()

    def _open_tenants(self) -> None:
        from faasmoe.tenancy.tenants import TenantStore

        store = TenantStore(self._state_path())
        for t in self.config.tenants:
            _, key = store.ensure_tenant(t.name, t.limits(), api_keys=t.api_keys)
            if key is not None:
                self.printed_keys[t.name] = key
        if self.config.path is not None:  # the config is the truth: what it no longer declares goes
            for name in store.remove_config_tenants(t.name for t in self.config.tenants):
                print(f"removed tenant {name}: no longer in {self.config.path}", flush=True)
        self.tenants = store if store.list_tenants() else None
        if self.tenants is None:
            store.close()

    async def start(self) -> str:
        s = self.config.server
        check_port_free(s.host, s.port)
        self._open_tenants()
        if self.tenants is None and not self.opts.api_key and s.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no API key and no tenants: listening on 127.0.0.1 only, not %s", s.host)
            print(f"no API key and no tenants configured: listening on loopback only (not {s.host})", flush=True)
            s.host = "127.0.0.1"
        self.ledger = UsageLedger(self._state_path())
        token = self.opts.token or os.environ.get("FAASMOE_TOKEN") or secrets.token_urlsafe(24)
        address = self.opts.scheduler
        if self.opts.experts == "in-process":
            pass  # the full-model baseline: no scheduler, no workers
        elif address is None:
            devices = resolve_devices(s.device)
            workers = s.workers if s.workers is not None else (len(devices) if devices[0].startswith("cuda") else 1)
            self.scheduler = Scheduler(SchedulerConfig(
                listen="127.0.0.1:0", token=token, workers=workers, devices=devices,
                worker_memory_bytes=self.opts.worker_memory, host_cache_bytes=self.opts.host_cache,
                worker_args=self._worker_args()))
            address = str(await self.scheduler.start())
            await self.scheduler.wait_for_workers(workers, timeout=120)
        if self.opts.experts != "in-process":
            self.client = await connect_scheduler(address, token, self.opts.scheduler_timeout,
                                                  self.opts.invoke_timeout, self.opts.invoke_timeout_factor)
        for model in self.config.models:
            self.deployments.add(self._deployment(model))
        self.deployments.start()
        from faasmoe.api.app import FrontendContext, create_app
        from faasmoe.api.http_server import FrontendRunner

        ctx = FrontendContext(
            deployments=self.deployments, tenants=self.tenants, api_key=self.opts.api_key,
            admin_key=s.admin_key or self.opts.api_key, admission=Admission(), ledger=self.ledger,
            cluster_state=self.cluster_state, runtime_metrics=self.runtime_metrics,
            allowed_origins=tuple(self.opts.allowed_origins), tool_call_parser=self.opts.tool_call_parser,
            auto_tool_choice=self.opts.auto_tool_choice,
        )
        self.runner = FrontendRunner(create_app(ctx), access_log=access_logger() if self.opts.access_log else None,
                                     handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, s.host, s.port)
        try:
            await site.start()
        except OSError as exc:  # taken since the check at the start
            raise _listen_error(s.host, s.port, exc) from None
        port = self.runner.addresses[0][1] if self.runner.addresses else s.port
        return f"http://{s.host}:{port}"

    def _memory_quota(self, tenant: str) -> int:
        """The tenant's resident-memory quota for its private models (0: none)."""
        if not tenant or self.tenants is None:
            return 0
        found = self.tenants.get(tenant)
        return found.memory_quota_bytes if found is not None else 0

    def _worker_args(self) -> list[str]:
        """Flags of the local pool's workers: they may load only the checkpoints served here."""
        roots = sorted({str(Path(m.path).resolve()) for m in self.config.models})
        ttl = ["--host-ttl", str(self.opts.host_ttl)] if self.opts.host_ttl is not None else []
        return ["--eviction", self.opts.eviction, *ttl, *(arg for root in roots for arg in ("--model-root", root))]

    def _deployment(self, model: ModelSpec) -> Deployment:
        s = self.config.server
        spec = DeploymentSpec(
            name=model.name, path=model.path, sharing=model.sharing, owner=model.owner or "",
            expert_block_size=model.expert_block_size, aliases=tuple(model.aliases),
            keep_alive_s=model.keep_alive if model.keep_alive is not None else s.keep_alive,
            trunk_keep_alive_s=model.trunk_keep_alive, whole_model_keep_alive_s=self.opts.whole_model_keep_alive,
            dtype=model.dtype or "float32", device=self.trunk_device,
            kv_cache_bytes=self.opts.kv_cache_memory or kv_cache_budget(torch.device(self.trunk_device),
                                                                         len(self.config.models)),
            micro_batches=self.opts.micro_batches or (1 if self.opts.experts == "in-process" else REMOTE_MICRO_BATCHES),
            micro_batch_min_tokens=self.opts.micro_batch_min_tokens,
            dedupe=model.dedupe,
        )

        def executor(dep: Deployment):
            if self.client is None:  # in process: every expert resident in this process
                def load() -> LocalExpertExecutor:
                    layout = ExpertLayout(CheckpointReader(spec.path), dep.config)
                    return LocalExpertExecutor(load_expert_blocks(layout, dep.block_size, dep.dtype, dep.device),
                                               dep.block_size)

                return InProcessExpertExecutor(load(), self.compute, spec.name,
                                               loader=load if spec.whole_model_keep_alive_s > 0 else None)
            owner = spec.owner if spec.sharing == "private" else ""
            return RemoteExpertExecutor(self.client, spec.name, spec.path, dep.config, dep.block_size, dep.dtype,
                                        spec.keep_alive_s, owner, self._memory_quota(owner), self.functions,
                                        dep.digests, spec.dedupe)

        return Deployment(spec, executor, self.compute, self.digest_cache, self.shared_tensors)

    async def _worker_stats(self) -> list:
        if self.scheduler is not None:
            return await self.scheduler.worker_stats()
        if self.client is None:
            return []
        return await self.client.cluster_state()

    async def runtime_metrics(self) -> str:
        stats = await self._worker_stats()
        texts = [s.metrics_text for s in stats]
        if self.scheduler is not None:
            texts.insert(0, self.scheduler.metrics.render())
        if self.client is None:  # in process, this process is the worker: its whole-model reloads
            texts.append(self._in_process_metrics())
        return merge_expositions(texts)

    def _in_process_metrics(self) -> str:
        """Whole-model reloads as the workers' series: a cold start loads the trunk and every expert."""
        from runtime.metrics import Registry

        registry = Registry()
        cold = registry.counter("faasmoe_expert_cold_starts_total", "Calls that loaded their function first",
                                ("worker", "source"))
        load_s = registry.counter("faasmoe_model_reload_seconds_total",
                                  "Seconds spent reloading whole models (trunk and experts) after scale to zero",
                                  ("model_name",))
        resident = registry.gauge("faasmoe_resident_expert_bytes", "Expert bytes held, per memory tier",
                                  ("worker", "tier"))
        resident.labels(worker="in-process", tier="device").set(
            sum(d.resident_expert_bytes() for d in self.deployments.by_name.values()))
        cold.labels(worker="in-process", source="disk").inc(sum(d.model_reloads for d in self.deployments.by_name.values()))
        for d in self.deployments.by_name.values():
            load_s.labels(model_name=d.name).inc(d.model_reload_s)
        return registry.render()

    async def cluster_state(self) -> dict:
        """Workers with what they hold, residency per model, and every resident function once with the
        models and tenants that use it: the admin view. Every tier counts: a model's resident_bytes are
        its device bytes plus what workers keep in their host caches; a block two models share counts
        in both models' bytes, once in the workers' and in `distinct_resident_bytes`."""
        stats = await self._worker_stats()
        host: dict[str, int] = {}
        holders: dict[str, dict[str, str]] = {}  # function -> worker -> tier
        for s in stats:
            for r in s.resident:
                holders.setdefault(r.function.function_id, {})[s.worker.worker_id] = r.tier
                if r.tier == "host":
                    host[r.function.function_id] = host.get(r.function.function_id, 0) + r.nbytes
        models = {}
        for d in self.deployments.by_name.values():
            device_bytes = d.executor.resident_bytes()
            host_bytes = sum(host.get(fid, 0) for fid in {f.function_id for f in d.executor.functions})
            models[d.name] = {"functions": len(d.executor.functions), "resident_functions": d.executor.resident_functions(),
                              "resident_bytes": device_bytes + host_bytes, "device_bytes": device_bytes,
                              "host_bytes": host_bytes, "trunk_bytes": d.trunk_bytes,
                              "distinct_functions": len({f.function_id for f in d.executor.functions})}
        functions = {}
        callers = self._callers()
        for fid, where in holders.items():
            if fid in self.functions.entries:  # another frontend's functions are its to describe
                tenants = set().union(*(callers.get(u.model, set()) for u in self.functions.users(fid)))
                functions[fid] = {**self.functions.describe(fid), "workers": where, "tenants": sorted(tenants)}
        workers = workers_json(stats)
        return {"workers": workers, "models": models, "functions": functions,
                "distinct_resident_bytes": sum(w["resident_bytes"] for w in workers),
                "distinct_trunk_bytes": self.deployments.trunk_bytes(), "time": time.time()}

    def _callers(self) -> dict[str, set[str]]:
        """Model -> the tenants that may call it: a private model's owner; every tenant allowed a shared one
        ("*" when tenancy is off: anyone with the key). Read once per admin view, not once per function."""
        tenants = self.tenants.list_tenants() if self.tenants is not None else []
        return {name: {t.name for t in tenants if d.visible_to(t.name, t.allowed_models)}
                if self.tenants is not None else ({d.spec.owner} if d.spec.sharing == "private" else {"*"})
                for name, d in self.deployments.by_name.items()}

    async def stop(self) -> None:
        """Drain: stop taking requests, finish the running ones, then stop everything."""
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()  # no new connections
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.deployments.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.runner is not None:
            await self.runner.cleanup()
        await self.deployments.stop()
        if self.client is not None:
            await self.client.close()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.ledger is not None:
            self.ledger.close()
        if self.tenants is not None:
            self.tenants.close()
        self.compute.shutdown()


async def connect_scheduler(address: str, token: str, timeout: float, invoke_timeout: float = DEADLINE_MIN_S,
                            invoke_timeout_factor: float = DEADLINE_FACTOR) -> RuntimeClient:
    """A client subscribed to the scheduler's routing table. The client redials with backoff (0.1 s up
    to 2 s); past `timeout` this raises SchedulerUnreachable naming the address and what failed."""
    client = RuntimeClient(address, token, "frontend", invoke_timeout, invoke_timeout_factor)
    try:
        return await client.start(timeout=timeout)
    except TimeoutError:
        await client.close()  # stops its redialing
        why = await _why_unreachable(address)
        raise SchedulerUnreachable(f"cannot reach the scheduler at {address}: no routing table within "
                                   f"{timeout:g}s of retries; {why}") from None


async def _why_unreachable(address: str) -> str:
    """One more dial, to tell a scheduler that is not there from one that would not let us in."""
    try:
        addr = Address.parse(address)
        if addr.kind == "unix":
            opening = asyncio.open_unix_connection(addr.path)
        else:
            opening = asyncio.open_connection(addr.host, addr.port)
        _, writer = await asyncio.wait_for(opening, 5.0)
    except (OSError, TimeoutError) as exc:
        return f"connecting fails ({exc.strerror or exc or 'timed out'}): is the scheduler running there?"
    writer.close()
    return ("it accepts connections but sent no routing table: is --token the scheduler's token, and is it "
            "a faasmoe scheduler of this version?")


async def serve(opts: ServeOptions) -> int:
    process = FrontendProcess(opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        url = await process.start()
        for tenant, key in process.printed_keys.items():
            print(f"new API key for tenant {tenant} (shown once): {key}", flush=True)
        models = ", ".join(process.deployments.by_name)
        print(f"faasmoe serving {models} at {url}/v1 (OpenAI API); metrics at {url}/metrics; "
              f"dashboard at {url}/dashboard (admin key)", flush=True)
        await stop.wait()
        print("shutting down: draining in-flight requests", flush=True)
    finally:
        await process.stop()
    return 0
