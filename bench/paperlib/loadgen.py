"""Replay a schedule over streaming HTTP and time every token on the client side.

Each request is sent at its scheduled time (open loop: a slow setup gets the same arrivals and
queues them) as a streaming `/v1/completions` with the prompt as token ids, greedy, EOS ignored
and `logprobs: 0`, so each chunk lists the tokens it carries. TTFT is from the scheduled send time
to the first token; a later chunk carrying k tokens after a gap g counts k inter-token gaps of
g/k (with the benchmark's word-level tokenizer every token is its own chunk).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from bench.paperlib.checkpoints import token_id
from bench.paperlib.setups import Endpoint
from bench.paperlib.workload import Request

REQUEST_TIMEOUT_S = 600.0


@dataclass
class RequestResult:
    """What the client saw of one request."""

    tenant: str
    key: str
    scheduled_at: float  # seconds from the replay's start
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    e2e_s: float | None = None
    finished_at: float | None = None  # seconds from the replay's start
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished_at is not None


def completion_body(endpoint: Endpoint, prompt: list[int] | tuple[int, ...], max_tokens: int) -> dict:
    return {"model": endpoint.model, "prompt": list(prompt), "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0, "logprobs": 0, "return_tokens_as_token_ids": True}


async def stream_completion(session: aiohttp.ClientSession, endpoint: Endpoint, request: Request,
                            result: RequestResult, sent: float) -> None:
    """Send one request and fill `result` from its stream; `sent` is the perf_counter send time."""
    headers = {"Authorization": f"Bearer {endpoint.key}"}
    last = sent
    async with session.post(f"{endpoint.url}/v1/completions", json=completion_body(endpoint, request.prompt,
                                                                                    request.max_tokens),
                            headers=headers) as response:
        if response.status != 200:
            result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
            return
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                return
            for choice in chunk.get("choices", []):
                tokens = (choice.get("logprobs") or {}).get("tokens") or []
                if not tokens:
                    continue
                now = time.perf_counter()
                if result.ttft_s is None:
                    result.ttft_s = now - sent  # tokens that came with the first one add no gaps
                else:
                    gap = (now - last) / len(tokens)
                    result.itl_s.extend([gap] * len(tokens))
                last = now
                result.tokens += len(tokens)
                result.token_ids.extend(i for i in map(token_id, tokens) if i is not None)
    result.e2e_s = time.perf_counter() - sent


async def replay(schedule: list[Request], endpoints: dict[str, Endpoint],
                 timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[list[RequestResult], float, float]:
    """Send every request at its time; returns (results, start wall time, duration to the last finish)."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    results = [RequestResult(r.tenant, r.key, r.at) for r in schedule]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        wall_start = time.time()

        async def one(request: Request, result: RequestResult) -> None:
            delay = start + result.scheduled_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = start + result.scheduled_at  # late sends still count from the schedule
            try:
                await stream_completion(session, endpoints[request.tenant], request, result, sent)
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"[:200]
            result.finished_at = time.perf_counter() - start if result.error is None else None

        await asyncio.gather(*(one(r, res) for r, res in zip(schedule, results)))
        duration = max([r.finished_at for r in results if r.finished_at is not None], default=0.0)
    return results, wall_start, duration


async def warm_up(endpoints: dict[str, Endpoint], prompts: dict[str, list[int]], max_tokens: int = 2) -> None:
    """One short request per tenant, together: loads every trunk before the measured window."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(tenant: str) -> None:
            request = Request(tenant, -1, 0.0, tuple(prompts[tenant]), max_tokens)
            result = RequestResult(tenant, request.key, 0.0)
            await stream_completion(session, endpoints[tenant], request, result, time.perf_counter())
            if result.error:
                raise RuntimeError(f"warm-up of {tenant} failed: {result.error}")

        await asyncio.gather(*(one(t) for t in endpoints))
