"""Expert blocks (the functions of FaaSMoE) and how a layer's tokens are dispatched to them.

The trunk computes routing; a `DispatchPlan` groups the (token, expert) pairs by block; an
`ExpertExecutor` runs the blocks (in process here, on workers in the runtime) and the plan
combines their outputs with the routing weights. In-process and remote execution share the
plan and the block math, so they produce the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F

from faasmoe.model.checkpoint import ExpertWeights
from faasmoe.model.kernels import linear, run_parallel


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


class ExpertBlock:
    """`count` consecutive experts of one layer: the unit that is loaded, evicted and invoked."""

    def __init__(self, layer: int, first: int, weights: ExpertWeights) -> None:
        self.layer = layer
        self.first = first
        self.weights = weights

    @property
    def count(self) -> int:
        return self.weights.gate_up.shape[0]

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes

    def to(self, device: torch.device | str) -> ExpertBlock:
        w = self.weights
        return ExpertBlock(self.layer, self.first, ExpertWeights(w.gate_up.to(device), w.down.to(device)))

    def forward(self, x: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """Row i of x goes through expert `local_expert[i]` of this block (unweighted output).

        Rows are grouped so each active expert runs one matmul pair over all of its rows.
        """
        presorted = local_expert.numel() < 2 or bool((local_expert[1:] >= local_expert[:-1]).all())
        order = None if presorted else torch.argsort(local_expert, stable=True)
        counts = torch.bincount(local_expert, minlength=self.count).tolist()
        grouped = x if order is None else x[order]
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
        if x.device.type == "cpu" and self.weights.nbytes >= PARALLEL_MIN_BYTES * self.count:
            run_parallel(tasks)  # decode is memory-bound: every core streams a different expert
        else:
            for task in tasks:
                task()
        if order is None:
            return out
        result = torch.empty_like(out)
        result[order] = out
        return result


@dataclass(frozen=True)
class BlockCall:
    """The rows of one layer that go to one block: which token, which expert in the block, weight."""

    block: int
    tokens: torch.Tensor  # [n] int64 row of the layer input
    local_experts: torch.Tensor  # [n] int64 expert index inside the block
    weights: torch.Tensor  # [n] routing weight


class DispatchPlan:
    """Groups a layer's (token, expert) pairs by expert block, and combines the results."""

    def __init__(self, routing: Routing, block_size: int) -> None:
        num_tokens, top_k = routing.experts.shape
        self.num_tokens = num_tokens
        experts = routing.experts.reshape(-1)
        tokens = torch.arange(num_tokens, device=experts.device).repeat_interleave(top_k)
        weights = routing.weights.reshape(-1)
        blocks = torch.div(experts, block_size, rounding_mode="floor")
        # Sorted by expert, so by block and within each block by expert: the worker runs each
        # expert's rows as one slice, with no sort of its own (ExpertBlock.forward).
        order = torch.argsort(experts, stable=True)
        blocks, experts, tokens, weights = blocks[order], experts[order], tokens[order], weights[order]
        active, counts = torch.unique_consecutive(blocks, return_counts=True)
        self.calls: list[BlockCall] = []
        start = 0
        for block, n in zip(active.tolist(), counts.tolist()):
            rows = slice(start, start + n)
            self.calls.append(BlockCall(block, tokens[rows], experts[rows] - block * block_size, weights[rows]))
            start += n

    def inputs(self, x: torch.Tensor, call: BlockCall) -> torch.Tensor:
        return x[call.tokens]

    def combine(self, outputs: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Sum of weight * expert output per token, in block order (deterministic)."""
        out = torch.zeros(self.num_tokens, like.shape[-1], dtype=like.dtype, device=like.device)
        for call, y in zip(self.calls, outputs):
            out.index_add_(0, call.tokens, y * call.weights.to(y.dtype)[:, None])
        return out


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

    def run_layer(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        plan = DispatchPlan(routing, self.block_size)
        blocks = self.blocks[layer]
        outputs = [blocks[c.block].forward(plan.inputs(x, c), c.local_experts) for c in plan.calls]
        return plan.combine(outputs, x)
