"""One admitted request on the frontend, from admission to its usage row and its metrics.

Every request that passed admission must be finished exactly once, however it ends (finished,
failed, or its client went away): the usage row is written, the tenant's tokens settled and its
concurrency slot released. `InFlightRequest.complete` does all three; `abandon` makes sure it
happens for a client that left, after the engine has freed the sequence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

from faasmoe.api.metrics import FrontendMetrics, finished_reason
from faasmoe.engine.deployments import Deployment
from faasmoe.engine.requests import Finished, GenerationRequest, TokenEvent, Usage
from faasmoe.tenancy.admission import Admission
from faasmoe.tenancy.ledger import UsageLedger, UsageRecord
from faasmoe.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

CHECKPOINT_S = 1.0  # a streaming request's usage so far is committed this often
POLL_S = 0.25  # how often a handler waiting for tokens checks that its client is still there
CANCEL_GRACE_S = 10.0  # how long a cancelled request's Finished (and its metered usage) is awaited
_STATUS = {"stop": "ok", "length": "ok", "cancelled": "cancelled"}


class ClientGone(ConnectionResetError):
    """The HTTP client closed its connection while its request was generating."""


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("could not checkpoint usage: %s", future.exception())


class InFlightRequest:
    """An admitted, submitted request: its events, timing, and the once-only bookkeeping at its end."""

    def __init__(self, request: GenerationRequest, deployment: Deployment, tenant: Tenant, charged: int,
                 admission: Admission, ledger: UsageLedger | None, metrics: FrontendMetrics,
                 background: set[asyncio.Task], io: Executor | None = None) -> None:
        self.request = request
        self.deployment = deployment
        self.tenant = tenant
        self.charged = charged
        self._admission, self._ledger, self._metrics, self._background = admission, ledger, metrics, background
        self._io = io  # where the ledger's SQLite commit runs: never on the event loop (None: asyncio's default)
        self._labels = {"model_name": deployment.name, "tenant": tenant.name}
        self._started = time.monotonic()
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self.tokens_seen = 0
        self._checkpointed_at = self._started
        self.done = False
        self._abandoned = False
        self._submitted = False

    def submit(self) -> None:
        self._submitted = True
        self.deployment.engine.submit(self.request)

    async def events(self, connection_closed) -> AsyncIterator[TokenEvent | Finished]:
        """The request's events up to its Finished; raises ClientGone when `connection_closed()` says so."""
        queue = self.request.events
        checked = time.monotonic()
        while True:
            # A busy stream never waits, so the connection is checked by the clock, not only on timeouts.
            if time.monotonic() - checked >= POLL_S:
                checked = time.monotonic()
                if connection_closed():
                    raise ClientGone("the client closed the connection")
            try:
                event = queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    event = await asyncio.wait_for(queue.get(), POLL_S)
                except TimeoutError:
                    if not self._in_engine() and queue.empty():
                        # Finished is queued before a sequence leaves the engine, so none is coming.
                        event = self._synthesized("error", "the engine dropped the request")
                    else:
                        checked = 0.0  # check the connection now
                        continue
            if isinstance(event, TokenEvent):
                self._observe_token()
            yield event
            if isinstance(event, Finished):
                return

    def _observe_token(self) -> None:
        now = time.monotonic()
        self.tokens_seen += 1
        if now - self._checkpointed_at >= CHECKPOINT_S:
            self._checkpointed_at = now
            self._checkpoint()
        if self._first_token_at is None:
            self._first_token_at = now
            self._metrics.ttft.labels(**self._labels).observe(now - self._started)
        else:
            self._metrics.itl.labels(**self._labels).observe(now - self._last_token_at)
        self._last_token_at = now

    def _checkpoint(self) -> None:
        """Bill the tokens delivered so far (off the loop, fire and forget): a crash loses at most
        CHECKPOINT_S of them. The expert work is known only at the end, with the final row."""
        if self._ledger is None:
            return
        record = UsageRecord(self.request.request_id, self.tenant.name, self.deployment.name,
                             len(self.request.prompt_token_ids), self.tokens_seen, started_at=self.request.arrived_at,
                             finished_at=time.time(), status="running")
        future = asyncio.get_running_loop().run_in_executor(self._io, self._ledger.checkpoint, record)
        future.add_done_callback(_log_failure)

    async def complete(self, finished: Finished) -> None:
        """Record usage (committed before the client sees the end), update metrics, settle admission."""
        if self.done:
            return
        self.done = True
        usage, status = finished.usage, _STATUS.get(finished.finish_reason, "error")
        try:
            if self._ledger is not None:
                started_at = self.request.arrived_at
                ttft = None if self._first_token_at is None else self._first_token_at - self._started
                record = UsageRecord(
                    self.request.request_id, self.tenant.name, self.deployment.name, usage.prompt_tokens,
                    usage.completion_tokens, usage.expert_invocations, usage.expert_compute_s, usage.cold_starts,
                    usage.resident_byte_seconds, started_at, time.time(), status, ttft,
                    finished.error or "")
                # A commit waits on the disk and on other writers' locks: a thread, not the loop.
                await asyncio.get_running_loop().run_in_executor(self._io, self._ledger.record, record)
        except Exception:  # the response must still go out; the loss is logged loudly
            log.exception("could not record the usage of %s", self.request.request_id)
        finally:
            self._admission.settle(self.tenant, self.charged, usage.total_tokens)
        self._observe_end(finished, usage, status == "error")

    def _observe_end(self, finished: Finished, usage: Usage, failed: bool) -> None:
        """The request's series, vLLM's way: its phases are queue (arrival to the engine taking it),
        prefill (to the first token) and decode (to the last)."""
        m, labels, now = self._metrics, self._labels, time.monotonic()
        m.prompt_tokens.labels(**labels).inc(usage.prompt_tokens)
        m.generation_tokens.labels(**labels).inc(usage.completion_tokens)
        if failed:
            m.errors.labels(**labels).inc()
            log.warning("request %s of %s failed: %s", self.request.request_id, self.tenant.name, finished.error)
            return
        m.success.labels(**labels, finished_reason=finished_reason(finished.finish_reason)).inc()
        m.e2e.labels(**labels).observe(now - self._started)
        m.request_prompt_tokens.labels(**labels).observe(usage.prompt_tokens)
        m.cold_start.labels(**labels).observe(usage.cold_start_s)
        m.request_generation_tokens.labels(**labels).observe(usage.completion_tokens)
        scheduled = self.request.scheduled_at
        if scheduled is not None:  # else it never left the queue (cancelled while waiting)
            m.queue_time.labels(**labels).observe(max(0.0, scheduled - self._started))
            if self._first_token_at is not None:
                m.prefill_time.labels(**labels).observe(max(0.0, self._first_token_at - scheduled))
                m.decode_time.labels(**labels).observe(self._last_token_at - self._first_token_at)

    def abandon(self) -> None:
        """The client is gone (or the handler failed): cancel, and complete once the engine let go."""
        if self.done or self._abandoned:
            return
        self._abandoned = True
        if not self._submitted:  # admitted, then its request failed before it ran (a later sequence was refused)
            self.done = True  # nothing ran: no usage row, no metrics; only the admission is given back
            self._admission.settle(self.tenant, self.charged, 0)
            return
        self.request.cancel()
        task = asyncio.get_running_loop().create_task(self._complete_cancelled(),
                                                      name=f"finish-{self.request.request_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _complete_cancelled(self) -> None:
        finished: Finished | None = None
        queue = self.request.events
        deadline = time.monotonic() + CANCEL_GRACE_S
        try:
            while finished is None and time.monotonic() < deadline:
                try:
                    event = await asyncio.wait_for(queue.get(), 0.05)
                except TimeoutError:
                    if not self._in_engine() and queue.empty():
                        break  # dropped while waiting: the engine sends no Finished for those
                    continue
                if isinstance(event, Finished):
                    finished = event
                else:
                    self.tokens_seen += 1
        finally:  # even when cancelled at shutdown: the slot must be released
            await self.complete(finished or self._synthesized("cancelled"))

    def _synthesized(self, reason: str, error: str | None = None) -> Finished:
        """A Finished for a request the engine let go of silently: count what the handler saw."""
        prompt = len(self.request.prompt_token_ids) if self.tokens_seen else 0
        return Finished(reason, "", Usage(prompt_tokens=prompt, completion_tokens=self.tokens_seen), error)

    def _in_engine(self) -> bool:
        return self.deployment.engine.holds(self.request)
