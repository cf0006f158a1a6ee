"""Continuous batching for one served model, on the event loop.

Every step advances all running sequences together: waiting requests join with their whole
prompt (prefill) next to the running ones' single new token (decode), in one packed batch.
Trunk math runs on a compute thread; each MoE layer's expert work is awaited from the
executor (remote workers: one message per worker per layer), so many models step
concurrently on one loop and the loop never blocks on torch.

Tenants share the model fairly (faasmoe.engine.fairness): waiting requests are admitted by their
tenants' virtual token counters, not in arrival order, and a request of a tenant that has nothing
running and has had the least service does not wait for the running batch's step to end: its
prefill runs at once in a *lane* of its own, and the batch's step yields to it between ops. So one
tenant's flood costs another's first token about one op of the flood's step, not a whole step
plus a step grown by the flood; with one tenant busy, nothing changes.

Models that share their trunk (a base and its expert-specialised fine-tunes) can be *members* of one
engine (faasmoe.engine.cobatch): their sequences step together, one trunk pass for all, each row's
experts through its own model's functions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from faasmoe.engine.executors import AsyncExpertExecutor, StepCost, current_step_cost, own_step_cost
from faasmoe.engine.fairness import FairShares
from faasmoe.engine.requests import Finished, GenerationRequest, TokenEvent, Usage
from faasmoe.engine.sampling import prompt_logprobs, score_rows
from faasmoe.engine.sequence import Sequence
from faasmoe.model.kv_cache import KVCache
from faasmoe.model.moe_model import PackedStep, check_tokens, decoder_layers
from faasmoe.model.tokenizer import Tokenizer
from faasmoe.model.trunk import Trunk
from runtime.client import InvokeError
from runtime.compute import ComputeThread

log = logging.getLogger(__name__)




@dataclass
class EngineMember:
    """A model whose sequences an engine steps: how to get its (loaded) trunk, and its tokenizer."""

    trunk: Callable[[], Trunk]
    tokenizer: Tokenizer


@dataclass
class _Running:
    request: GenerationRequest
    seq: Sequence
    usage: Usage
    streamed: int = 0  # characters of seq.text already sent
    unfed: list[int] = field(default_factory=list)  # prompt tokens after this step's prefill chunk


class ModelEngine:
    """The batching loop of one model deployment."""

    def __init__(
        self,
        name: str,
        trunk: Callable[[], Trunk],
        executor: AsyncExpertExecutor,
        tokenizer: Tokenizer,
        compute: ComputeThread,
        max_batch_tokens: int = 4096,
        max_running: int = 64,
        kv_budget_bytes: int | None = None,
        kv_bytes_per_token: int | None = None,
        micro_batches: int = 1,
        micro_batch_min_tokens: int = 0,
        prefetch: bool = True,
        prefill_chunk_tokens: int = 2048,
        prefetch_depth: int | None = None,
    ) -> None:
        self.name = name
        self.members = {name: EngineMember(trunk, tokenizer)}
        self.executor = executor
        self.tokenizer = tokenizer
        self.compute = compute
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        # KV caches grow with their sequences; admission keeps every running one's worst case
        # (prompt + max_tokens) inside this budget, so no step can run out of cache memory.
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_bytes_per_token = kv_bytes_per_token
        self.micro_batches = micro_batches  # a step's sequences in this many groups that overlap trunk and experts
        self.micro_batch_min_tokens = micro_batch_min_tokens  # ... when the step has at least this many tokens
        self.prefetch = prefetch  # pre-gate the next layer's blocks (a no-op for in-process experts)
        # A step that starts sequences pre-gates this many MoE layers ahead (None: all of them), so a
        # cold model's blocks load while its first layers compute; later steps pre-gate the next one.
        self.prefetch_depth = prefetch_depth
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: deque[GenerationRequest] = deque()
        self.running: list[_Running] = []
        self.starting: GenerationRequest | None = None
        self.fair = FairShares()
        self.lane: list[GenerationRequest] = []  # a prefill stepped beside the batch (empty: none)
        self.lanes = 0  # lanes run so far
        self.lanes_by_model: dict[str, int] = {}
        self._lane_task: asyncio.Task[None] | None = None
        self._lane_idle = asyncio.Event()  # clear while a lane runs: the batch's step waits between ops
        self._lane_idle.set()
        self._stepping = False  # the main loop is inside a step
        self.steps = 0
        self.last_active = time.monotonic()
        self._last_step_s = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- intake ----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        busy = self.busy_tenants()
        self.fair.arrive(request.tenant, busy)
        self.last_active = time.monotonic()
        if self._lane_fits(request, busy):
            self.lane = [request]
            self._lane_idle.clear()
            self._lane_task = asyncio.create_task(self._lane_step(request), name=f"lane-{self.name}")
        else:
            self.waiting.append(request)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name=f"engine-{self.name}")

    def join(self, name: str, trunk: Callable[[], Trunk], tokenizer: Tokenizer, kv_budget_bytes: int | None) -> None:
        """Step model `name`'s sequences here too: its trunk must be this engine's models' (the same
        tensors) and the executor must know its functions (faasmoe.engine.cobatch); its KV budget adds."""
        if name in self.members:
            raise ValueError(f"model {name!r} already steps in the engine of {self.name}")
        self.members[name] = EngineMember(trunk, tokenizer)
        if self.kv_budget_bytes is not None:
            self.kv_budget_bytes = None if kv_budget_bytes is None else self.kv_budget_bytes + kv_budget_bytes

    def running_of(self, model: str) -> int:
        return sum(1 for r in self.running if r.request.model == model)

    def waiting_of(self, model: str) -> int:
        return sum(1 for w in self.waiting if w.model == model)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.starting or self.lane)

    def busy_tenants(self) -> set[str]:
        """Tenants with a request waiting, starting or running here."""
        return ({w.tenant for w in self.waiting} | {r.request.tenant for r in self.running}
                | {w.tenant for w in self.lane} | ({self.starting.tenant} if self.starting else set()))

    def holds(self, request: GenerationRequest) -> bool:
        """Whether the request is queued, starting or running here (else its Finished has been sent)."""
        return (request is self.starting or any(w is request for w in self.waiting)
                or any(r.request is request for r in self.running) or any(w is request for w in self.lane))

    def _lane_fits(self, request: GenerationRequest, busy: set[str]) -> bool:
        """A lane for this request now: a step is running, no lane is, its tenant has nothing here and has had
        no more service than any tenant running, its prompt is one prefill chunk, and there is room."""
        running = {r.request.tenant for r in self.running}
        if not self._stepping or self.lane or request.tenant in busy or len(self.running) >= self.max_running:
            return False
        if len(request.prompt_token_ids) > self.prefill_chunk_tokens or not self.fair.most_underserved(request.tenant,
                                                                                                      running):
            return False
        kv = self._kv_worst_case(request)
        return self.kv_budget_bytes is None or kv is None or self.kv_reserved_bytes() + kv <= self.kv_budget_bytes

    async def stop(self) -> None:
        for task in (self._task, self._lane_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    # -- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self.busy:
                self.fair.reset()
                self._wake.clear()
                await self._wake.wait()
            try:
                await self._admit()
                self._drop_cancelled()
                if not self.running:
                    if self.lane:  # only a lane's prefill is running: its sequence joins when it is done
                        self._wake.clear()
                        await self._wake.wait()
                    else:
                        await asyncio.sleep(0)  # only cancelled or failed ones were waiting: let the loop breathe
                    continue
                batch = list(self.running)
                self._stepping = True
                try:
                    await self._step(batch)
                except Exception as exc:  # fails the requests of this step; the waiting ones are not concerned
                    self._fail(batch, exc)
                    self.running = [r for r in self.running if r not in batch]
                finally:
                    self._stepping = False
            except Exception:  # a bug here must not stop the model for good: log it, go on
                log.exception("engine loop of %s failed", self.name)
                await asyncio.sleep(0.1)

    def _fail(self, batch: list[_Running], exc: Exception) -> None:
        log.exception("step of %s failed", self.name, exc_info=exc)
        code = "unavailable" if isinstance(exc, (InvokeError, ConnectionError, TimeoutError)) else ""
        for r in batch:
            self._finish(r, "error", str(exc) or type(exc).__name__, code)

    async def _lane_step(self, request: GenerationRequest) -> None:
        """The request's prefill stepped at once, beside the running batch (which yields to it between its
        ops); then its sequence joins the batch. Its expert work is metered to this step alone."""
        r: _Running | None = None
        try:
            with own_step_cost() as cost:
                request.scheduled_at = time.monotonic()
                try:
                    seq = await self._start(request)
                except Exception as exc:  # as in _admit: this request alone fails
                    code = "invalid" if isinstance(exc, ValueError) else ""
                    request.events.put_nowait(Finished("error", "", Usage(len(request.prompt_token_ids)), str(exc), code))
                    return
                r = _Running(request, seq, Usage(prompt_tokens=len(request.prompt_token_ids)))
                self.lanes += 1
                self.lanes_by_model[request.model] = self.lanes_by_model.get(request.model, 0) + 1
                await self._step([r], cost)
        except Exception as exc:
            if r is not None:
                self._fail([r], exc)
            r = None
        finally:
            self.lane = []
            self._lane_task = None
            self._lane_idle.set()
            self._wake.set()
        if r is not None and not r.seq.finished:
            if r.request.cancelled:
                self._finish(r, "cancelled")
            else:
                self.running.append(r)

    async def _admit(self) -> None:
        budget = self.max_batch_tokens - len(self.running)
        while self.waiting and len(self.running) < self.max_running:
            index = self.fair.next_index([w.tenant for w in self.waiting])  # the least served tenant's first
            request = self.waiting[index]
            if request.cancelled:  # gone before it started: nothing was spent on it
                del self.waiting[index]
                request.events.put_nowait(Finished("cancelled", "", Usage(len(request.prompt_token_ids))))
                continue
            need = min(len(request.prompt_token_ids), self.prefill_chunk_tokens)  # its first chunk
            if need > budget and self.running:
                break  # next step: a long prompt waits for room rather than starving decodes
            kv = self._kv_worst_case(request)
            if self.kv_budget_bytes is not None and kv is not None and kv <= self.kv_budget_bytes \
                    and self.kv_reserved_bytes() + kv > self.kv_budget_bytes:
                break  # it fits once running sequences finish: wait in line
            del self.waiting[index]
            request.scheduled_at = time.monotonic()
            self.starting = request  # between the queue and the batch (its trunk may be loading): still ours
            try:
                seq = await self._start(request)
            except Exception as exc:  # this request cannot start (trunk, cache, bad input): it alone fails
                log.warning("request %s of %s could not start: %s", request.request_id, self.name, exc)
                code = "invalid" if isinstance(exc, ValueError) else ""  # the request's own fault: a 400
                request.events.put_nowait(Finished("error", "", Usage(len(request.prompt_token_ids)), str(exc), code))
                continue
            finally:
                self.starting = None
            budget -= need
            self.running.append(_Running(request, seq, Usage(prompt_tokens=len(request.prompt_token_ids))))

    async def _start(self, request: GenerationRequest) -> Sequence:
        """The request's sequence with its KV cache; loads the trunk (off the loop) if it is not loaded."""
        member = self.members.get(request.model)
        if member is None:
            raise RuntimeError(f"model {request.model!r} does not step in the engine of {self.name}")
        trunk = await self._run(member.trunk)
        cfg = trunk.config
        check_tokens(cfg, request.prompt_token_ids, request.params.max_tokens)
        worst = len(request.prompt_token_ids) + request.params.max_tokens
        kv = self._kv_worst_case(request)
        if self.kv_budget_bytes is not None and kv is not None and kv > self.kv_budget_bytes:
            raise KVBudgetExceeded(f"{worst} tokens of KV cache ({kv} bytes) exceed this model's KV cache budget of "
                                   f"{self.kv_budget_bytes} bytes; reduce the prompt or max_tokens")
        cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, trunk.dtype, trunk.device,
                        min(_round_up(len(request.prompt_token_ids) + 1, 16), worst), max_capacity=worst)
        return Sequence(request.prompt_token_ids, request.params, cache, member.tokenizer, member.tokenizer.eos_token_ids)

    def _kv_worst_case(self, request: GenerationRequest) -> int | None:
        per_token = self.kv_bytes_per_token
        return None if per_token is None else per_token * (len(request.prompt_token_ids) + request.params.max_tokens)

    def kv_reserved_bytes(self) -> int:
        """The running sequences' worst-case KV cache: what admission keeps inside the budget."""
        per_token = self.kv_bytes_per_token or 0
        return sum(per_token * (len(r.request.prompt_token_ids) + r.request.params.max_tokens) for r in self.running)

    def kv_allocated_bytes(self) -> int:
        return sum(r.seq.cache.nbytes for r in self.running)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.running if r.request.cancelled]:
            self._finish(r, "cancelled")
        self.running = [r for r in self.running if not r.request.cancelled]

    async def _run(self, fn, *args):
        return await self.compute.run(fn, *args)

    def _chunk_prefills(self, batch: list[_Running]) -> None:
        """Chunked prefill: decodes take one token each; prompts share the rest of the step's token
        budget, in order, at most prefill_chunk_tokens each, so a long prompt does not stall the
        running decodes for a whole long step. What is left waits in `unfed` for the next step."""
        room = self.max_batch_tokens - sum(1 for r in batch if r.seq.output)
        for r in batch:
            if r.seq.output or r.request.prompt_logprobs is not None:  # prompt logprobs need the prompt whole
                continue
            take = max(1, min(len(r.seq.pending), self.prefill_chunk_tokens, room))
            if take < len(r.seq.pending):
                r.seq.pending, r.unfed = r.seq.pending[:take], r.seq.pending[take:]
            room -= take

    async def _step(self, batch: list[_Running], lane_cost: StepCost | None = None) -> None:
        """One step of `batch`: the running batch's, or with `lane_cost` a lane's (which never yields)."""
        trunk = self.members[batch[0].request.model].trunk()  # members' trunks are the same tensors
        self._chunk_prefills(batch)
        tokens = sum(len(r.seq.pending) for r in batch)
        # Ping-pong only where each half has work enough to hide the other's hop (prefills): a decode step
        # split in two pays a second message per layer and twice the per-op overhead for nothing.
        groups = micro_batches(batch, self.micro_batches if tokens >= self.micro_batch_min_tokens else 1)
        steps = [PackedStep.build(trunk.config, [r.seq.pending for r in g], [r.seq.cache for r in g], trunk.device)
                 for g in groups]
        started = time.perf_counter()
        yields = lane_cost is None
        # Micro-batches ping-pong: one's trunk math runs while another's experts are on the workers.
        parts = await asyncio.gather(*(self._forward(trunk, step, g, yields, warm=len(groups) == 1)
                                       for step, g in zip(steps, groups)))
        if yields:
            await self._yield_to_lane()
        # One lm_head for every group: it is most of a decode step's bytes, read once, not once per group.
        # Every token's logprob is recorded, and the top alternatives asked for: one batched op each.
        asked = max((r.request.logprobs or 0 for r in batch), default=0)
        scores = await self._run(score_rows, trunk.logits, parts[0] if len(parts) == 1 else torch.cat(parts), asked)
        self._last_step_s = time.perf_counter() - started
        cost = self.executor.take_step_cost() if lane_cost is None else lane_cost
        for group, step in zip(groups, steps):
            step.commit([r.seq.cache for r in group])
        batch = [r for g in groups for r in g]
        lengths = [n for step in steps for n in step.lengths]
        self.steps += 1
        self.last_active = time.monotonic()
        total = sum(lengths)
        for i, (r, n) in enumerate(zip(batch, lengths)):
            share = n / total
            u = r.usage
            u.expert_invocations += cost.invocations * share
            u.expert_compute_s += cost.compute_s * share
            u.cold_starts += cost.cold_starts * share
            u.cold_start_s += cost.load_wait_s  # not a share: every sequence of the step waited that long
            u.resident_byte_seconds += cost.touched_bytes * share * self._last_step_s
            decoding = bool(r.seq.output)
            self.fair.charge(r.request.tenant, r.request.weight, prompt_tokens=0 if decoding else n,
                             output_tokens=0 if r.unfed else 1)
            if r.unfed:  # mid-prompt: nothing to sample yet
                r.seq.pending, r.unfed = r.unfed, []
                continue
            token = r.seq.accept(scores.logits[i], scores.log_probs[i], scores.argmax[i])
            u.completion_tokens += 1
            top = None
            if r.request.logprobs:
                n = r.request.logprobs
                top = dict(zip(scores.top_ids[i, :n].tolist(), scores.top_values[i, :n].tolist()))
            r.request.events.put_nowait(TokenEvent(token, self._stream_text(r), r.seq.logprobs[-1], top))
            if r.seq.finished:
                self._finish(r, r.seq.finish_reason or "stop")
        self.running = [r for r in self.running if not r.seq.finished]
        self._drop_cancelled()  # cancelled during the step: they get their Finished too

    async def _forward(self, trunk: Trunk, step: PackedStep, group: list[_Running] = (),
                       yields: bool = False, warm: bool = False) -> torch.Tensor:
        """Drive the shared decoder generator: trunk halves on the compute thread, experts awaited.
        Returns the hidden state of each sequence's last row (the lm_head runs once per step).
        `yields`: wait between ops while a lane runs. `warm`: layers whose experts are warm on this host
        may be called from the compute thread (`_advance_warm`); not for micro-batches, whose point is
        one's trunk math while another's experts run."""
        layers = decoder_layers(trunk, step.ids, step.batch)
        rows = models = None
        if len(self.members) > 1:  # co-batched models: each row's experts are its own model's
            rows = [(r.request.model, n) for r, n in zip(group, step.lengths)]
            models = list(dict.fromkeys(model for model, _ in rows))
        starting = any(not r.seq.output for r in group)
        depth = (self.prefetch_depth or trunk.config.num_layers) if starting else 1
        warm = warm and hasattr(self.executor, "run_layer_warm")  # remote experts only
        cost = current_step_cost()
        if not warm:
            done, value = await self._run(_advance, layers, None)
        else:
            done, value, advanced = await self._run(self._advance_warm, layers, None, trunk, rows, models, cost, depth,
                                                    yields)
            depth = 1 if advanced else depth
        while not done:
            layer, state = value
            if yields:
                await self._yield_to_lane()
            ahead = self._cold_ahead(trunk, layer, depth, models) if self.prefetch else []
            depth = 1
            if not ahead:  # awaited here, not as a task: the call leaves now, not on the loop's next turn
                expert_out = await self.executor.run_layer(layer, state.moe_input, state.routing, rows)
            else:  # later layers' likely blocks load while this layer's experts run
                call = asyncio.ensure_future(self.executor.run_layer(layer, state.moe_input, state.routing, rows))
                try:
                    await self._prefetch(trunk, layer, state.moe_input, ahead, models)
                except BaseException:  # cancelled: the call must not outlive the step
                    call.cancel()
                    raise
                expert_out = await call
            if yields:
                await self._yield_to_lane()
            if not warm:
                done, value = await self._run(_advance, layers, expert_out)
            else:
                done, value, _ = await self._run(self._advance_warm, layers, expert_out, trunk, rows, models, cost, 1,
                                                 yields)
        await self._prompt_logprobs(trunk, step, group, value)
        return step.last_rows(value)

    def _advance_warm(self, layers, expert_out, trunk: Trunk, rows, models: list[str] | None,
                      cost: StepCost | None, depth: int, yields: bool) -> tuple[bool, object, bool]:
        """On the compute thread: the decoder's next trunk half and, while each next MoE layer's experts are
        warm on workers of this host, their call (`run_layer_warm`) and the half after it, with no event loop
        between. Stops at a layer that needs the loop (a block to load or prefetch ahead of it, a worker
        elsewhere, a lane to yield to): (done, the generator's value, whether any layer went through here)."""
        done, value = _advance(layers, expert_out)
        advanced = False
        while not done:
            if yields and not self._lane_idle.is_set():
                break  # a lane runs: the loop waits for it between ops
            layer, state = value
            ahead = self._cold_ahead(trunk, layer, depth, models) if self.prefetch else []
            if ahead and self._would_prefetch(trunk, state.moe_input, ahead, models):
                break  # the loop asks for those loads behind this layer's call
            expert_out = self.executor.run_layer_warm(layer, state.moe_input, state.routing, rows, cost)
            if expert_out is None:
                break
            done, value = _advance(layers, expert_out)
            advanced, depth = True, 1
        return done, value, advanced

    async def _yield_to_lane(self) -> None:
        if not self._lane_idle.is_set():
            await self._lane_idle.wait()

    def _cold_ahead(self, trunk: Trunk, layer: int, depth: int, models: list[str] | None) -> list[int]:
        """Of the next `depth` MoE layers after `layer`, those prefetching could help (a no-op for in-process experts)."""
        try:
            return self.executor.cold_layers(trunk.next_moe_layers(layer, depth), models)
        except Exception:  # a hint that failed must not fail the step
            log.exception("looking ahead of layer %d of %s failed", layer, self.name)
            return []

    async def _prefetch(self, trunk: Trunk, layer: int, x: torch.Tensor, ahead: list[int],
                        models: list[str] | None) -> None:
        """Pre-gate the cold MoE layers `ahead`: their loads are asked now, behind this layer's call (the
        worker loads a call's blocks first, the earlier layer's first)."""
        try:
            if len(ahead) == 1:  # one small router matmul: cheaper here than a hop to the compute thread
                predicted = trunk.pregate(x, ahead)
            else:  # the compute thread is idle while this layer's experts run on the workers
                predicted = await self._run(trunk.pregate, x, ahead)
            for j, experts in predicted:
                self.executor.prefetch(j, experts, models)
        except Exception:  # a hint that failed must not fail the step
            log.exception("prefetching ahead of layer %d of %s failed", layer, self.name)

    def _would_prefetch(self, trunk: Trunk, x: torch.Tensor, ahead: list[int], models: list[str] | None) -> bool:
        """Whether `_prefetch` would ask for a load: the blocks the later layers' routers pick from `x` (one small
        matmul each) include one neither placed nor asked for."""
        try:
            return any(self.executor.would_prefetch(j, experts, models) for j, experts in trunk.pregate(x, ahead))
        except Exception:  # a hint that failed must not fail the step: let the loop's path try it
            log.exception("looking ahead of %s failed", self.name)
            return True

    async def _prompt_logprobs(self, trunk: Trunk, step: PackedStep, group: list[_Running], hidden) -> None:
        """Prefills that asked for their prompt's logprobs get them from every row's logits, not the last alone."""
        start = 0
        for r, n in zip(group, step.lengths):
            if r.request.prompt_logprobs is not None and r.request.prompt_logprobs_result is None and not r.seq.output:
                r.request.prompt_logprobs_result = await self._run(
                    prompt_logprobs, trunk.logits, hidden[start:start + n], r.seq.pending, r.request.prompt_logprobs)
            start += n

    def _stream_text(self, r: _Running) -> str:
        """New text that is safe to send: held back while it could still be a stop string's start."""
        text = r.seq.text
        if r.seq.finished:
            upto = len(text)
        else:
            hold = max((len(s) - 1 for s in r.seq.params.stop), default=0)
            upto = max(r.streamed, len(text) - hold)
        delta = text[r.streamed:upto]
        r.streamed = upto
        return delta

    def _finish(self, r: _Running, reason: str, error: str | None = None, error_code: str = "") -> None:
        """The request's last event; the HTTP side meters it from there."""
        r.request.events.put_nowait(Finished(reason, r.seq.text, r.usage, error, error_code))


def micro_batches(batch: list[_Running], count: int) -> list[list[_Running]]:
    """The batch in at most `count` contiguous groups of about equal tokens (each group >= 1 sequence)."""
    count = max(1, min(count, len(batch)))
    if count == 1:
        return [batch]
    total = sum(len(r.seq.pending) for r in batch)
    groups: list[list[_Running]] = [[]]
    filled = 0
    for i, r in enumerate(batch):
        left_groups, left_seqs = count - len(groups), len(batch) - i
        if groups[-1] and left_groups and (filled >= total * len(groups) / count or left_seqs <= left_groups):
            groups.append([])
        groups[-1].append(r)
        filled += len(r.seq.pending)
    return groups


class KVBudgetExceeded(ValueError):
    """A request whose KV cache could never fit this model's budget."""


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _advance(layers, value):
    """One generator step on the compute thread; StopIteration cannot cross a Future, so wrap it."""
    try:
        return False, layers.send(value)
    except StopIteration as stop:
        return True, stop.value
