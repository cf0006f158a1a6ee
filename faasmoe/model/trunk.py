"""The trunk: every weight of an MoE model except the routed experts, and its math.

The trunk stays in the frontend; the routed experts are functions. A layer runs in two
halves around the expert call: `attend` (norm, attention, the router and the shared expert)
and `finish` (add the experts' output back into the residual stream). A quantized checkpoint's
trunk linears are dequantized once, at load: the trunk is read once, the experts are what stays quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from faasmoe.model.checkpoint import FLOAT8, CheckpointReader, ExpertLayout, unscaled_fp8
from faasmoe.model.config import MoEConfig
from faasmoe.model.content import CheckpointDigests, ContentMismatch, hash_tensor
from faasmoe.model.experts import Routing, route
from faasmoe.model.kernels import linear, pack_weight
from faasmoe.model.kv_cache import KVCache
from faasmoe.model.layers import apply_rope, causal_attention, rms_norm, rope_cos_sin, rope_inv_freq, swiglu
from faasmoe.model.quantized import from_stored, stored_names
from faasmoe.model.shared_tensors import SharedTensors

T = TypeVar("T")


@dataclass
class LayerWeights:
    """One decoder layer's trunk weights; optional parts are None when the family lacks them."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 kv, H]: q, k and v fused for one matmul
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    router: torch.Tensor | None  # MoE layers
    shared_gate_up: torch.Tensor | None  # shared expert (qwen2_moe), or the dense MLP
    shared_down: torch.Tensor | None
    shared_expert_gate: torch.Tensor | None  # sigmoid gate of the shared expert


@dataclass
class StepBatch:
    """The new tokens of one step, packed: sequence i owns rows offsets[i]:offsets[i+1]."""

    caches: list[KVCache]
    lengths: list[int]
    positions: torch.Tensor  # [N]

    @classmethod
    def build(cls, caches: list[KVCache], lengths: list[int], device: torch.device) -> StepBatch:
        positions = torch.cat(
            [torch.arange(c.length, c.length + n, device=device) for c, n in zip(caches, lengths)]
        )
        return cls(caches, lengths, positions)


@dataclass
class LayerState:
    """What `attend` hands to the expert call and to `finish`."""

    residual: torch.Tensor
    moe_input: torch.Tensor
    routing: Routing | None  # None for dense layers
    shared_out: torch.Tensor


class Trunk:
    """Non-expert weights of one model on one device, with the per-layer math.

    With the checkpoint's content `digests`, a tensor read from a file changed since they were made is
    hashed and refused unless it is what the digests name (ContentMismatch), and tensors are taken from
    `shared` by content: a model that holds the same bytes as one already loaded (a fine-tune of the same
    base) shares them."""

    def __init__(self, config: MoEConfig, reader: CheckpointReader, dtype: torch.dtype, device: torch.device,
                 digests: CheckpointDigests | None = None, shared: SharedTensors | None = None) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.layout = ExpertLayout(reader, config)
        self._reader = reader
        self._digests = digests
        self._shared = shared if shared is not None else SharedTensors()
        cfg = config
        self.embed = self._load("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        self.norm = self._load("model.norm.weight", (cfg.hidden_size,))
        if cfg.tie_word_embeddings or not reader.has("lm_head.weight"):
            self.lm_head = self.embed
        else:
            self.lm_head = self._linear([("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))])
        self.layers = [self._load_layer(i) for i in range(cfg.num_layers)]
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device)
        del self._reader, self._digests, self._shared

    def _load(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._content("tensor", [name], lambda: self._read(name, shape))

    def _stored(self, name: str) -> list[str]:
        """The checkpoint tensors that hold weight `name` (its quantized parts, in a quantized checkpoint)."""
        return stored_names(self._reader.has, self.config.quantization, name)

    def _read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A weight from the checkpoint, dequantized if stored quantized."""
        stored = self._stored(name)
        if stored == [name]:
            raw = self._verified(name, shape)
            if raw.dtype in FLOAT8:
                raise unscaled_fp8(self._reader.path, name, raw.dtype)
            return raw.to(self.dtype).to(self.device)
        parts = {part.rsplit(".", 1)[1]: self._verified(part) for part in stored}
        return from_stored(self.config.quantization, parts, shape, self.dtype, name).dequantize().to(self.device)

    def _verified(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A tensor as the file holds it, hashed and refused unless it is what the digests name; read from
        the very file the digests were made of (same identity, ctime included), the digests are its proof."""
        raw = self._reader.tensor(name, shape)
        file = self._reader.entry(name).file
        if self._digests is not None and not self._digests.hashed_as(file, self._reader.identity(file)):
            expect, got = self._digests.tensor(name), hash_tensor(raw)
            if got != expect:
                raise ContentMismatch(f"{self._reader.path}: tensor {name!r} hashes to {got[:16]}, not {expect[:16]} "
                                      "as when the model was deployed: the checkpoint changed; refusing to load it")
        return raw

    def _linear(self, parts: list[tuple[str, tuple[int, ...]]], pack: bool = True):
        """The weights `parts` stacked along their rows (one matmul for all), packed for `linear` unless
        told otherwise; shared by content like every tensor."""
        def make():
            stacked = torch.cat([self._load(n, s) for n, s in parts]) if len(parts) > 1 else self._load(*parts[0])
            return pack_weight(stacked) if pack else stacked

        return self._content("linear" if pack else "stacked", [n for n, _ in parts], make)

    def _content(self, kind: str, names: list[str], make: Callable[[], T]) -> T:
        """`make()`, or the object another trunk made from the same bytes (same kind, dtype, device)."""
        if self._digests is None:
            return make()
        key = (kind, tuple(self._digests.tensor(part) for n in names for part in self._stored(n)), self.dtype,
               str(self.device))
        return self._shared.get(key, make)

    def _load_layer(self, i: int) -> LayerWeights:
        cfg, p = self.config, f"model.layers.{i}"
        hidden, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
        attn = f"{p}.self_attn"
        qkv = self._linear([(f"{attn}.{n}_proj.weight", (s, hidden)) for n, s in (("q", q), ("k", kv), ("v", kv))])
        qkv_bias = None
        if cfg.qkv_bias:
            qkv_bias = self._linear([(f"{attn}.{n}_proj.bias", (s,)) for n, s in (("q", q), ("k", kv), ("v", kv))],
                                    pack=False)
        norm_sizes = {"none": None, "per_head": (cfg.head_dim, cfg.head_dim), "full": (q, kv)}[cfg.qk_norm]
        router = shared_gate_up = shared_down = shared_gate = None
        if cfg.is_moe_layer(i):
            router = self._load(self.layout.router_name(i), (cfg.num_experts, hidden))
            if cfg.shared_expert_intermediate_size:
                shared_gate_up, shared_down = self._mlp(f"{p}.mlp.shared_expert", cfg.shared_expert_intermediate_size)
                shared_gate = self._load(f"{p}.mlp.shared_expert_gate.weight", (1, hidden))
        else:
            shared_gate_up, shared_down = self._mlp(f"{p}.mlp", cfg.intermediate_size)
        return LayerWeights(
            input_norm=self._load(f"{p}.input_layernorm.weight", (hidden,)),
            post_attention_norm=self._load(f"{p}.post_attention_layernorm.weight", (hidden,)),
            qkv=qkv,
            qkv_bias=qkv_bias,
            o=self._linear([(f"{attn}.o_proj.weight", (hidden, q))]),
            o_bias=self._load(f"{attn}.o_proj.bias", (hidden,)) if cfg.o_bias else None,
            q_norm=self._load(f"{attn}.q_norm.weight", (norm_sizes[0],)) if norm_sizes else None,
            k_norm=self._load(f"{attn}.k_norm.weight", (norm_sizes[1],)) if norm_sizes else None,
            router=router,
            shared_gate_up=shared_gate_up,
            shared_down=shared_down,
            shared_expert_gate=shared_gate,
        )

    def _mlp(self, prefix: str, inter: int):
        hidden = self.config.hidden_size
        gate_up = self._linear([(f"{prefix}.gate_proj.weight", (inter, hidden)), (f"{prefix}.up_proj.weight", (inter, hidden))])
        return gate_up, self._linear([(f"{prefix}.down_proj.weight", (hidden, inter))])

    def tensors(self) -> list:
        """Every weight object this trunk holds (once each; some may be shared with other trunks)."""
        found = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            found += [t for t in vars(layer).values() if t is not None]
        return list({id(t): t for t in found}.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed)

    def rope(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(batch.positions, self.inv_freq, self.dtype)

    def attend(self, i: int, h: torch.Tensor, batch: StepBatch, rope: tuple[torch.Tensor, torch.Tensor]) -> LayerState:
        """First half of layer i: attention, then the MoE input, its routing and the shared expert."""
        cfg, w = self.config, self.layers[i]
        h = h + self._attention(i, rms_norm(h, w.input_norm, cfg.rms_norm_eps), batch, rope)
        x = rms_norm(h, w.post_attention_norm, cfg.rms_norm_eps)
        if w.router is None:
            return LayerState(h, x, None, swiglu(x, w.shared_gate_up, w.shared_down))
        routing = route(x, w.router, cfg.top_k, cfg.norm_topk_prob)
        if w.shared_gate_up is None:
            return LayerState(h, x, routing, torch.zeros_like(x))
        shared = swiglu(x, w.shared_gate_up, w.shared_down) * torch.sigmoid(F.linear(x, w.shared_expert_gate))
        return LayerState(h, x, routing, shared)

    def next_moe_layers(self, i: int, depth: int) -> list[int]:
        """The next `depth` MoE layers after layer i (fewer near the end)."""
        return [j for j in range(i + 1, self.config.num_layers) if self.layers[j].router is not None][:depth]

    def pregate(self, x: torch.Tensor, layers: list[int]) -> list[tuple[int, list[int]]]:
        """Pre-gating (Pre-gated MoE, ProMoE): later MoE layers' routers on an earlier layer's MoE input predict
        which of their experts the batch will need; the residual stream changes little between
        neighbouring layers, more the further apart they are, but a prompt's many rows hit most blocks
        of every layer anyway. (layer, distinct experts) for each of `layers`."""
        cfg = self.config
        return [(j, sorted(set(route(x, self.layers[j].router, cfg.top_k, cfg.norm_topk_prob)
                               .experts.reshape(-1).tolist()))) for j in layers]

    @staticmethod
    def finish(state: LayerState, expert_out: torch.Tensor | None) -> torch.Tensor:
        """Second half of a layer: the residual plus the experts' and shared expert's outputs."""
        if expert_out is None:
            return state.residual + state.shared_out
        return state.residual + (expert_out + state.shared_out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head)

    def _attention(self, i: int, x: torch.Tensor, batch: StepBatch, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg, w = self.config, self.layers[i]
        qkv = linear(x, w.qkv, w.qkv_bias)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        n = x.shape[0]
        if cfg.qk_norm == "full":
            q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.reshape(n, cfg.num_heads, cfg.head_dim)
        k = k.reshape(n, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(n, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "per_head":
            q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = torch.empty(n, cfg.num_heads, cfg.head_dim, dtype=q.dtype, device=q.device)
        start = 0
        for cache, t in zip(batch.caches, batch.lengths):
            rows = slice(start, start + t)
            keys, values = cache.update(i, k[rows], v[rows])
            out[rows] = causal_attention(q[rows].transpose(0, 1), keys, values, cache.length).transpose(0, 1)
            start += t
        return linear(out.reshape(n, cfg.q_size), w.o, w.o_bias)
