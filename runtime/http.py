"""The scheduler's HTTP side door: Prometheus `/metrics` for the whole cluster, `/cluster` JSON."""

from __future__ import annotations

from aiohttp import web

from runtime.cluster import workers_json
from runtime.metrics import CONTENT_TYPE, merge_expositions
from runtime.scheduler import Scheduler
from runtime.transport import Address


def cluster_json(scheduler: Scheduler, stats: list) -> dict:
    return {"routing_version": scheduler.version, "workers": workers_json(stats)}


async def start_http(scheduler: Scheduler, address: str) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        stats = await scheduler.worker_stats()
        text = merge_expositions([scheduler.metrics.render(), *(s.metrics_text for s in stats)])
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def cluster(_: web.Request) -> web.Response:
        return web.json_response(cluster_json(scheduler, await scheduler.worker_stats()))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/cluster", cluster)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    addr = Address.parse(address)
    await web.TCPSite(runner, addr.host, addr.port).start()
    return runner
