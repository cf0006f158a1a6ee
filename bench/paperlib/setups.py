"""The paper's four deployments, as real `faasmoe` processes on loopback.

    baseline            one `faasmoe serve --experts in-process` per tenant: a full model each
    whole-model         the same, with `--whole-model-keep-alive` = the experts' keep-alive: an idle
                        tenant's trunk and experts unload together and its next request reloads the
                        whole model (scale to zero per model, as Knative / Ray Serve min_replicas=0)
    faasmoe-private     one `faasmoe scheduler` pool; one `faasmoe frontend` per tenant whose model
                        is deployed private to it (its own expert functions, `tenant:model/l/b`)
    faasmoe-shared      one scheduler pool and one frontend serving one shared model to all tenants
                        (one engine: tokens of all tenants batch together per expert)
    local-distribution  one scheduler pool; one frontend (trunk) per tenant, all deploying the same
                        shared model with keep_alive = inf: expert functions on always-on workers

With private models (`SetupOptions.tenant_models`: one fine-tune per tenant, same architecture),
every tenant's requests go to its own checkpoint in every setup; faasmoe-shared then serves all of
them from one frontend and one pool, each model private to its tenant, so only the processes are
shared, not the experts.

faasmoe-shared runs as `faasmoe scheduler` + one `faasmoe frontend` rather than one `faasmoe serve`
(the same FrontendProcess code; serve only puts the scheduler in the frontend's process) because
serve has no --host-cache or --keep-alive-policy: on a CPU worker the host tier is the same RAM as
the device tier, so a block that scales to zero would stay in RSS (default host cache: 25% of RAM,
600 s) unless the host cache is off, and the keep-alive sweep needs the adaptive policy. The extra
scheduler process is counted in the setup's CPU and memory.

Every process runs torch with `SetupOptions.threads` intra-op threads (OMP_NUM_THREADS). The
benchmark's default, `auto_threads`, divides the cores among the frontends that compute at the same
time: more OpenMP threads than cores spin-wait on each other (a tiny model's in-process decode ran
3-10x slower with two threads per process than with one, next to other busy processes on 2 cores).
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import Process, faasmoe, free_port

SETUPS = ("baseline", "whole-model", "faasmoe-private", "faasmoe-shared", "local-distribution")
IN_PROCESS = ("baseline", "whole-model")  # full models in the frontends, no worker pool
ADMIN_KEY = "fm-bench-admin-0123456789abcdefghijklmnop"
TOKEN = "faasmoe-bench-paper"
START_TIMEOUT_S = 300.0


@dataclass
class SetupOptions:
    """How the FaaSMoE setups deploy the model (the baseline uses model_dir, dtype and device)."""

    model_dir: Path
    model_name: str = "moe"
    dtype: str = "bfloat16"
    device: str = "cpu"
    block_size: int = 4
    keep_alive_s: float = 10.0
    keep_alive_policy: str = "fixed"  # or "adaptive"
    eviction: str = "lru"  # or "freq"
    worker_memory: int | None = None  # bytes per worker; None: the worker's default (90% of free)
    host_cache: int | None = 1  # bytes per worker; 1 = off (on CPU it is the same RAM); None: the worker's default
    workers: int = 1
    trunk_keep_alive_s: float = 0.0
    threads: int | None = 1  # torch threads per process (OMP_NUM_THREADS); None: torch's default
    tenant_models: dict[str, Path] | None = None  # private models: each tenant's own checkpoint; None: model_dir

    def model_of(self, tenant: str) -> Path:
        return self.tenant_models[tenant] if self.tenant_models else self.model_dir

    @property
    def env(self) -> dict[str, str] | None:
        if self.threads is None:
            return None
        return {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}

    def describe(self) -> dict:
        return {"model": str(self.model_dir), "dtype": self.dtype, "device": self.device,
                "expert_block_size": self.block_size, "keep_alive_s": self.keep_alive_s,
                "keep_alive_policy": self.keep_alive_policy, "eviction": self.eviction,
                "worker_memory": self.worker_memory, "host_cache": self.host_cache, "workers": self.workers,
                "trunk_keep_alive_s": self.trunk_keep_alive_s, "threads": self.threads,
                "tenant_models": {t: str(m) for t, m in self.tenant_models.items()} if self.tenant_models else None}


@dataclass(frozen=True)
class Endpoint:
    """Where one tenant sends its requests."""

    tenant: str
    url: str
    key: str
    model: str


@dataclass
class RunningSetup:
    """A started setup: its processes by group (a tenant, 'pool', 'frontend'), endpoints, admin URLs."""

    name: str
    options: SetupOptions
    processes: dict[str, Process] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    frontends: dict[str, str] = field(default_factory=dict)  # group -> frontend URL
    remote: bool = True  # experts on workers (False: the in-process baseline)

    def root_pids(self) -> dict[str, int]:
        return {group: p.proc.pid for group, p in self.processes.items()}

    def check_alive(self) -> None:
        dead = [g for g, p in self.processes.items() if not p.alive()]
        if dead:
            tails = "\n".join(f"--- {g} ---\n" + "\n".join(self.processes[g].lines[-15:]) for g in dead)
            raise RuntimeError(f"{self.name}: process(es) exited: {', '.join(dead)}\n{tails}")

    def stop(self) -> None:
        # Frontends first (they drain), the scheduler pool last: its workers go with it.
        for group in sorted(self.processes, key=lambda g: g == "pool"):
            self.processes[group].stop(timeout=20)


def auto_threads(setup: str, tenants: int, cores: int) -> int:
    """Torch threads per process: the cores divided among the setup's concurrently busy frontends
    (one per tenant, except faasmoe-shared's one); workers compute in turn with their frontends."""
    frontends = 1 if setup == "faasmoe-shared" else tenants
    return max(1, cores // frontends)


def tenant_key(tenant: str) -> str:
    return f"fm-{tenant}-bench-0123456789abcdefghijklmnop"


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))


def _seconds(value: float) -> str:
    return "inf" if value == float("inf") else repr(float(value))


def _config(path: Path, port: int, state: Path, opts: SetupOptions, models: list[dict], tenants: list[str]) -> Path:
    lines = ["[server]", f"port = {port}", f"state = {_toml_str(state)}", f"admin_key = {_toml_str(ADMIN_KEY)}",
             f"device = {_toml_str(opts.device)}", f"keep_alive = {_seconds(opts.keep_alive_s)}", ""]
    for m in models:
        lines += ["[[models]]", f"name = {_toml_str(m['name'])}", f"path = {_toml_str(m.get('path', opts.model_dir))}",
                  f"dtype = {_toml_str(opts.dtype)}", f"expert_block_size = {opts.block_size}",
                  f"keep_alive = {_seconds(m.get('keep_alive', opts.keep_alive_s))}",
                  f"trunk_keep_alive = {_seconds(opts.trunk_keep_alive_s)}"]
        if m.get("owner"):
            lines += ['sharing = "private"', f"owner = {_toml_str(m['owner'])}"]
        lines.append("")
    for t in tenants:
        lines += ["[[tenants]]", f"name = {_toml_str(t)}", 'models = ["*"]',
                  f"api_keys = [{_toml_str(tenant_key(t))}]", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _get_json(url: str, key: str | None = None, timeout: float = 10.0) -> dict:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_serving(setup: RunningSetup, groups: list[str], pool_http: str | None = None, workers: int = 0) -> None:
    """Wait until every frontend serves and the pool's workers registered; stop everything if not."""
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        for group in groups:
            setup.processes[group].wait_for("faasmoe serving", timeout=max(1.0, deadline - time.monotonic()))
        while pool_http and len(_get_json(f"http://{pool_http}/cluster").get("workers", [])) < workers:
            if time.monotonic() > deadline or not setup.processes["pool"].alive():
                raise TimeoutError(f"workers of {setup.name} did not register:\n{setup.processes['pool'].output}")
            time.sleep(0.2)
    except Exception:
        setup.stop()
        raise


def _start_pool(setup: RunningSetup, opts: SetupOptions) -> tuple[str, str]:
    """Start the scheduler and its local workers; returns (its address, its HTTP address). The
    frontends start while the workers do; `_wait_serving` waits for both."""
    listen, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    args = ["scheduler", "--listen", listen, "--token", TOKEN, "--workers", str(opts.workers),
            "--device", opts.device, "--eviction", opts.eviction, "--keep-alive-policy", opts.keep_alive_policy,
            "--http", http]
    if opts.host_cache is not None:
        args += ["--host-cache", str(opts.host_cache)]
    if opts.worker_memory:
        args += ["--worker-memory", str(opts.worker_memory)]
    setup.processes["pool"] = faasmoe(*args, env=opts.env)
    try:
        setup.processes["pool"].wait_for("metrics at http", timeout=120)
    except TimeoutError:
        setup.stop()
        raise
    return listen, http


def start_setup(name: str, tenants: list[str], opts: SetupOptions, workdir: Path) -> RunningSetup:
    """Start every process of setup `name` for these tenants and wait until all of them serve."""
    if name not in SETUPS:
        raise ValueError(f"unknown setup {name!r}; choose from {', '.join(SETUPS)}")
    root = workdir / name
    setup = RunningSetup(name, opts, remote=name not in IN_PROCESS)
    if name in IN_PROCESS:
        whole = ["--whole-model-keep-alive", repr(float(opts.keep_alive_s))] if name == "whole-model" else []
        for t in tenants:
            port = free_port()
            model = {"name": opts.model_name, "path": opts.model_of(t)}
            cfg = _config(root / f"{t}.toml", port, root / f"{t}.db", opts, [model], [t])
            setup.processes[t] = faasmoe("serve", "--config", str(cfg), "--experts", "in-process", *whole, env=opts.env)
            setup.frontends[t] = f"http://127.0.0.1:{port}"
            setup.endpoints[t] = Endpoint(t, setup.frontends[t], tenant_key(t), opts.model_name)
        _wait_serving(setup, tenants)
        return setup
    address, pool_http = _start_pool(setup, opts)
    if name == "faasmoe-shared":
        port = free_port()
        if opts.tenant_models:  # one frontend and pool; each tenant's own model, private to it
            models = {t: {"name": f"{opts.model_name}-{t}", "owner": t, "path": opts.model_of(t)} for t in tenants}
        else:
            models = {t: {"name": opts.model_name} for t in tenants}
        unique = list({m["name"]: m for m in models.values()}.values())
        cfg = _config(root / "frontend.toml", port, root / "frontend.db", opts, unique, tenants)
        setup.processes["frontend"] = faasmoe("frontend", "--config", str(cfg), "--scheduler", address,
                                              "--token", TOKEN, env=opts.env)
        setup.frontends["frontend"] = f"http://127.0.0.1:{port}"
        for t in tenants:
            setup.endpoints[t] = Endpoint(t, setup.frontends["frontend"], tenant_key(t), models[t]["name"])
        _wait_serving(setup, ["frontend"], pool_http, opts.workers)
        return setup
    for t in tenants:
        port = free_port()
        if name == "faasmoe-private":
            model = {"name": f"{opts.model_name}-{t}", "owner": t, "path": opts.model_of(t)}
        else:  # local-distribution: the same shared functions for every tenant's trunk, never expiring
            model = {"name": opts.model_name, "keep_alive": float("inf"), "path": opts.model_of(t)}
        cfg = _config(root / f"{t}.toml", port, root / f"{t}.db", opts, [model], [t])
        setup.processes[t] = faasmoe("frontend", "--config", str(cfg), "--scheduler", address, "--token", TOKEN,
                                     env=opts.env)
        setup.frontends[t] = f"http://127.0.0.1:{port}"
        setup.endpoints[t] = Endpoint(t, setup.frontends[t], tenant_key(t), model["name"])
    _wait_serving(setup, tenants, pool_http, opts.workers)
    return setup


def admin_cluster(url: str) -> dict:
    """GET /admin/cluster of one frontend."""
    return _get_json(f"{url}/admin/cluster", ADMIN_KEY)


def tenant_usage(endpoint: Endpoint) -> dict:
    """The tenant's ledger totals (summed over models): requests, tokens, invocations, cold starts."""
    rows = _get_json(f"{endpoint.url}/v1/usage", endpoint.key)["data"]
    keys = ("requests", "completion_tokens", "prompt_tokens", "expert_invocations", "cold_starts")
    return {k: sum(r.get(k, 0) or 0 for r in rows) for k in keys}
