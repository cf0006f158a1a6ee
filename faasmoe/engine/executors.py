"""Expert executors for the serving engine: remote workers (FaaSMoE) or in process (baseline)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from faasmoe.engine.functions import FunctionCatalog, function_name
from faasmoe.engine.hits import RecentHits
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig
from faasmoe.model.content import CheckpointDigests
from faasmoe.model.experts import DispatchPlan, LocalExpertExecutor, Routing
from faasmoe.model.moe_model import block_ranges
from runtime import protocol as p
from runtime.client import FunctionCall, InvokeMeter, RuntimeClient
from runtime.compute import ComputeThread


@dataclass
class StepCost:
    """Expert work of one step, split among its sequences by their share of the tokens."""

    invocations: int = 0
    compute_s: float = 0.0
    cold_starts: int = 0
    touched_bytes: int = 0  # bytes of the distinct functions the step used
    load_wait_s: float = 0.0  # how long the step waited for expert loads (every sequence of it waited)
    touched: set[str] = field(default_factory=set, repr=False)  # those functions


_STEP_COST: ContextVar[StepCost | None] = ContextVar("faasmoe_step_cost", default=None)


def current_step_cost() -> StepCost | None:
    """The step cost this context meters into (`own_step_cost`), None for the executor's shared one: what
    a call made on the compute thread for this context (`run_layer_warm`) is told to meter into."""
    return _STEP_COST.get()


@contextlib.contextmanager
def own_step_cost() -> Iterator[StepCost]:
    """Meter the expert work done in this context (a step running beside the engine's main one, in a task
    of its own) here, not into the executor's shared step cost that the main step takes."""
    cost = StepCost()
    token = _STEP_COST.set(cost)
    try:
        yield cost
    finally:
        _STEP_COST.reset(token)


class AsyncExpertExecutor(Protocol):
    """Runs one layer's routed experts and returns their weighted sum, asynchronously; reports what
    the expert work of the step so far cost (metering) and what the model's experts hold."""

    hits: RecentHits  # calls per function in the last seconds (the dashboard's hit map)

    @property
    def functions(self) -> list[p.FunctionSpec]:
        """Every expert function of the model."""

    @property
    def nbytes(self) -> int:
        """Bytes of all the model's experts together."""

    def resident_bytes(self) -> int:
        """Expert bytes held now (replicas count once each)."""

    def resident_functions(self) -> int:
        """How many of `functions` some worker (or this process) holds now."""

    def sharing(self) -> dict[str, int]:
        """Other model -> how many of this model's functions it uses too (the same bytes, one function)."""

    def owned_residency(self, owner: str) -> dict[str, int]:
        """Resident bytes per function of the blocks of this model that only `owner` uses (its memory
        quota counts them; a block shared with another model or tenant is nobody's alone)."""

    async def run_layer(self, layer: int, x: torch.Tensor, routing: Routing,
                        rows: Sequence[tuple[str, int]] | None = None) -> torch.Tensor:
        """`rows`: the model of each run of x's rows, for an executor that steps several models
        (faasmoe.engine.cobatch); one that serves a single model ignores it."""

    def prefetch(self, layer: int, experts: list[int], models: Sequence[str] | None = None) -> None:
        """Warm these experts of `layer` ahead of its call, without waiting (a hint; may do nothing);
        `models`: whose blocks, where the executor steps several."""

    def cold_layers(self, layers: list[int], models: Sequence[str] | None = None) -> list[int]:
        """Those of `layers` with a block nobody holds or loads: the ones prefetching could help."""

    @property
    def prefetch_stats(self) -> PrefetchStats:
        """What `prefetch` did so far."""

    def unload(self) -> bool:
        """Whole-model scale to zero: drop every expert held for this model here; False when nothing was."""

    def reload(self) -> float:
        """Bring back what `unload` dropped (blocking: off the event loop); the seconds it took (0: nothing)."""

    def take_step_cost(self) -> StepCost: ...


@dataclass
class PrefetchStats:
    """Blocks warmed ahead of their layer: issued (not resident anywhere when predicted), then used
    by that layer's call, or wasted (the call did not need them)."""

    issued: int = 0
    used: int = 0
    wasted: int = 0


class RemoteExpertExecutor:
    """One layer's expert work as function calls: one message per worker, combined here."""

    def __init__(self, client: RuntimeClient, model: str, path: Path, config: MoEConfig, block_size: int,
                 dtype: torch.dtype, keep_alive_s: float, owner: str = "", owner_quota_bytes: int = 0,
                 catalog: FunctionCatalog | None = None, digests: CheckpointDigests | None = None,
                 dedupe: bool = True) -> None:
        """Functions named by content (`digests`: the checkpoint's, hashed now when not given); with a
        `catalog` shared by a frontend's models, blocks they hold in common are one function."""
        self.client = client
        self.model = model
        self.block_size = block_size
        self.num_experts = config.num_experts
        self.owner = owner
        self.catalog = catalog if catalog is not None else FunctionCatalog()
        layout = ExpertLayout(CheckpointReader(path), config)
        try:
            digests = digests or CheckpointDigests.of(layout.reader)
            self.specs = self.catalog.model_functions(model, path, layout, digests, block_size, dtype, keep_alive_s,
                                                      owner, owner_quota_bytes, dedupe)
        finally:
            layout.reader.close()
        self.hits = RecentHits(spec.function_id for spec in self.specs.values())
        self._cost = StepCost()
        self.prefetch_stats = PrefetchStats()
        self._prefetched: dict[int, set[int]] = {}  # layer -> blocks warmed for its next call

    @property
    def functions(self) -> list[p.FunctionSpec]:
        return list(self.specs.values())

    def unload(self) -> bool:
        return False  # its functions scale to zero on the workers, each by its own keep-alive

    def reload(self) -> float:
        return 0.0  # cold functions load on their first call

    def cold_layers(self, layers: list[int], models=None) -> list[int]:
        routes = self.client.routes
        blocks = range(len(block_ranges(self.num_experts, self.block_size)))
        return [layer for layer in layers
                if any(not routes.get(self.specs[(layer, b)].function_id) for b in blocks if (layer, b) in self.specs)]

    def prefetch(self, layer: int, experts: list[int], models=None) -> None:
        cold = self._unasked(layer, experts)
        for block in cold:
            self.client.prefetch(self.specs[(layer, block)])
        if cold:
            self._prefetched.setdefault(layer, set()).update(cold)
            self.prefetch_stats.issued += len(cold)

    def would_prefetch(self, layer: int, experts: list[int], models=None) -> bool:
        """Whether `prefetch` would ask for a load (a block of `experts` neither placed nor asked for)."""
        return bool(self._unasked(layer, experts))

    def _unasked(self, layer: int, experts: list[int]) -> list[int]:
        routes = self.client.routes
        blocks = {e // self.block_size for e in experts} - self._prefetched.get(layer, set())
        return [b for b in sorted(blocks) if (layer, b) in self.specs and not routes.get(self.specs[(layer, b)].function_id)]

    def settle_prefetch(self, layer: int, used: set[str]) -> None:
        """The blocks warmed for `layer` meet its call (which used the functions `used`): count them used or wasted."""
        warmed = self._prefetched.pop(layer, None)
        if warmed:
            hit = sum(1 for b in warmed if self.specs[(layer, b)].function_id in used)
            self.prefetch_stats.used += hit
            self.prefetch_stats.wasted += len(warmed) - hit

    async def run_layer(self, layer: int, x: torch.Tensor, routing: Routing, rows=None) -> torch.Tensor:
        plan, calls = self._planned(layer, x, routing)
        meter = InvokeMeter()
        outputs = await self.client.invoke(calls, meter)
        return self._combined(plan, calls, outputs, meter, x, _STEP_COST.get())

    def run_layer_warm(self, layer: int, x: torch.Tensor, routing: Routing, rows=None,
                       cost: StepCost | None = None) -> torch.Tensor | None:
        """`run_layer` on the compute thread, with no event loop on the way, when the layer's functions are
        all warm on workers of this host (`RuntimeClient.invoke_warm`); None, counting nothing, otherwise.
        `cost`: the step cost `run_layer` would meter into (the caller's context's)."""
        plan, calls = self._planned(layer, x, routing)
        meter = InvokeMeter()
        outputs = self.client.invoke_warm(calls, meter)
        return None if outputs is None else self._combined(plan, calls, outputs, meter, x, cost)

    def _planned(self, layer: int, x: torch.Tensor, routing: Routing) -> tuple[DispatchPlan, list[FunctionCall]]:
        plan = DispatchPlan(routing, self.block_size)
        calls = [FunctionCall(self.specs[(layer, c.block)], xs, c.local_experts) for c, xs in zip(plan.calls, plan.inputs(x))]
        if self._prefetched:
            self.settle_prefetch(layer, {c.function.function_id for c in calls})
        return plan, calls

    def _combined(self, plan: DispatchPlan, calls: list[FunctionCall], outputs: list[torch.Tensor],
                  meter: InvokeMeter, x: torch.Tensor, cost: StepCost | None) -> torch.Tensor:
        self.hits.record((c.function.function_id for c in calls), meter.cold_starts)
        cost = cost or self._cost
        cost.invocations += len(calls)
        cost.cold_starts += meter.cold_starts
        cost.compute_s += meter.compute_s
        cost.load_wait_s += meter.load_wait_s
        for c in calls:
            if c.function.function_id not in cost.touched:
                cost.touched.add(c.function.function_id)
                cost.touched_bytes += c.function.nbytes
        return plan.combine(outputs, x)  # in x's dtype, converted once there

    def take_step_cost(self) -> StepCost:
        cost, self._cost = self._cost, StepCost()
        return cost

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    def resident_bytes(self) -> int:
        """Bytes of this model's functions that some worker holds (or is loading), per the routing table;
        a block that serves several of its layers or experts counts once."""
        routes = self.client.routes
        distinct = {spec.function_id: spec for spec in self.specs.values()}.values()
        return sum(spec.nbytes * len(routes.get(spec.function_id, ())) for spec in distinct)

    def sharing(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for fid in {spec.function_id for spec in self.specs.values()}:
            for model in {u.model for u in self.catalog.users(fid)} - {self.model}:
                counts[model] = counts.get(model, 0) + 1
        return counts

    def owned_residency(self, owner: str) -> dict[str, int]:
        routes = self.client.routes
        return {spec.function_id: spec.nbytes * len(routes.get(spec.function_id, ())) for spec in self.specs.values()
                if owner and spec.owner == owner and routes.get(spec.function_id)}

    def resident_functions(self) -> int:
        routes = self.client.routes
        return sum(1 for spec in self.specs.values() if routes.get(spec.function_id))


class InProcessExpertExecutor:
    """Every expert resident in this process (the full-model baseline), run on the compute thread.

    With a `loader`, the blocks can be dropped (`unload`) and loaded again (`reload`): a whole-model
    deployment that scales to zero; each reload is a cold start in the step cost, as a worker's is."""

    def __init__(self, local: LocalExpertExecutor, compute: ComputeThread, model: str = "in-process",
                 loader: Callable[[], LocalExpertExecutor] | None = None) -> None:
        self.local: LocalExpertExecutor | None = local
        self.compute = compute
        self.model = model
        self.loader = loader
        self._functions = [p.FunctionSpec(function_name(model, layer, i), "", layer, b.first, b.count,
                                          str(b.dtype).removeprefix("torch."), b.nbytes, name=function_name(model, layer, i))
                           for layer, blocks in local.blocks.items() for i, b in enumerate(blocks)]
        self._nbytes = local.nbytes
        self.hits = RecentHits(f.function_id for f in self._functions)
        self._cost = StepCost()
        self.cold_starts = 0
        self.load_seconds = 0.0  # every reload's, together

    @property
    def functions(self) -> list[p.FunctionSpec]:
        return list(self._functions)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def resident_bytes(self) -> int:
        return self._nbytes if self.local is not None else 0

    def resident_functions(self) -> int:
        return len(self._functions) if self.local is not None else 0

    def sharing(self) -> dict[str, int]:
        return {}  # in process, every model holds its own experts

    def owned_residency(self, owner: str) -> dict[str, int]:
        return {self.model: self.resident_bytes()}  # nothing is shared in process: all of it is the model's

    def unload(self) -> bool:
        """Drop every block (only with a loader to bring them back); False when there was nothing to drop."""
        if self.loader is None or self.local is None:
            return False
        self.local = None
        return True

    def reload(self) -> float:
        """Load the blocks again if they were dropped (blocking: call it off the event loop); the seconds it took."""
        if self.local is not None:
            return 0.0
        start = time.perf_counter()
        self.local = self.loader()
        took = time.perf_counter() - start
        self.cold_starts += 1
        self.load_seconds += took
        self._cost.cold_starts += 1
        self._cost.load_wait_s += took
        return took

    def prefetch(self, layer: int, experts: list[int], models=None) -> None:
        pass  # every expert is resident already

    def cold_layers(self, layers: list[int], models=None) -> list[int]:
        return []  # all or nothing: a whole-model reload loads every layer before the step

    @property
    def prefetch_stats(self) -> PrefetchStats:
        return PrefetchStats()

    async def run_layer(self, layer: int, x: torch.Tensor, routing: Routing, rows=None) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if self.local is None:  # unloaded between the trunk's reload and this call: load here
            await self.compute.run(self.reload)
        local = self.local
        plan = DispatchPlan(routing, local.block_size)
        blocks = [c.block for c in plan.calls]
        start = loop.time()
        out = await self.compute.run(local.run_layer, layer, x, routing, plan)
        self.hits.record(function_name(self.model, layer, b) for b in blocks)
        cost = _STEP_COST.get() or self._cost
        cost.invocations += len(blocks)
        cost.compute_s += loop.time() - start
        cost.touched_bytes = self.resident_bytes()  # every expert is held for every step
        return out

    def take_step_cost(self) -> StepCost:
        cost, self._cost = self._cost, StepCost()
        cost.touched_bytes = self.resident_bytes()
        return cost
