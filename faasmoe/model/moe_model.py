"""`MoEModel`: the trunk plus an expert executor; the in-process reference engine.

With the default `LocalExpertExecutor` every expert is resident in this process: this is the
full-model baseline. Handing the same trunk a remote executor gives the FaaSMoE path.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig, parse_dtype
from faasmoe.model.experts import ExpertBlock, ExpertExecutor, LocalExpertExecutor
from faasmoe.model.kv_cache import KVCache
from faasmoe.model.trunk import LayerState, StepBatch, Trunk

if TYPE_CHECKING:
    from faasmoe.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def block_ranges(num_experts: int, block_size: int) -> list[tuple[int, int]]:
    """(first expert, count) of each block of a layer; the last block may be smaller."""
    if block_size < 1:
        raise ValueError(f"expert_block_size must be >= 1, got {block_size}")
    return [(first, min(block_size, num_experts - first)) for first in range(0, num_experts, block_size)]


def load_expert_blocks(
    layout: ExpertLayout, block_size: int, dtype: torch.dtype, device: torch.device
) -> dict[int, list[ExpertBlock]]:
    """Every expert block of every MoE layer (the full-model baseline keeps them all)."""
    cfg = layout.config
    return {
        layer: [
            ExpertBlock(layer, first, layout.load_block(layer, first, count, dtype)).to(device).packed()
            for first, count in block_ranges(cfg.num_experts, block_size)
        ]
        for layer in cfg.moe_layers
    }


LayerRequest = tuple[int, LayerState]


def decoder_layers(trunk: Trunk, ids: torch.Tensor, batch: StepBatch) -> Generator[LayerRequest, torch.Tensor, torch.Tensor]:
    """The decoder stack as a generator: yields each MoE layer's expert work, receives its output.

    The math lives here once; `MoEModel` drives it with a synchronous executor, the serving
    engine drives it from the event loop with remote experts. Returns the final hidden states.
    """
    h = trunk.embed_tokens(ids)
    rope = trunk.rope(batch)
    for i in range(trunk.config.num_layers):
        state = trunk.attend(i, h, batch, rope)
        expert_out = (yield i, state) if state.routing is not None else None
        h = trunk.finish(state, expert_out)
    return h


def check_tokens(config: MoEConfig, tokens: list[int], max_new: int = 0, cached: int = 0) -> None:
    """Token ids this model can take, and room for `max_new` more after `cached` ones."""
    if tokens and (min(tokens) < 0 or max(tokens) >= config.vocab_size):
        raise ValueError(f"token id out of range 0..{config.vocab_size - 1}")
    if cached + len(tokens) + max_new > config.max_position_embeddings:
        raise ValueError(f"sequence of {cached + len(tokens) + max_new} tokens exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")


@dataclass
class PackedStep:
    """The new tokens of several sequences packed into one batch, as the offline model and the
    serving engine both feed the decoder stack: token ids [N], cache positions, lengths."""

    ids: torch.Tensor
    batch: StepBatch
    lengths: list[int]

    @classmethod
    def build(cls, config: MoEConfig, new_tokens: list[list[int]], caches: list[KVCache],
              device: torch.device) -> PackedStep:
        if len(new_tokens) != len(caches) or any(len(t) == 0 for t in new_tokens):
            raise ValueError("step needs one non-empty token list per cache")
        lengths = [len(t) for t in new_tokens]
        for cache, tokens in zip(caches, new_tokens):
            check_tokens(config, tokens, 0, cache.length)
        ids = torch.tensor([t for seq in new_tokens for t in seq], dtype=torch.long, device=device)
        return cls(ids, StepBatch.build(caches, lengths, device), lengths)

    def last_rows(self, h: torch.Tensor) -> torch.Tensor:
        """Each sequence's last new token's row of h [N, ...] -> [S, ...]."""
        return h.index_select(0, torch.tensor(self.lengths, device=h.device).cumsum(0) - 1)

    def commit(self, caches: list[KVCache]) -> None:
        for cache, n in zip(caches, self.lengths):
            cache.commit(n)


class MoEModel:
    """A Hugging Face MoE checkpoint as trunk + experts, with batched incremental decoding."""

    def __init__(
        self,
        config: MoEConfig,
        trunk: Trunk,
        executor: ExpertExecutor,
        expert_block_size: int,
        path: Path | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config
        self.trunk = trunk
        self.executor = executor
        self.expert_block_size = expert_block_size
        self.path = path
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        expert_block_size: int | None = None,
        executor: ExpertExecutor | None = None,
    ) -> MoEModel:
        """Load the trunk, and every expert in process unless an executor is given."""
        path = Path(path)
        config = MoEConfig.from_pretrained(path)
        device, dtype = torch.device(device), parse_dtype(dtype)
        block_size = config.num_experts if expert_block_size is None else expert_block_size
        block_ranges(config.num_experts, block_size)  # validates
        reader = CheckpointReader(path)
        trunk = Trunk(config, reader, dtype, device)
        if executor is None:
            blocks = load_expert_blocks(ExpertLayout(reader, config), block_size, dtype, device)
            executor = LocalExpertExecutor(blocks, block_size)
        tokenizer = None
        if (path / "tokenizer.json").exists():
            from faasmoe.model.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(path)
        log.info("loaded %s (%s, %d layers, %d experts, block size %d)", path, config.family,
                 config.num_layers, config.num_experts, block_size)
        return cls(config, trunk, executor, block_size, path, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.trunk.device

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk.dtype

    def new_cache(self, capacity: int = 64) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device, capacity)

    @torch.inference_mode()
    def step(self, new_tokens: list[list[int]], caches: list[KVCache], all_logits: bool = False) -> torch.Tensor:
        """Run the new tokens of several sequences in one packed batch and advance their caches.

        Returns logits of each sequence's last new token [S, V], or of every token [N, V].
        """
        step = PackedStep.build(self.config, new_tokens, caches, self.device)
        h = self.forward_hidden(step.ids, step.batch)
        step.commit(caches)
        return self.trunk.logits(h if all_logits else step.last_rows(h))

    def forward_hidden(self, ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The decoder stack over a packed batch, experts run by this model's executor."""
        layers = decoder_layers(self.trunk, ids, batch)
        request = next(layers)
        try:
            while True:
                layer, state = request
                request = layers.send(self.executor.run_layer(layer, state.moe_input, state.routing))
        except StopIteration as done:
            return done.value

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward of `input_ids` [B, T] -> logits [B, T, V] (no padding)."""
        batch, length = input_ids.shape
        caches = [self.new_cache(length) for _ in range(batch)]
        logits = self.step(input_ids.tolist(), caches, all_logits=True)
        return logits.view(batch, length, -1)
