"""The scheduler's HTTP side door: Prometheus `/metrics` for the whole cluster, `/cluster` JSON.

No key is needed, but only a scrape with the cluster token (`Authorization: Bearer TOKEN`) sees
tenants and private functions by name; anyone else gets the same totals without those names.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from runtime.cluster import workers_json
from runtime.metrics import CONTENT_TYPE, merge_expositions, redact_exposition
from runtime.scheduler import Scheduler
from runtime.transport import Address

# Labels that could name a tenant or a private model; summed away for an anonymous scrape.
PRIVATE_LABELS = ("tenant", "model", "model_name", "function", "owner")


def cluster_json(scheduler: Scheduler, stats: list, private: bool = True) -> dict:
    return {"routing_version": scheduler.version, "workers": workers_json(stats, private)}


def has_cluster_token(request: web.Request, token: str) -> bool:
    scheme, _, key = request.headers.get("Authorization", "").strip().partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), token.encode())


async def start_http(scheduler: Scheduler, address: str) -> web.AppRunner:
    token = scheduler.config.token

    async def metrics(request: web.Request) -> web.Response:
        stats = await scheduler.worker_stats()
        text = merge_expositions([scheduler.metrics.render(), *(s.metrics_text for s in stats)])
        if not has_cluster_token(request, token):
            text = redact_exposition(text, aggregate=PRIVATE_LABELS)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def cluster(request: web.Request) -> web.Response:
        private = has_cluster_token(request, token)
        return web.json_response(cluster_json(scheduler, await scheduler.worker_stats(), private))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/cluster", cluster)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    addr = Address.parse(address)
    await web.TCPSite(runner, addr.host, addr.port).start()
    return runner
