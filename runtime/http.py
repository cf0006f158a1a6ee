"""The scheduler's HTTP side door: Prometheus `/metrics` for the whole cluster, `/cluster` JSON."""

from __future__ import annotations

from aiohttp import web

from runtime.metrics import CONTENT_TYPE, merge_expositions
from runtime.scheduler import Scheduler
from runtime.transport import Address


def cluster_json(scheduler: Scheduler, stats: list) -> dict:
    return {
        "routing_version": scheduler.version,
        "workers": [
            {
                "id": s.worker.worker_id, "pid": s.worker.pid, "address": s.worker.address,
                "device": s.worker.device, "budget_bytes": s.worker.budget_bytes,
                "resident_bytes": int(s.counters.get("device_bytes", 0)),
                "host_cache_bytes": int(s.counters.get("host_bytes", 0)),
                "resident": sorted(r.function.function_id for r in s.resident if r.tier == "device"),
            }
            for s in stats
        ],
    }


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
