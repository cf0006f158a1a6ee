"""The frontend's Prometheus series: vLLM's names with the prefix faasmoe_, label `model_name`.

Request series are recorded by `InFlightRequest` when a request ends; engine state (queue depths,
KV cache) is read when scraped, and the exposition is written off the loop (prometheus_client takes
~20 µs a line: many tenants' histograms are tens of ms). HTTP requests are counted by
`FrontendMetrics.count_http`, the outermost middleware, so every status the errors middleware renders shows.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from faasmoe.engine.deployments import Deployments
from runtime.metrics import REQUEST_BUCKETS, TOKEN_BUCKETS, Registry

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "none"  # the `handler` of a request no route matched (prometheus-fastapi-instrumentator's)


class FrontendMetrics:
    """The frontend process's registry, with its process metrics (`component="frontend"`)."""

    def __init__(self) -> None:
        self.registry = r = Registry("frontend")
        per_request = ("model_name", "tenant")
        self.ttft = r.histogram("faasmoe_time_to_first_token_seconds",
                                "Time from arrival to the first generated token.", per_request)
        self.itl = r.histogram("faasmoe_inter_token_latency_seconds", "Time between two tokens of a request.",
                               per_request)
        self.e2e = r.histogram("faasmoe_e2e_request_latency_seconds", "Time from arrival to the last token.",
                               per_request, REQUEST_BUCKETS)
        self.queue_time = r.histogram("faasmoe_request_queue_time_seconds",
                                      "Time a request waited in the model's queue before the engine took it.",
                                      per_request, REQUEST_BUCKETS)
        self.prefill_time = r.histogram("faasmoe_request_prefill_time_seconds",
                                        "Time from the engine taking a request to its first token.",
                                        per_request, REQUEST_BUCKETS)
        self.decode_time = r.histogram("faasmoe_request_decode_time_seconds",
                                       "Time from a request's first token to its last.", per_request, REQUEST_BUCKETS)
        self.cold_start = r.histogram("faasmoe_request_cold_start_seconds",
                                      "Time a request's steps waited for expert blocks to load (0: all were warm).",
                                      per_request)
        self.request_prompt_tokens = r.histogram("faasmoe_request_prompt_tokens", "Prompt tokens per request.",
                                                 per_request, TOKEN_BUCKETS)
        self.request_generation_tokens = r.histogram("faasmoe_request_generation_tokens",
                                                     "Generated tokens per request.", per_request, TOKEN_BUCKETS)
        self.running = r.gauge("faasmoe_num_requests_running", "Sequences in the model's running batch.",
                               ("model_name",))
        self.waiting = r.gauge("faasmoe_num_requests_waiting", "Requests queued for the model's batch.",
                               ("model_name",))
        self.kv_usage = r.gauge("faasmoe_kv_cache_usage_perc",
                                "KV cache reserved by running sequences (prompt + max_tokens each), as a fraction "
                                "of the model's KV cache budget; at 1 new requests wait.", ("model_name",))
        self.kv_allocated = r.gauge("faasmoe_kv_cache_allocated_bytes",
                                    "KV cache memory the running sequences' caches hold now.", ("model_name",))
        self.prompt_tokens = r.counter("faasmoe_prompt_tokens_total", "Prompt tokens processed.", per_request)
        self.generation_tokens = r.counter("faasmoe_generation_tokens_total", "Tokens generated.", per_request)
        self.success = r.counter("faasmoe_request_success_total",
                                 "Requests that ended without an error, by finished reason (stop, length, abort).",
                                 (*per_request, "finished_reason"))
        self.errors = r.counter("faasmoe_request_errors_total", "Requests whose generation failed.", per_request)
        self.rejected = r.counter("faasmoe_requests_rejected_total",
                                  "Requests refused by admission or a full queue, by error code.", ("tenant", "code"))
        self.prefetches = r.counter("faasmoe_expert_prefetches_total",
                                    "Expert blocks loaded ahead of their layer (pre-gating): issued, then used or "
                                    "wasted by that layer's call.", ("model_name", "outcome"))
        self.lanes = r.counter("faasmoe_fair_share_lanes_total",
                               "Prefills stepped at once beside the running batch for a tenant with nothing "
                               "running and the least service (faasmoe.engine.fairness).", ("model_name",))
        self.virtual_tokens = r.gauge("faasmoe_fair_share_virtual_tokens",
                                      "Each busy tenant's virtual token counter on the model: the service it got, "
                                      "in weighted tokens over its weight (the least served goes first).",
                                      ("model_name", "tenant"))
        self.http_requests = r.counter("faasmoe_http_requests_total",
                                       "HTTP requests answered, by method, route template and status.",
                                       ("method", "handler", "status"))
        self._prefetches_seen: dict[tuple[str, str], int] = {}
        self._lanes_seen: dict[str, int] = {}
        self._tenants_shown: dict[str, set[str]] = {}

    def read_engines(self, deployments: Deployments) -> None:
        """Queue depths and KV caches are read when scraped (on the event loop: the engines own them)."""
        for d in deployments.by_name.values():
            engine = d.engine
            self.running.labels(model_name=d.name).set(engine.running_of(d.name))  # co-batched models share an engine
            self.waiting.labels(model_name=d.name).set(engine.waiting_of(d.name))
            if engine.kv_budget_bytes:  # an unbounded cache has no usage fraction
                self.kv_usage.labels(model_name=d.name).set(engine.kv_reserved_bytes() / engine.kv_budget_bytes)
            self.kv_allocated.labels(model_name=d.name).set(engine.kv_allocated_bytes())
            lanes = engine.lanes_by_model.get(d.name, 0)
            if lanes > self._lanes_seen.get(d.name, 0):
                self.lanes.labels(model_name=d.name).inc(lanes - self._lanes_seen.get(d.name, 0))
                self._lanes_seen[d.name] = lanes
            shown = self._tenants_shown.setdefault(d.name, set())
            for tenant in shown - set(engine.fair.counters):  # idle since: its counter is gone
                self.virtual_tokens.labels(model_name=d.name, tenant=tenant).set(0)
            for tenant, counter in engine.fair.counters.items():
                self.virtual_tokens.labels(model_name=d.name, tenant=tenant).set(counter)
            shown |= set(engine.fair.counters)
            for outcome, count in vars(d.executor.prefetch_stats).items():  # the executor counts; we publish
                seen = self._prefetches_seen.get((d.name, outcome), 0)
                if count > seen:
                    self.prefetches.labels(model_name=d.name, outcome=outcome).inc(count - seen)
                    self._prefetches_seen[(d.name, outcome)] = count

    @web.middleware
    async def count_http(self, request: web.Request, handler) -> web.StreamResponse:
        """Count every answered request by its route's template (`/v1/models/{model}`, not the URL), so
        that the series stay bounded whatever clients send."""
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:  # the client left mid-handler: nginx's 499, as the errors middleware says
            status = 499
            raise
        finally:
            resource = request.match_info.route.resource
            method = request.method if request.method in _METHODS else "other"
            self.http_requests.labels(method=method, handler=resource.canonical if resource else UNMATCHED,
                                      status=str(status)).inc()


def finished_reason(engine_reason: str) -> str:
    """vLLM's finished reason for the engine's: a cancelled request is an `abort`."""
    return "abort" if engine_reason == "cancelled" else engine_reason
