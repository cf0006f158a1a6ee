"""Expert executors for the serving engine: remote workers (FaaSMoE) or in process (baseline)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from faasmoe.config import MoEConfig
from faasmoe.engine import StepCost
from faasmoe.experts import DispatchPlan, LocalExpertExecutor, Routing
from faasmoe.model import block_ranges
from runtime import protocol as p
from runtime.client import FunctionCall, InvokeMeter, RuntimeClient


def function_id(model: str, layer: int, block: int, owner: str = "") -> str:
    """`model/layer/block`, prefixed `tenant:` for a private deployment (DESIGN.md)."""
    base = f"{model}/{layer}/{block}"
    return f"{owner}:{base}" if owner else base


class RemoteExpertExecutor:
    """One layer's expert work as function calls: one message per worker, combined here."""

    def __init__(self, client: RuntimeClient, model: str, path: Path, config: MoEConfig, block_size: int,
                 dtype: torch.dtype, keep_alive_s: float, owner: str = "") -> None:
        self.client = client
        self.block_size = block_size
        dtype_name = str(dtype).removeprefix("torch.")
        self.specs: dict[tuple[int, int], p.FunctionSpec] = {}
        for layer in config.moe_layers:
            for block, (first, count) in enumerate(block_ranges(config.num_experts, block_size)):
                self.specs[(layer, block)] = p.FunctionSpec(
                    function_id(model, layer, block, owner), str(Path(path).resolve()), layer, first, count,
                    dtype_name, count * config.expert_bytes(dtype), owner, keep_alive_s)
        self._cost = StepCost()
        self._touched: set[str] = set()

    @property
    def functions(self) -> list[p.FunctionSpec]:
        return list(self.specs.values())

    async def run_layer(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        plan = DispatchPlan(routing, self.block_size)
        calls = [FunctionCall(self.specs[(layer, c.block)], plan.inputs(x, c), c.local_experts) for c in plan.calls]
        meter = InvokeMeter()
        outputs = await self.client.invoke(calls, meter)
        cost = self._cost
        cost.invocations += len(calls)
        cost.cold_starts += meter.cold_starts
        cost.compute_s += meter.compute_s
        for c in calls:
            if c.function.function_id not in self._touched:
                self._touched.add(c.function.function_id)
                cost.touched_bytes += c.function.nbytes
        return plan.combine([o.to(x.dtype) for o in outputs], x)

    def take_step_cost(self) -> StepCost:
        cost, self._cost, self._touched = self._cost, StepCost(), set()
        return cost

    def resident_bytes(self) -> int:
        """Bytes of this model's functions that some worker holds (or is loading), per the routing table."""
        routes = self.client.routes
        return sum(spec.nbytes * len(routes.get(spec.function_id, ())) for spec in self.specs.values())


class InProcessExpertExecutor:
    """Every expert resident in this process (the full-model baseline), run on the compute thread."""

    def __init__(self, local: LocalExpertExecutor, compute: ThreadPoolExecutor) -> None:
        self.local = local
        self.compute = compute
        self._cost = StepCost()

    async def run_layer(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        plan_calls = len(DispatchPlan(routing, self.local.block_size).calls)
        start = asyncio.get_running_loop().time()
        out = await asyncio.get_running_loop().run_in_executor(self.compute, self.local.run_layer, layer, x, routing)
        self._cost.invocations += plan_calls
        self._cost.compute_s += asyncio.get_running_loop().time() - start
        return out

    def take_step_cost(self) -> StepCost:
        cost, self._cost = self._cost, StepCost()
        cost.touched_bytes = self.local.nbytes
        return cost
