"""The live view: `GET /dashboard`, a static page, polls `GET /admin/dashboard.json` (admin key) every 1.5 s.

The page holds no data and needs no key to load; it asks for the admin key, keeps it in the tab's
sessionStorage and sends it as a Bearer header (a `#key=` fragment is taken once and cleared from the
address bar: fragments never reach a server or its access log, queries would). The JSON is the admin
view: every model (private ones too) as a layer x expert map of residency and recent calls, the workers
and their memory, usage per tenant from the ledger, and a rolling series of cold starts and TTFT that a
sampler in this process keeps. Residency comes from the same worker stats as `/admin/cluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from aiohttp import web

from faasmoe.api.openai_requests import invalid
from faasmoe.engine.deployments import Deployment, Deployments
from faasmoe.tenancy.ledger import UsageLedger, UsageRecord, parse_since

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}  # what /dashboard/{name} serves
HISTORY_S = 300  # the series' length, one point a second
SAMPLE_S = 1.0
LATE_S = 5.0  # a usage row is stamped before its commit: each sample looks this far back for late ones
USAGE_CACHE_S = 5.0  # the ledger's per-tenant totals are summed at most this often
DEFAULT_WINDOW_S = 60  # "recent hits": calls in the last minute (the counters keep no more)
# The page loads only its own script and style and talks only to this origin.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class History:
    """A rolling series kept by the frontend: per second, cold starts, expert calls, finished requests
    and their time to first token (from the ledger rows of requests that finished in that second)."""

    def __init__(self, horizon_s: int = HISTORY_S) -> None:
        self.points: deque[dict] = deque(maxlen=horizon_s)
        self._totals = (0, 0)  # (cold starts, calls) at the last sample; the counters start with the process
        self._cursor = time.time()  # rows finished before the sampler started are not series points
        self._seen: dict[str, float] = {}  # request id -> finished_at, for rows within LATE_S of the cursor

    def sample(self, deployments: Deployments, rows: list[UsageRecord], now: float) -> None:
        cold = sum(d.executor.hits.cold_starts + d.model_reloads for d in deployments.by_name.values())
        calls = sum(d.executor.hits.calls for d in deployments.by_name.values())
        last, self._totals = self._totals, (cold, calls)
        ttfts = [r.ttft_s for r in rows if r.ttft_s is not None]
        self.points.append({
            "t": round(now, 3), "cold_starts": cold - last[0], "calls": calls - last[1], "requests": len(rows),
            "ttft_avg_s": sum(ttfts) / len(ttfts) if ttfts else None, "ttft_max_s": max(ttfts, default=None)})

    def finished_rows(self, ledger: UsageLedger, now: float) -> list[UsageRecord]:
        """Final usage rows not seen before (blocking: run it off the loop)."""
        since = self._cursor - LATE_S
        rows = [r for r in ledger.query(since=since) if r.status != "running" and r.request_id not in self._seen]
        self._seen = {rid: t for rid, t in self._seen.items() if t >= since}
        self._seen.update((r.request_id, r.finished_at) for r in rows)
        self._cursor = now
        return rows

    def json(self) -> dict:
        """The series as columns: {"t": [...], "cold_starts": [...], ...}."""
        keys = ("t", "cold_starts", "calls", "requests", "ttft_avg_s", "ttft_max_s")
        return {k: [p[k] for p in self.points] for k in keys}

    async def run(self, deployments: Deployments, ledger: UsageLedger | None, io: Executor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SAMPLE_S)
            try:
                now = time.time()
                rows = await loop.run_in_executor(io, self.finished_rows, ledger, now) if ledger is not None else []
                self.sample(deployments, rows, now)
            except Exception:  # one failed round must not end the series
                log.exception("the dashboard's sampler failed a round")


@dataclass
class Dashboard:
    """What the two routes need from the app, handed over by `install` (app.py imports us, not we it)."""

    authorize: Callable[[web.Request], Awaitable[object]]  # raises the API's 401/403 unless admin
    context: web.AppKey  # -> FrontendContext
    off_loop: web.AppKey  # -> the frontend's thread pool for SQLite and other blocking work
    history: History = field(default_factory=History)
    _usage: tuple[float, str, list[dict]] | None = None  # (when, since, rows): the last ledger summary
    _assets: dict[str, bytes] = field(default_factory=dict)

    def asset(self, name: str) -> bytes:
        if name not in self._assets:
            self._assets[name] = (STATIC / name).read_bytes()
        return self._assets[name]


DASHBOARD = web.AppKey("dashboard", Dashboard)


def install(app: web.Application, authorize: Callable[[web.Request], Awaitable[object]], context: web.AppKey,
            off_loop: web.AppKey) -> None:
    """Add the page, its assets, the JSON and the sampler to the frontend's app."""
    app[DASHBOARD] = Dashboard(authorize, context, off_loop)
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/{asset}", asset)
    app.router.add_get("/admin/dashboard.json", data)
    app.cleanup_ctx.append(_sampler)


async def _sampler(app: web.Application):
    dash = app[DASHBOARD]
    ctx = app[dash.context]
    task = asyncio.create_task(dash.history.run(ctx.deployments, ctx.ledger, app[dash.off_loop]),
                               name="dashboard-sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def page(request: web.Request) -> web.Response:
    """GET /dashboard: the page (no data in it, so no key needed to load it)."""
    body = request.app[DASHBOARD].asset("dashboard.html")
    return web.Response(body=body, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


async def asset(request: web.Request) -> web.Response:
    """GET /dashboard/{dashboard.js,dashboard.css}"""
    name = request.match_info["asset"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.Response(body=request.app[DASHBOARD].asset(name), content_type=ASSETS[name], charset="utf-8",
                        headers=PAGE_HEADERS)


async def data(request: web.Request) -> web.Response:
    """GET /admin/dashboard.json[?window=S][&since=1h] (admin key): everything the page draws.

    `window` (1-60, default 60) is the span of the recent-hit counts; `since` limits the usage totals."""
    dash = request.app[DASHBOARD]
    await dash.authorize(request)
    ctx = request.app[dash.context]
    window = _window(request.query.get("window"))
    since_text = request.query.get("since", "")
    try:
        since = parse_since(since_text) if since_text else None
    except ValueError as exc:
        raise invalid(str(exc), "since") from None
    cluster_error = None
    try:
        cluster = await ctx.cluster_state()
    except Exception as exc:  # a scheduler outage must not blank the frontend's own numbers
        log.warning("the dashboard could not read the cluster: %r", exc)
        cluster, cluster_error = {"workers": []}, f"{type(exc).__name__}: {exc}"
    workers = cluster.get("workers", [])
    device_ids = {f for w in workers for f in w.get("resident_functions", ())}
    host_ids = {f for w in workers for f in w.get("host_functions", ())} - device_ids
    deployments = list(ctx.deployments.by_name.values())
    usage = await _usage(request, dash, ctx.ledger, since_text, since)
    return web.json_response({
        "time": time.time(),
        "window_s": window,
        "models": [model_json(d, device_ids, host_ids, window) for d in deployments],
        "workers": [_worker(w) for w in workers],
        "frontend": {"pid": os.getpid(), "rss_bytes": _rss(os.getpid()),
                     "trunk_bytes": ctx.deployments.trunk_bytes()},  # a tensor trunks share counts once
        "cluster_error": cluster_error,
        "usage": {"since": since, "ledger": ctx.ledger is not None, "rows": usage},
        "series": dash.history.json(),
    }, headers={"Cache-Control": "no-store"})


def _window(text: str | None) -> int:
    if text is None:
        return DEFAULT_WINDOW_S
    try:
        window = int(text)
    except ValueError:
        window = 0
    if not 1 <= window <= DEFAULT_WINDOW_S:
        raise invalid(f"window must be a whole number of seconds from 1 to {DEFAULT_WINDOW_S}.", "window")
    return window


def model_json(d: Deployment, device_ids: set[str], host_ids: set[str], window_s: int) -> dict:
    """One model's residency and recent calls per (MoE layer, block): tier "device" | "host" | "cold"."""
    functions = d.executor.functions
    ids = {f.function_id for f in functions}
    # In-process experts (--experts in-process) are in no worker's stats: all held here, or none.
    in_process = not ids & (device_ids | host_ids) and 0 < d.executor.resident_functions() == len(functions)
    hits = d.executor.hits.recent(window_s)
    layers: dict[int, list] = {}
    for f in sorted(functions, key=lambda f: (f.layer, f.first)):
        tier = "device" if in_process or f.function_id in device_ids else "host" if f.function_id in host_ids else "cold"
        layers.setdefault(f.layer, []).append((f, tier))
    first_layer = next(iter(layers.values()), [])
    tiers = [t for blocks in layers.values() for _, t in blocks]
    return {
        "name": d.name, "sharing": d.spec.sharing, "owner": d.spec.owner, "family": d.config.family,
        "num_layers": d.config.num_layers, "num_experts": d.config.num_experts, "block_size": d.block_size,
        "blocks": [[f.first, f.count] for f, _ in first_layer],  # (first expert, count): the same in every layer
        "layers": [{"layer": layer, "tiers": [t for _, t in blocks], "hits": [hits.get(f.function_id, 0) for f, _ in blocks]}
                   for layer, blocks in layers.items()],
        "functions": len(functions),
        "shared_with": d.executor.sharing(),  # other model -> this model's blocks it holds the same bytes of
        "resident": {tier: tiers.count(tier) for tier in ("device", "host", "cold")},
        "expert_bytes": d.executor.nbytes, "resident_bytes": d.resident_expert_bytes(), "trunk_bytes": d.trunk_bytes,
        "running": d.engine.running_of(d.name), "waiting": d.engine.waiting_of(d.name),
        "steps_with": [m for m in d.engine.members if m != d.name],  # models whose sequences batch with its own
        "calls": d.executor.hits.calls, "cold_starts": d.executor.hits.cold_starts + d.model_reloads,
    }


_NODE = socket.gethostname()


def _worker(w: dict) -> dict:
    """A worker of /admin/cluster with its lists counted, and its RSS when it runs on this machine."""
    out = {k: v for k, v in w.items() if k not in ("resident_functions", "host_functions")}
    out["device_functions"] = len(w.get("resident_functions", ()))
    out["host_functions"] = len(w.get("host_functions", ()))
    out["rss_bytes"] = _rss(w.get("pid", 0)) if w.get("node") == _NODE else None
    return out


def _rss(pid: int) -> int | None:
    if not pid:
        return None
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.Error, OSError):
        return None


async def _usage(request: web.Request, dash: Dashboard, ledger: UsageLedger | None, since_text: str,
                 since: float | None) -> list[dict]:
    """Totals per (tenant, model) from the ledger, summed again at most every USAGE_CACHE_S."""
    if ledger is None:
        return []
    cached, now = dash._usage, time.monotonic()
    if cached is not None and cached[1] == since_text and now - cached[0] < USAGE_CACHE_S:
        return cached[2]
    loop = asyncio.get_running_loop()
    rows = await loop.run_in_executor(request.app[dash.off_loop], ledger.summary, None, since)
    dash._usage = (now, since_text, rows)
    return rows
