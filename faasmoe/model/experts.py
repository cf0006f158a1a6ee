"""Expert blocks (the functions of FaaSMoE) and how a layer's tokens are dispatched to them.

The trunk computes routing; a `DispatchPlan` groups the (token, expert) pairs by block; an
`ExpertExecutor` runs the blocks (in process here, on workers in the runtime) and the plan
combines their outputs with the routing weights. In-process and remote execution share the
plan and the block math, so they produce the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F

from faasmoe.model.checkpoint import ExpertWeights, QuantizedExpertWeights
from faasmoe.model.kernels import PackedWeight, linear, pack_weight, run_parallel


@dataclass(frozen=True)
class Routing:
    """Top-k routing of N tokens: expert ids [N, k] (int64) and weights [N, k]."""

    experts: torch.Tensor
    weights: torch.Tensor


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool) -> Routing:
    """Softmax router in fp32 like the reference: logits in the model dtype, probs in fp32."""
    logits = F.linear(x, router)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(experts=experts, weights=weights)


# Below this many weight bytes per expert, handing experts to other cores costs more than it saves.
PARALLEL_MIN_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class PackedExpertWeights:
    """A block's experts with every matrix in the layout this CPU's matmul streams fastest
    (oneDNN's blocked bf16: 1.3-1.6x the bandwidth of F.linear at 1-8 rows on the A2.7B expert
    shapes, both cores). The same bytes as the `ExpertWeights` it replaces; CPU only."""

    gate_up: tuple[PackedWeight, ...]  # per expert, [2*I, H]
    down: tuple[PackedWeight, ...]  # per expert, [H, I]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.gate_up) + sum(w.nbytes for w in self.down)


BlockWeights = ExpertWeights | PackedExpertWeights | QuantizedExpertWeights  # a block's weights, as held


def needs_packing(weights: BlockWeights) -> bool:
    """Whether `pack_experts` may change the block (a plain one on the CPU, or 4-bit matrices the kernel takes)."""
    if isinstance(weights, QuantizedExpertWeights):
        return weights.can_pack
    return isinstance(weights, ExpertWeights) and weights.gate_up.device.type == "cpu"


def pack_experts(weights: BlockWeights) -> BlockWeights:
    """The block in its fastest layout on this device (itself where packing does not help)."""
    if isinstance(weights, PackedExpertWeights):
        return weights
    if isinstance(weights, QuantizedExpertWeights):
        return weights.packed()
    if weights.gate_up.device.type != "cpu" or not weights.gate_up.shape[0]:
        return weights
    first = pack_weight(weights.gate_up[0])
    if not isinstance(first, PackedWeight):
        return weights
    return PackedExpertWeights((first, *(pack_weight(w) for w in weights.gate_up[1:])),
                               tuple(pack_weight(w) for w in weights.down))


class ExpertBlock:
    """`count` consecutive experts of one layer: the unit that is loaded, evicted and invoked."""

    def __init__(self, layer: int, first: int, weights: BlockWeights) -> None:
        self.layer = layer
        self.first = first
        self.weights = weights

    @property
    def count(self) -> int:
        return len(self.weights.gate_up)

    @property
    def hidden_size(self) -> int:
        w = self.weights.gate_up
        return w[0].shape[1] if isinstance(w, tuple) else w.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        w = self.weights.gate_up
        return w[0].dtype if isinstance(w, tuple) else w.dtype

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes

    def to(self, device: torch.device | str) -> ExpertBlock:
        w = self.weights
        if isinstance(w, PackedExpertWeights):
            if torch.device(device).type != "cpu":
                raise ValueError("a block packed for the CPU cannot move to another device")
            return self
        if isinstance(w, QuantizedExpertWeights):
            return ExpertBlock(self.layer, self.first, w.to(device))
        return ExpertBlock(self.layer, self.first, ExpertWeights(w.gate_up.to(device), w.down.to(device)))

    def packed(self) -> ExpertBlock:
        """This block in its fastest layout on its device (see `pack_experts`)."""
        packed = pack_experts(self.weights)
        return self if packed is self.weights else ExpertBlock(self.layer, self.first, packed)

    def forward(self, x: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """Row i of x goes through expert `local_expert[i]` of this block (unweighted output)."""
        return run_blocks([(self, x, local_expert)])[0]

    def _start(self, x: torch.Tensor, local_expert: torch.Tensor) -> _BlockRun:
        """The block's work on these rows as one task per active expert (one matmul pair over all of
        its rows); rows come sorted by expert from the frontend, so usually nothing is re-sorted."""
        small = local_expert.numel() <= SMALL_PLAN_PAIRS  # decode: in Python, one copy instead of ~6 small ops
        if small:
            values = local_expert.tolist()
            low, high = (min(values), max(values)) if values else (0, 0)
            presorted = all(a <= b for a, b in zip(values, values[1:]))
        else:
            low, high = (v.item() for v in torch.aminmax(local_expert))
            presorted = bool((local_expert[1:] >= local_expert[:-1]).all())
        # Checked here, where every caller passes (a worker's invoke, the in-process model): a list would
        # count a negative index from the end, and bincount would grow past the block.
        if not 0 <= low <= high < self.count:
            raise ValueError(f"expert indices must be in 0..{self.count - 1} (>= 0, < {self.count}), got {low}..{high} "
                             f"(layer {self.layer}, block from expert {self.first})")
        if small:
            counts = [0] * self.count
            for e in values:
                counts[e] += 1
        else:
            counts = torch.bincount(local_expert, minlength=self.count).tolist()
        order = None if presorted else torch.argsort(local_expert, stable=True)
        grouped = x if order is None else x.index_select(0, order)
        out = torch.empty_like(grouped)
        gate_up, down = self.weights.gate_up, self.weights.down

        def expert_mlp(expert: int, rows: slice) -> None:
            gate, up = linear(grouped[rows], gate_up[expert]).chunk(2, dim=-1)
            out[rows] = linear(F.silu(gate) * up, down[expert])

        tasks, start = [], 0
        for expert, n in enumerate(counts):
            if n:
                tasks.append(partial(expert_mlp, expert, slice(start, start + n)))
                start += n
        parallel = x.device.type == "cpu" and self.nbytes >= PARALLEL_MIN_BYTES * self.count
        return _BlockRun(tasks, out, order, parallel)


@dataclass
class _BlockRun:
    tasks: list[Callable[[], None]]
    out: torch.Tensor
    order: torch.Tensor | None
    parallel: bool

    def result(self) -> torch.Tensor:
        if self.order is None:
            return self.out
        return torch.empty_like(self.out).index_copy_(0, self.order, self.out)


def run_blocks(calls: list[tuple[ExpertBlock, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Several blocks' calls at once: every active expert of every call is one task, and on CPU the
    tasks share the per-core pool, so a layer's experts stream on all cores even when each block
    has a single active expert (block size 1-4). Outputs in the order of `calls`."""
    runs = [block._start(x, local) for block, x, local in calls]
    parallel = [task for run in runs if run.parallel for task in run.tasks]
    run_parallel(parallel)  # decode is memory-bound: every core streams a different expert
    for run in runs:
        if not run.parallel:
            for task in run.tasks:
                task()
    return [run.result() for run in runs]


@dataclass(frozen=True)
class BlockCall:
    """The rows of one layer that go to one block, and which expert of the block each goes to."""

    block: int
    rows: slice  # its span of the plan's sorted pairs (its tokens: `plan.tokens[rows]`, weights: `plan.weights[rows]`)
    local_experts: torch.Tensor  # [n] int64 expert index inside the block


class DispatchPlan:
    """Groups a layer's (token, expert) pairs by expert block, and combines the results.

    Built on the request path of every MoE layer, with caches as cold as the last expert call left them,
    so every tensor is made once for all pairs and a call's fields are views of them: a small op costs
    5-10x its hot time there (the plan and its calls took 350-460 us per batch-1 layer in a server)."""

    def __init__(self, routing: Routing, block_size: int) -> None:
        num_tokens, top_k = routing.experts.shape
        self.num_tokens = num_tokens
        if num_tokens * top_k <= SMALL_PLAN_PAIRS:
            order, local, self.tokens, self._gather, runs = _sorted_pairs(routing.experts, block_size)
        else:
            # Sorted by expert, so by block and within each block by expert: the worker runs each
            # expert's rows as one slice, with no sort of its own (ExpertBlock.forward).
            order = torch.argsort(routing.experts.reshape(-1), stable=True)
            experts = routing.experts.reshape(-1).index_select(0, order)
            self.tokens = torch.div(order, top_k, rounding_mode="floor")  # pair i of token t sits at t * k + i
            # Where each token's k rows sit among the sorted ones, in expert order (as the reference adds them).
            rank = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
            self._gather = rank.view(num_tokens, top_k).sort(dim=1).values.view(-1)
            local = torch.remainder(experts, block_size)
            active, counts = torch.unique_consecutive(torch.div(experts, block_size, rounding_mode="floor"),
                                                      return_counts=True)
            runs = zip(active.tolist(), counts.tolist())
        self.weights = routing.weights.reshape(-1).index_select(0, order)  # [pairs] in the sorted order
        self.calls: list[BlockCall] = []
        start = 0
        for block, n in runs:
            rows = slice(start, start + n)
            self.calls.append(BlockCall(block, rows, local[rows]))
            start += n

    def inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each call's rows of x, gathered at once (one copy; every call's part is a contiguous view)."""
        gathered = x.index_select(0, self.tokens)
        return [gathered[call.rows] for call in self.calls]

    def combine(self, outputs: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Sum of weight * expert output per token in `like`'s dtype, added in expert order like the reference does.
        A gather and k adds: index_add_ costs ~10 ms per call in fp32 on CPU (torch 2.13), even for one row."""
        if not self.calls:
            return torch.zeros(self.num_tokens, like.shape[-1], dtype=like.dtype, device=like.device)
        y = (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).to(like.dtype)
        # index_select, not y[idx]: advanced indexing costs ~100 us here against ~6 us.
        y = (y * self.weights.to(y.dtype)[:, None]).index_select(0, self._gather)
        y = y.view(self.num_tokens, -1, y.shape[-1])  # [tokens, k, hidden]
        out = y[:, 0].contiguous()
        for j in range(1, y.shape[1]):
            out += y[:, j]
        return out


# Up to this many (token, expert) pairs (decode batches) the plan is sorted in Python: one copy of the
# routing out and one tensor back in, against a dozen small tensor ops that each cost 10-30 us with the
# caches as cold as an expert call leaves them (plan + inputs, 64 MB touched before each: 1 token
# 185 -> 138 us, 4 tokens 280 -> 210 us; equal at 16 tokens, slower at 32).
SMALL_PLAN_PAIRS = 32


def _sorted_pairs(routing_experts: torch.Tensor, block_size: int):
    """`DispatchPlan`'s sort of a few pairs: (order, local experts, tokens, gather) on the routing's device,
    the same values as the tensor path gives, and (block, pairs) of each block in order."""
    top_k = routing_experts.shape[1]
    flat = routing_experts.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=flat.__getitem__)  # stable, as argsort(stable=True)
    experts = [flat[i] for i in order]
    rank = [0] * len(order)
    for position, pair in enumerate(order):
        rank[pair] = position
    gather = [r for t in range(0, len(rank), top_k) for r in sorted(rank[t:t + top_k])]
    packed = torch.tensor([order, [e % block_size for e in experts], [i // top_k for i in order], gather],
                          dtype=torch.long, device=routing_experts.device)
    runs: list[tuple[int, int]] = []
    for e in experts:
        block = e // block_size
        if runs and runs[-1][0] == block:
            runs[-1] = (block, runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    order, local, tokens, gather = packed.unbind()
    return order, local, tokens, gather, runs


class ExpertExecutor(Protocol):
    """Runs the routed experts of one layer for a batch of tokens and returns their weighted sum."""

    def run_layer(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor: ...


class LocalExpertExecutor:
    """All expert blocks resident in this process: the full-model baseline."""

    def __init__(self, blocks: dict[int, list[ExpertBlock]], block_size: int) -> None:
        self.blocks = blocks
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for layer in self.blocks.values() for b in layer)

    def run_layer(self, layer: int, x: torch.Tensor, routing: Routing, plan: DispatchPlan | None = None) -> torch.Tensor:
        if plan is None:
            plan = DispatchPlan(routing, self.block_size)
        blocks = self.blocks[layer]
        outputs = run_blocks([(blocks[c.block], xs, c.local_experts) for c, xs in zip(plan.calls, plan.inputs(x))])
        return plan.combine(outputs, x)
