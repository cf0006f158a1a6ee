"""The frontend's HTTP API: OpenAI-compatible generation, models, health, metrics, usage, admin.

Handlers are thin: authenticate, validate (`faasmoe.openai_api`), admit, submit to the model's
engine, and move its events to JSON or server-sent events (`faasmoe.openai_responses`). Every
failure leaves through one middleware that renders OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.metadata
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from faasmoe.api import dashboard
from faasmoe.api.inflight import ClientGone, InFlightRequest
from faasmoe.api.metrics import FrontendMetrics
from faasmoe.api.openai_requests import (
    ApiError,
    GenerationBody,
    PreparedPrompt,
    detokenize_body,
    error_body,
    invalid,
    model_not_found,
    parse_chat,
    parse_completion,
    parse_json_body,
    prepare_all,
    prompt_top_logprobs,
    resolve_tools,
    tokenize_body,
)
from faasmoe.api.openai_responses import ResponseShape, usage_dict
from faasmoe.api.responses_api import ResponsesShape, parse_responses_json
from faasmoe.api.tool_parsers import DEFAULT_PARSER
from faasmoe.engine.deployments import Deployment, Deployments
from faasmoe.engine.requests import Finished, GenerationRequest, TokenEvent, Usage
from faasmoe.engine.sampling import SamplingParams
from faasmoe.engine.structured import StructuredOutputError
from faasmoe.tenancy.admission import Admission
from faasmoe.tenancy.ledger import UsageLedger, parse_since
from faasmoe.tenancy.tenants import Tenant, TenantStore
from runtime.metrics import CONTENT_TYPE, merge_expositions, redact_exposition

log = logging.getLogger(__name__)

# A long context's token ids or messages, with room to spare; a larger body is a 413 before it is parsed.
MAX_BODY_BYTES = 8 * 2**20
# A body that trickles in holds a connection and a handler; past this it is a 408 (the request head has
# its own deadline in the server, faasmoe/api/http_server.py).
BODY_READ_TIMEOUT_S = 30.0
# Threads for the work of a request that is not the model's: JSON parsing, chat templates, tokenizing,
# SQLite (keys, usage rows). Not the trunk's compute thread, so a long prompt never waits behind a step.
OFF_LOOP_THREADS = 2
# Who calls with the admin key generates as this tenant; the leading "_" is not a valid tenant
# name, so it never shares limits or usage rows with a real one.
ADMIN_TENANT = "_admin"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class FrontendContext:
    """What the HTTP layer serves from; built by `faasmoe serve` / `faasmoe frontend`."""

    deployments: Deployments
    tenants: TenantStore | None  # None: single-tenant mode
    api_key: str | None  # single-tenant key; None with tenants None = open (loopback only; the CLI enforces)
    admin_key: str | None
    admission: Admission
    ledger: UsageLedger | None
    cluster_state: Callable[[], Awaitable[dict]]  # the body of GET /admin/cluster
    runtime_metrics: Callable[[], Awaitable[str]]  # Prometheus text of the scheduler and workers
    max_waiting: int = 512  # requests queued per model before new ones get 503 (bounded queues)
    allowed_origins: tuple[str, ...] = ()  # CORS: origins browsers may call from ("*": any); () = off
    tool_call_parser: str | None = None  # how models name tool calls (hermes, mistral); None: by model family
    auto_tool_choice: bool = True  # tool_choice "auto" lets the model decide to call (vLLM's --enable-auto-tool-choice)


@dataclass
class Principal:
    """The authenticated caller: the tenant it acts as and whether it may use the admin API."""

    tenant: Tenant
    admin: bool


CONTEXT = web.AppKey("context", FrontendContext)
METRICS = web.AppKey("metrics", FrontendMetrics)
BACKGROUND = web.AppKey("background", set)
OFF_LOOP = web.AppKey("off_loop", ThreadPoolExecutor)


def create_app(ctx: FrontendContext) -> web.Application:
    """The aiohttp application of one frontend."""
    series = FrontendMetrics()
    app = web.Application(middlewares=[series.count_http, _cors_preflight, _errors], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT] = ctx
    app[METRICS] = series
    app[BACKGROUND] = set()
    app[OFF_LOOP] = ThreadPoolExecutor(OFF_LOOP_THREADS, thread_name_prefix="frontend-off-loop")
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)  # HF ids hold a '/': Org/Name
    app.router.add_get("/v1/usage", usage)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/version", version)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", ping)
    app.router.add_post("/ping", ping)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/cluster", cluster)
    dashboard.install(app, authorize=_require_admin, context=CONTEXT, off_loop=OFF_LOOP)  # /dashboard, its JSON
    app.on_response_prepare.append(_cors_headers)
    app.on_shutdown.append(_finish_background)
    app.on_cleanup.append(_stop_off_loop)
    return app


async def _stop_off_loop(app: web.Application) -> None:
    app[OFF_LOOP].shutdown(wait=True, cancel_futures=True)


async def _off_loop(request: web.Request, fn: Callable, *args):
    """`fn(*args)` in the frontend's small thread pool: work that would stall every stream on the loop."""
    return await asyncio.get_running_loop().run_in_executor(request.app[OFF_LOOP], fn, *args)


async def _finish_background(app: web.Application) -> None:
    """Let abandoned requests record their usage before the process goes."""
    tasks = list(app[BACKGROUND])
    if tasks:
        await asyncio.wait(tasks, timeout=15.0)


# --- the one error path ------------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc)
    except StructuredOutputError as exc:  # a field (output constraint, tools) that cannot be served as sent
        return _error_response(invalid(str(exc), exc.param))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error"}.get(exc.status, "server_error" if exc.status >= 500 else
                                                   "invalid_request_error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else \
            f"{exc.reason}: {request.method} {request.path}"
        code = {413: "request_too_large"}.get(exc.status)
        return _error_response(ApiError(exc.status, message, kind, code=code), dict(exc.headers))
    except ConnectionResetError:  # the client left; nobody reads an answer, aiohttp logs the access
        return web.Response(status=499)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(ApiError(500, "The server had an error while processing your request.",
                                        "server_error"))


def _error_response(exc: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    merged = {k: v for k, v in (headers or {}).items() if k.lower() not in ("content-type", "content-length")}
    merged.update(exc.headers)
    response = web.json_response(exc.body(), status=exc.status, headers=merged)
    if merged.get("Connection", "").lower() == "close":
        response.force_close()
    return response


# --- CORS (off unless origins are allowed) -------------------------------------------------------------


def _allowed_origin(request: web.Request) -> str | None:
    """What Access-Control-Allow-Origin says to this request, or None: no CORS headers for it."""
    origins, origin = request.app[CONTEXT].allowed_origins, request.headers.get("Origin")
    if not origins or origin is None:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


@web.middleware
async def _cors_preflight(request: web.Request, handler) -> web.StreamResponse:
    """A browser's preflight (OPTIONS with Access-Control-Request-Method) is answered here, for any path."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers \
            or not request.app[CONTEXT].allowed_origins:
        return await handler(request)
    if _allowed_origin(request) is None:
        return _error_response(ApiError(403, "Disallowed CORS origin.", "permission_error", code="cors_origin"))
    asked = request.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type")
    return web.Response(headers={"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                 "Access-Control-Allow-Headers": asked, "Access-Control-Max-Age": "600"})


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response (errors and streams too) tells an allowed origin it may read it."""
    origin = _allowed_origin(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
        if origin != "*":
            response.headers["Vary"] = "Origin"


# --- authentication ----------------------------------------------------------------------------------


async def _authenticate(request: web.Request) -> Principal:
    ctx = request.app[CONTEXT]
    key = _bearer_key(request)
    admin_key = ctx.admin_key is not None and key is not None and _same(key, ctx.admin_key)
    if ctx.tenants is not None:
        tenant = await _off_loop(request, ctx.tenants.authenticate, key) if key is not None else None
        if tenant is not None:
            return Principal(tenant, tenant.admin or admin_key)
    elif ctx.api_key is not None:
        # Single-tenant: the one user is the operator unless a separate admin key was set (the
        # serve CLI passes the api key as the admin key too: that user still generates as "default").
        if key is not None and _same(key, ctx.api_key):
            return Principal(Tenant("default"), admin=ctx.admin_key is None or admin_key)
    else:
        return Principal(Tenant("anonymous"), admin=ctx.admin_key is None or admin_key)  # any key is fine
    if admin_key:
        return Principal(Tenant(ADMIN_TENANT, admin=True), admin=True)
    raise _unauthorized(key)


def _bearer_key(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").strip().partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _unauthorized(key: str | None) -> ApiError:
    message = ("You didn't provide an API key. Send it in an Authorization header: `Authorization: Bearer KEY`."
               if key is None else "Incorrect API key provided.")
    return ApiError(401, message, "authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


async def _require_admin(request: web.Request) -> Principal:
    principal = await _authenticate(request)
    if not principal.admin:
        raise ApiError(403, "This endpoint needs the admin key or an admin tenant's key.", "permission_error",
                       code="forbidden")
    return principal


# --- generation ----------------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions"""
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    return await _generate(request, chat=True)


async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses: OpenAI's Responses API (text in, text out), run as a chat request."""
    tenant, deployment, body, [prompt] = await _prepared(request, parse_responses_json)
    shape = ResponsesShape(body, deployment.name, deployment.tokenizer)
    gen = GenerationRequest(deployment.name, prompt.token_ids, prompt.params, tenant=tenant.name,
                            weight=tenant.weight, logprobs=body.logprobs, request_id=shape.id)
    run = _admit(request, deployment, tenant, gen)
    try:
        run.submit()
        if body.stream:
            return await _stream_events(request, run, shape)
        return await _collect(request, [run], [shape])
    finally:
        run.abandon()  # a no-op when it completed; otherwise frees the sequence and the tenant's slot


async def _prepared(request: web.Request, parse: Callable, *args) -> tuple[Tenant, Deployment, GenerationBody,
                                                                           list[PreparedPrompt]]:
    """Authenticate, parse the body with `parse(raw, *args)`, find the caller's model (404 if it may not see
    it) and tokenize the prompt for it (each prompt of a batch, every one checked before any runs): the first
    half of every generation handler."""
    ctx = request.app[CONTEXT]
    tenant = (await _authenticate(request)).tenant
    body = await _off_loop(request, parse, await _read_body(request), *args)
    deployment = ctx.deployments.get(body.model, tenant.name, tenant.allowed_models)
    if deployment is None:
        raise model_not_found(body.model)
    if body.tools is not None:
        parser = ctx.tool_call_parser or DEFAULT_PARSER.get(deployment.config.family, "hermes")
        body = resolve_tools(body, parser, ctx.auto_tool_choice, deployment.tokenizer)
    prompts = await _off_loop(request, prepare_all, body, deployment.tokenizer, deployment.max_context,
                              deployment.config.vocab_size)
    return tenant, deployment, body, prompts


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    tenant, deployment, body, prompts = await _prepared(request, _parse_generation_body, chat)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    sequences = len(prompts) * body.n
    _check_fits_limits(request, tenant, [p.params.max_tokens + len(p.token_ids) for p in prompts for _ in range(body.n)])
    runs: list[InFlightRequest] = []
    shapes: list[ResponseShape] = []
    try:
        # Each prompt's n choices are n sequences, each admitted (and metered) on its own; choice index =
        # prompt x n + choice, as OpenAI and vLLM number a batch's choices.
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j
                gen = GenerationRequest(deployment.name, prompt.token_ids, _choice_params(prompt.params, j),
                                        tenant=tenant.name, weight=tenant.weight, logprobs=body.logprobs,
                                        prompt_logprobs=prompt_top_logprobs(body),
                                        request_id=request_id if sequences == 1 else f"{request_id}-{index}")
                shapes.append(ResponseShape(chat, request_id, deployment.name, deployment.tokenizer, body.logprobs,
                                            prompt.echo_text, prompt_ids=prompt.token_ids,
                                            echo_logprobs=body.echo and body.logprobs is not None,
                                            prompt_logprobs=body.prompt_logprobs, index=index,
                                            tokens_as_ids=body.tokens_as_ids, tool_parser=body.tool_parser))
                runs.append(_admit(request, deployment, tenant, gen))
        for run in runs:
            run.submit()
        if body.stream:
            return await _stream(request, runs, shapes, body)
        return await _collect(request, runs, shapes, body.n)
    finally:
        for run in runs:
            run.abandon()  # a no-op when it completed; otherwise frees the sequence and the tenant's slot


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: its own seed (seed + index) so that seeded choices differ and reproduce."""
    if index == 0 or params.seed is None:
        return params
    seed = params.seed + index if params.seed + index < 2**64 else params.seed - index
    return dataclasses.replace(params, seed=seed)


async def _read_body(request: web.Request) -> bytes:
    announced, limit = request.content_length, request.app._client_max_size
    if announced is not None and announced > limit:  # no need to wait for what would be refused
        raise ApiError(413, f"The request body would be {announced} bytes (Content-Length); the most this server "
                       f"accepts is {limit}.", "invalid_request_error", code="request_too_large",
                       headers={"Connection": "close"})  # its body is never read: the connection cannot go on
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            return await request.read()
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {BODY_READ_TIMEOUT_S:g}s.",
                       "invalid_request_error", code="request_timeout") from None


def _parse_generation_body(raw: bytes, chat: bool) -> GenerationBody:
    body = parse_json_body(raw)
    return parse_chat(body) if chat else parse_completion(body)


def _check_fits_limits(request: web.Request, tenant: Tenant, charges: list[int]) -> None:
    """A request of several sequences (n choices, batched prompts) that the tenant's limits could never admit
    at once is a 400, not a 429 that no retry can get past."""
    if len(charges) <= 1:
        return
    metrics = request.app[METRICS]
    if 0 < tenant.max_concurrent < len(charges):
        metrics.rejected.labels(tenant=tenant.name, code="request_too_large").inc()
        raise invalid(f"this request holds {len(charges)} sequences (prompts x n), each counted as one request, but "
                      f"tenant {tenant.name!r} may have {tenant.max_concurrent} in flight (its max_concurrent); split "
                      "it into smaller requests.", "prompt", "request_too_large")
    if 0 < tenant.tokens_per_minute < sum(charges):
        metrics.rejected.labels(tenant=tenant.name, code="request_too_large").inc()
        raise invalid(f"this request reserves {sum(charges)} tokens (prompt + max_tokens of each of its "
                      f"{len(charges)} sequences) but tenant {tenant.name!r} may use {tenant.tokens_per_minute} "
                      "tokens per minute; split it, lower max_tokens or shorten the prompts.", "prompt",
                      "request_too_large")


def _admit(request: web.Request, deployment: Deployment, tenant: Tenant, gen: GenerationRequest) -> InFlightRequest:
    ctx, metrics = request.app[CONTEXT], request.app[METRICS]
    if len(deployment.engine.waiting) >= ctx.max_waiting:
        metrics.rejected.labels(tenant=tenant.name, code="overloaded").inc()
        raise ApiError(503, f"The model {deployment.name} has {ctx.max_waiting} requests queued; retry shortly.",
                       "server_error", code="overloaded", headers={"Retry-After": "1"})
    _check_memory_quota(ctx, deployment, tenant, metrics)
    decision = ctx.admission.admit(tenant, len(gen.prompt_token_ids), gen.params.max_tokens)
    if not decision.ok:
        metrics.rejected.labels(tenant=tenant.name, code=decision.code or "rejected").inc()
        headers = {} if decision.retry_after_s is None else {"Retry-After": str(int(decision.retry_after_s))}
        kind = "rate_limit_exceeded" if decision.status == 429 else "invalid_request_error"
        raise ApiError(decision.status, decision.message, kind, code=decision.code or None, headers=headers)
    return InFlightRequest(gen, deployment, tenant, decision.charged, ctx.admission, ctx.ledger, metrics,
                           request.app[BACKGROUND], request.app[OFF_LOOP])


def _check_memory_quota(ctx: FrontendContext, deployment: Deployment, tenant: Tenant, metrics) -> None:
    """A tenant's private models may keep at most its quota of expert bytes resident: the blocks only it
    uses, each once (a block its model shares with a shared base, or with another tenant, is not counted).

    Over it, new requests wait (429) until idle experts scale to zero: at most one keep-alive.
    """
    if deployment.spec.sharing != "private" or tenant.memory_quota_bytes <= 0:
        return
    owned: dict[str, int] = {}
    for d in ctx.deployments.by_name.values():
        if d.spec.sharing == "private" and d.spec.owner == tenant.name:
            owned.update(d.executor.owned_residency(tenant.name))
    resident = sum(owned.values())
    if resident >= tenant.memory_quota_bytes:
        metrics.rejected.labels(tenant=tenant.name, code="memory_quota_exceeded").inc()
        wait = max(1, int(deployment.spec.keep_alive_s))
        raise ApiError(429, f"Tenant {tenant.name}'s private models hold {resident} bytes of experts, at or over its "
                       f"memory quota of {tenant.memory_quota_bytes}; retry after idle experts scale down.",
                       "rate_limit_exceeded", code="memory_quota_exceeded", headers={"Retry-After": str(wait)})


def _closed(request: web.Request) -> Callable[[], bool]:
    return lambda: request.transport is None or request.transport.is_closing()


async def _collect(request: web.Request, runs: list[InFlightRequest],
                   shapes: list[ResponseShape] | list[ResponsesShape], n: int = 1) -> web.StreamResponse:
    try:
        outcomes = await asyncio.gather(*(_events_of(request, run) for run in runs))
    except ClientGone:
        return web.Response(status=499)  # nginx's "client closed request": only the access log sees it
    for run, (finished, _) in zip(runs, outcomes):
        await run.complete(finished)
    for finished, _ in outcomes:
        if finished.finish_reason == "error" and finished.error_code == "unavailable":  # no worker could run it
            raise ApiError(503, f"No expert worker could serve the request right now ({finished.error}); retry "
                           "shortly.", "server_error", code="unavailable", headers={"Retry-After": "1"})
        if finished.finish_reason == "error" and finished.error_code == "invalid":
            raise ApiError(400, finished.error or "the request cannot be served as asked", "invalid_request_error")
        if finished.finish_reason == "error":
            raise ApiError(500, f"Generation failed: {finished.error}", "server_error")
    bodies = [shape.response(finished, tokens, run.request.prompt_logprobs_result)
              for shape, run, (finished, tokens) in zip(shapes, runs, outcomes)]
    out = bodies[0]
    if len(bodies) > 1:
        out["choices"] = [b["choices"][0] for b in bodies]
        out["usage"] = usage_dict(_total_usage([finished.usage for finished, _ in outcomes], n))
    return _json(out, headers={"X-Request-Id": shapes[0].id})


async def _events_of(request: web.Request, run: InFlightRequest) -> tuple[Finished, list[TokenEvent]]:
    tokens: list[TokenEvent] = []
    async for event in run.events(_closed(request)):
        if isinstance(event, TokenEvent):
            tokens.append(event)
        else:
            return event, tokens
    raise AssertionError("events end with Finished")


def _total_usage(usages: list[Usage], n: int = 1) -> Usage:
    """Each prompt's tokens once however many (n) choices it has, as OpenAI and vLLM report them, and every
    choice's completion; `usages` holds each prompt's n choices in a row."""
    return Usage(prompt_tokens=sum(u.prompt_tokens for u in usages[::n]),
                 completion_tokens=sum(u.completion_tokens for u in usages))


async def _stream(request: web.Request, runs: list[InFlightRequest], shapes: list[ResponseShape],
                  body: GenerationBody) -> web.StreamResponse:
    response = web.StreamResponse(headers={**_SSE_HEADERS, "X-Request-Id": shapes[0].id})
    merged: asyncio.Queue[tuple[int, TokenEvent | Finished | BaseException]] = asyncio.Queue()

    async def pump(i: int, run: InFlightRequest) -> None:  # n choices' events, interleaved as they come
        try:
            async for event in run.events(_closed(request)):
                merged.put_nowait((i, event))
        except Exception as exc:  # ClientGone: re-raised below
            merged.put_nowait((i, exc))

    pumps = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        await response.prepare(request)
        for shape in shapes:
            for chunk in shape.first_chunks():
                await _send(response, chunk)
        ends: dict[int, Finished] = {}  # by choice index: usage sums each prompt's tokens once
        while len(ends) < len(runs):
            i, event = await merged.get()
            if isinstance(event, BaseException):
                raise event
            run, shape = runs[i], shapes[i]
            if isinstance(event, TokenEvent):
                for chunk in shape.prompt_chunks(run.request.prompt_logprobs_result):  # once, at the first token
                    await _send(response, chunk)
                chunk = shape.token_chunk(event)
                if chunk is not None:
                    await _send(response, chunk)
                continue
            ends[i] = event
            await run.complete(event)  # usage is durable before the client sees the end
            if event.finish_reason == "error":
                code = event.error_code or None  # "unavailable": a client may retry
                await _send(response, error_body(f"Generation failed: {event.error}", "server_error", code=code))
            else:
                await _send(response, shape.final_chunk(event.finish_reason))
        if body.include_usage and all(e.finish_reason != "error" for e in ends.values()):
            # as OpenAI and vLLM: usage only when asked, in a chunk of its own
            usages = [ends[i].usage for i in range(len(runs))]
            await _send(response, shapes[0].usage_chunk(_total_usage(usages, body.n)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:  # ClientGone, or a write to a closed socket
        log.info("client of %s went away mid-stream", shapes[0].id)
    finally:
        for task in pumps:
            task.cancel()
    return response


async def _stream_events(request: web.Request, run: InFlightRequest, shape: ResponsesShape) -> web.StreamResponse:
    """A Responses API stream: typed events, each with its `event:` line as OpenAI sends them; no [DONE]."""
    response = web.StreamResponse(headers={**_SSE_HEADERS, "X-Request-Id": shape.id})
    try:
        await response.prepare(request)
        for out in shape.start_events():
            await _send(response, out, event=True)
        async for event in run.events(_closed(request)):
            if isinstance(event, TokenEvent):
                for out in shape.token_events(event):
                    await _send(response, out, event=True)
            else:
                await run.complete(event)  # usage is durable before the client sees the end
                for out in shape.end_events(event):
                    await _send(response, out, event=True)
        await response.write_eof()
    except ConnectionResetError:  # ClientGone, or a write to a closed socket
        log.info("client of %s went away mid-stream", shape.id)
    return response


async def _send(response: web.StreamResponse, obj: dict, event: bool = False) -> None:
    """One server-sent event; with `event`, an `event:` line names its type (the Responses API's framing)."""
    head = b"event: " + obj["type"].encode() + b"\n" if event else b""
    await response.write(head + b"data: " + _dumps(obj).encode() + b"\n\n")


def _dumps(obj: object) -> str:
    """JSON as UTF-8 text (not ASCII escapes), compact: every body and event this API sends."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _json(obj: object, **kwargs) -> web.Response:
    return web.json_response(obj, dumps=_dumps, **kwargs)


# --- models, usage, health, metrics, admin --------------------------------------------------------------


def _model_card(d: Deployment, name: str | None = None) -> dict:
    owner = d.spec.owner if d.spec.sharing == "private" else "faasmoe"
    return {"id": name or d.name, "object": "model", "created": d.created, "owned_by": owner,
            "max_model_len": d.max_context}


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the models this caller may use."""
    tenant = (await _authenticate(request)).tenant
    visible = request.app[CONTEXT].deployments.visible(tenant.name, tenant.allowed_models)
    cards = [_model_card(d, name) for d in visible for name in dict.fromkeys((d.name, *d.spec.aliases))]
    return _json({"object": "list", "data": cards})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}"""
    tenant = (await _authenticate(request)).tenant
    name = request.match_info["model"]
    deployment = request.app[CONTEXT].deployments.get(name, tenant.name, tenant.allowed_models)
    if deployment is None:
        raise model_not_found(name)
    return _json(_model_card(deployment, name))


async def usage(request: web.Request) -> web.Response:
    """GET /v1/usage[?since=1h][&tenant=NAME]: usage totals per model; other tenants' for admins only."""
    principal = await _authenticate(request)
    ledger = request.app[CONTEXT].ledger
    if ledger is None:
        raise ApiError(404, "This server keeps no usage ledger.", "not_found_error", code="no_ledger")
    wanted = request.query.get("tenant")
    if wanted is not None and wanted != principal.tenant.name and not principal.admin:
        raise ApiError(403, "Only an admin may read another tenant's usage.", "permission_error", "tenant",
                       "forbidden")
    tenant = wanted if wanted is not None else (None if principal.admin else principal.tenant.name)
    since = None
    if "since" in request.query:
        try:
            since = parse_since(request.query["since"])
        except ValueError as exc:
            raise invalid(str(exc), "since") from None
    rows = await _off_loop(request, ledger.summary, tenant, since)
    return web.json_response({"object": "list", "tenant": tenant, "since": since, "data": rows})


async def tokenize(request: web.Request) -> web.Response:
    """POST /tokenize (vLLM's): {model?, prompt | messages, ...} -> {count, max_model_len, tokens, token_strs}."""
    deployment, body = await _tokenizer_request(request)
    out = await _off_loop(request, tokenize_body, body, deployment.tokenizer)
    return _json({"count": out["count"], "max_model_len": deployment.max_context, "tokens": out["tokens"],
                  "token_strs": out["token_strs"]})


async def detokenize(request: web.Request) -> web.Response:
    """POST /detokenize (vLLM's): {model?, tokens} -> {prompt}."""
    deployment, body = await _tokenizer_request(request)
    return _json(await _off_loop(request, detokenize_body, body, deployment.tokenizer, deployment.config.vocab_size))


async def _tokenizer_request(request: web.Request) -> tuple[Deployment, dict]:
    """The caller's model (named, or the only one it may use, as vLLM's optional model) and the body."""
    tenant = (await _authenticate(request)).tenant
    body = await _off_loop(request, parse_json_body, await _read_body(request))
    deployments = request.app[CONTEXT].deployments
    name = body.get("model")
    if name is None:
        visible = deployments.visible(tenant.name, tenant.allowed_models)
        if len(visible) != 1:
            raise invalid("you must provide a model parameter: this server serves several models.", "model")
        return visible[0], body
    if not isinstance(name, str):
        raise invalid("model must be a string.", "model")
    deployment = deployments.get(name, tenant.name, tenant.allowed_models)
    if deployment is None:
        raise model_not_found(name)
    return deployment, body


def _package_version() -> str:
    try:
        return importlib.metadata.version("faasmoe")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


async def version(request: web.Request) -> web.Response:
    """GET /version (vLLM's): {"version": ...}; no key needed."""
    return _json({"version": _package_version()})


async def ping(request: web.Request) -> web.Response:
    """GET|POST /ping: 200 with an empty body, as vLLM (and SageMaker) health checks expect; no key needed."""
    return web.Response()


async def health(request: web.Request) -> web.Response:
    """GET /health: the process answers (no auth)."""
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: the frontend's series merged with the scheduler's and workers'. No key needed, but
    only an admin's scrape has per-tenant series and private models': anyone else's sums tenants away
    and drops private models, whose names must stay invisible (DESIGN.md: 404, not 403)."""
    ctx = request.app[CONTEXT]
    admin = await _scraped_by_admin(request)
    series = request.app[METRICS]
    series.read_engines(ctx.deployments)
    own = await _off_loop(request, series.registry.render)  # not on the loop: streams would stall for its ms
    try:
        runtime = await ctx.runtime_metrics()
    except Exception:  # a scheduler outage must not blind the frontend's own metrics
        log.exception("could not collect the runtime's metrics")
        runtime = ""
    text = merge_expositions([own, runtime])
    if not admin:
        private = {d.name for d in ctx.deployments.by_name.values() if d.spec.sharing == "private"}
        text = redact_exposition(text, aggregate=("tenant",), hidden={"model_name": private})
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


async def _scraped_by_admin(request: web.Request) -> bool:
    try:
        return (await _authenticate(request)).admin
    except ApiError:
        if _bearer_key(request) is None:
            return False  # an anonymous scraper: the public series
        raise  # a wrong key is a 401, so a misconfigured scraper finds out


async def cluster(request: web.Request) -> web.Response:
    """GET /admin/cluster: workers, resident functions and per-model residency (admin only)."""
    await _require_admin(request)
    return web.json_response(await request.app[CONTEXT].cluster_state())
