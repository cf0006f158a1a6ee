"""What the HTTP layer hands the engine and what it gets back: one request, its token stream.

The frontend validates and authenticates; the engine batches and generates. These types
are the whole interface between them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from faasmoe.engine.sampling import PromptLogprob, SamplingParams


@dataclass
class Usage:
    """What one request cost, as metered: tokens, and its share of the expert work."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    expert_invocations: float = 0.0  # shares of batched calls add up to fractions
    expert_compute_s: float = 0.0
    cold_starts: float = 0.0
    resident_byte_seconds: float = 0.0
    cold_start_s: float = 0.0  # how long its steps waited for expert loads (0 when every block was warm)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenEvent:
    """One generated token: its text (may be empty while a character or stop string is pending)."""

    token_id: int
    text: str
    logprob: float
    top_logprobs: dict[int, float] | None = None


@dataclass
class Finished:
    """The end of a request's stream."""

    finish_reason: str  # "stop" | "length" | "cancelled" (metrics: vLLM's "abort") | "error"
    text: str  # the full completion text (stop string removed)
    usage: Usage
    error: str | None = None
    error_code: str = ""  # with "error": "unavailable" (no worker could run it: retry), "invalid" (the
    # request cannot be served as asked, e.g. past the KV cache budget) or "" (a fault)


@dataclass
class GenerationRequest:
    """A validated request for one model, ready to batch."""

    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str = ""
    weight: float = 1.0  # the tenant's share of the model when several are busy (faasmoe.engine.fairness)
    logprobs: int | None = None  # top-N logprobs per token (OpenAI `logprobs`), None = off
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token (0: the prompt token's alone), None = off
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    arrived_at: float = field(default_factory=time.time)
    # Filled by the engine as it runs: the HTTP handler reads events from here.
    events: asyncio.Queue[TokenEvent | Finished] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    scheduled_at: float | None = None  # time.monotonic() when the engine took it from its queue (metrics)
    # Set by the engine at prefill, before the first TokenEvent, when prompt_logprobs is asked for.
    prompt_logprobs_result: list[PromptLogprob | None] | None = None

    def cancel(self) -> None:
        """Client went away: the engine drops the sequence at its next step and frees it."""
        self.cancelled = True
