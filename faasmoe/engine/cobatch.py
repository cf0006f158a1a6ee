"""Models that share their trunk step as one batch: a base and its expert-specialised fine-tunes.

ESFT tenants change a few experts of a base and keep every other tensor byte for byte, so their
trunks are the same tensors (faasmoe.model.shared_tensors) and most of their expert functions are
the same functions (faasmoe.engine.functions). Stepping each model on its own would still pay one
trunk pass and one invoke per shared block per model per layer; here their sequences join one
engine step: one trunk pass for every row, and per MoE layer each row's experts are named by its
own model's functions, so a block the models share is one call for all their rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from faasmoe.engine.executors import _STEP_COST, PrefetchStats, RemoteExpertExecutor, StepCost
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.content import CheckpointDigests
from faasmoe.model.experts import DispatchPlan, Routing
from faasmoe.model.moe_model import block_ranges
from runtime import protocol as p
from runtime.client import FunctionCall, InvokeMeter

Rows = Sequence[tuple[str, int]]  # (model, rows) runs in a packed step's row order


def trunk_identity(path, config, digests: CheckpointDigests) -> tuple:
    """What makes two checkpoints' trunks the same math: their config and every non-expert tensor's content."""
    reader = CheckpointReader(path)
    try:
        layout = ExpertLayout(reader, config)
        expert_names = {name for layer in config.moe_layers
                        for name, _, _, _ in layout.block_parts(layer, 0, config.num_experts)}
        trunk = tuple(sorted((name, digests.tensor(name)) for name in reader.names() if name not in expert_names))
    finally:
        reader.close()
    return config, trunk


class CoBatchedExecutor:
    """The expert work of several models' rows in one step: each row's experts through its model's
    functions, a function the models share called once for all of its rows."""

    def __init__(self, first: RemoteExpertExecutor) -> None:
        self.members: dict[str, RemoteExpertExecutor] = {}
        self.client = first.client
        self.block_size = first.block_size
        self.hits = first.hits  # the engine's own model's; each member's counts are kept in its executor
        self._cost = StepCost()
        self._owners_key: object = None
        self._owners = torch.zeros(0, dtype=torch.int64)
        self.add(first)

    def add(self, member: RemoteExpertExecutor) -> None:
        """One more model of the same trunk; its distinct blocks get call slots beside the others'."""
        if member.block_size != self.block_size or member.client is not self.client:
            raise ValueError(f"model {member.model} cannot step with {list(self.members)}: other block size or runtime")
        self.members[member.model] = member
        self._index = {model: i for i, model in enumerate(self.members)}
        self._owners_key = None
        # Per layer: one slot per distinct function of the members, and [member, block] -> its slot.
        self._slots: dict[int, list[p.FunctionSpec]] = {}
        self._tables: dict[int, torch.Tensor] = {}
        for layer in sorted({layer for m in self.members.values() for layer, _ in m.specs}):
            slots: dict[str, int] = {}
            specs: list[p.FunctionSpec] = []
            blocks = len(block_ranges(member.num_experts, self.block_size))
            table = torch.zeros(len(self.members), blocks, dtype=torch.int64)
            for i, m in enumerate(self.members.values()):
                for b in range(blocks):
                    spec = m.specs[(layer, b)]
                    if spec.function_id not in slots:
                        slots[spec.function_id] = len(specs)
                        specs.append(spec)
                    table[i, b] = slots[spec.function_id]
            self._slots[layer], self._tables[layer] = specs, table

    # -- what the engine calls ------------------------------------------------------------------

    async def run_layer(self, layer: int, x: torch.Tensor, routing: Routing, rows: Rows | None = None) -> torch.Tensor:
        """`rows`: which model each run of x's rows belongs to (None: all of them the first member's)."""
        plan, calls, used = self._planned(layer, x, routing, rows)
        meter = InvokeMeter()
        outputs = await self.client.invoke(calls, meter)
        return self._combined(plan, calls, used, outputs, meter, x, _STEP_COST.get())

    def run_layer_warm(self, layer: int, x: torch.Tensor, routing: Routing, rows: Rows | None = None,
                       cost: StepCost | None = None) -> torch.Tensor | None:
        """`run_layer` on the compute thread when every function is warm on this host; None, counting nothing,
        otherwise (RemoteExpertExecutor.run_layer_warm)."""
        plan, calls, used = self._planned(layer, x, routing, rows)
        meter = InvokeMeter()
        outputs = self.client.invoke_warm(calls, meter)
        return None if outputs is None else self._combined(plan, calls, used, outputs, meter, x, cost)

    def _planned(self, layer: int, x: torch.Tensor, routing: Routing,
                 rows: Rows | None) -> tuple[DispatchPlan, list[FunctionCall], dict[str, set[str]]]:
        owners = self._row_members(rows, x.shape[0])
        bs = self.block_size
        # Each (row, expert) renamed to its function's slot, so DispatchPlan groups rows of every model
        # that calls one function into one call, sorted as it sorts a single model's.
        slot = self._tables[layer][owners[:, None], torch.div(routing.experts, bs, rounding_mode="floor")]
        plan = DispatchPlan(Routing(slot * bs + torch.remainder(routing.experts, bs), routing.weights), bs)
        specs = self._slots[layer]
        calls = [FunctionCall(specs[c.block], xs, c.local_experts) for c, xs in zip(plan.calls, plan.inputs(x))]
        used = self._used_by(rows, slot, specs)
        for model, functions in used.items():
            self.members[model].settle_prefetch(layer, functions)
        return plan, calls, used

    def _combined(self, plan: DispatchPlan, calls: list[FunctionCall], used: dict[str, set[str]],
                  outputs: list[torch.Tensor], meter: InvokeMeter, x: torch.Tensor,
                  cost: StepCost | None) -> torch.Tensor:
        for i, (model, functions) in enumerate(used.items()):  # each model's hit map counts its rows' calls
            self.members[model].hits.record(functions, meter.cold_starts if i == 0 else 0)
        cost = cost or self._cost
        cost.invocations += len(calls)
        cost.cold_starts += meter.cold_starts
        cost.compute_s += meter.compute_s
        cost.load_wait_s += meter.load_wait_s
        for c in calls:
            if c.function.function_id not in cost.touched:
                cost.touched.add(c.function.function_id)
                cost.touched_bytes += c.function.nbytes
        return plan.combine(outputs, x)

    def prefetch(self, layer: int, experts: list[int], models: Sequence[str] | None = None) -> None:
        for model in models or list(self.members)[:1]:
            self.members[model].prefetch(layer, experts)

    def would_prefetch(self, layer: int, experts: list[int], models: Sequence[str] | None = None) -> bool:
        return any(self.members[model].would_prefetch(layer, experts) for model in models or list(self.members)[:1])

    def cold_layers(self, layers: list[int], models: Sequence[str] | None = None) -> list[int]:
        cold: set[int] = set()
        for model in models or list(self.members)[:1]:
            cold.update(self.members[model].cold_layers(layers))
        return sorted(cold)

    def take_step_cost(self) -> StepCost:
        cost, self._cost = self._cost, StepCost()
        return cost

    @property
    def prefetch_stats(self) -> PrefetchStats:
        stats = PrefetchStats()
        for m in self.members.values():
            for field in ("issued", "used", "wasted"):
                setattr(stats, field, getattr(stats, field) + getattr(m.prefetch_stats, field))
        return stats

    # -- the rest of the executor interface: the first member's (deployments keep their own) ----

    @property
    def functions(self) -> list[p.FunctionSpec]:
        return [spec for specs in self._slots.values() for spec in specs]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.functions)

    def resident_bytes(self) -> int:
        routes = self.client.routes
        return sum(spec.nbytes * len(routes.get(spec.function_id, ())) for spec in self.functions)

    def resident_functions(self) -> int:
        routes = self.client.routes
        return sum(1 for spec in self.functions if routes.get(spec.function_id))

    def sharing(self) -> dict[str, int]:
        return {}

    def owned_residency(self, owner: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.members.values():
            out.update(m.owned_residency(owner))
        return out

    def unload(self) -> bool:
        return False

    def reload(self) -> float:
        return 0.0

    def _row_members(self, rows: Rows | None, n: int) -> torch.Tensor:
        """Each row's member index; kept for the step's next layers (the same rows), as a small op costs
        tens of microseconds with the caches as cold as an expert call leaves them."""
        key = tuple(rows) if rows else n
        if key != self._owners_key:
            if not rows:
                owners = torch.zeros(n, dtype=torch.int64)
            else:
                owners = torch.tensor([self._index[model] for model, count in rows for _ in range(count)],
                                      dtype=torch.int64)
            self._owners_key, self._owners = key, owners
        return self._owners

    def _used_by(self, rows: Rows | None, slot: torch.Tensor, specs: list[p.FunctionSpec]) -> dict[str, set[str]]:
        """Model -> the functions its rows called in this layer."""
        runs = rows or [(next(iter(self.members)), slot.shape[0])]
        used: dict[str, set[str]] = {}
        start = 0
        for model, count in runs:
            part = slot[start:start + count].reshape(-1)
            slots = part.tolist() if part.numel() <= 256 else torch.unique(part).tolist()  # a prefill: one op
            used.setdefault(model, set()).update(specs[s].function_id for s in slots)
            start += count
        return used

