"""Model shapes for `faasmoe model init`: a tiny preset per family and the real published ones.

`Preset.hf_config` renders the `config.json` the family's real Hugging Face checkpoints ship
(the same keys, spelled the same way), so that what we generate reads like the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

FAMILIES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe")

_ARCHITECTURES = {
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


@dataclass(frozen=True)
class Preset:
    """The architecture of one model; sizes are those of the family's config.json keys."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    moe_intermediate_size: int  # one routed expert
    num_experts: int
    top_k: int
    intermediate_size: int = 0  # dense MLP (qwen2_moe/qwen3_moe only; unused without dense layers)
    shared_expert_intermediate_size: int = 0  # qwen2_moe only
    head_dim: int | None = None  # None: hidden_size // num_heads
    norm_topk_prob: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # family keys that change no math

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2_moe"

    @property
    def qk_norm(self) -> str:
        """"full": olmoe normalises the whole q/k projection; "per_head": qwen3_moe each head."""
        return {"olmoe": "full", "qwen3_moe": "per_head"}.get(self.family, "none")

    def with_layers(self, layers: int | None) -> Preset:
        if layers is None:
            return self
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        return replace(self, num_layers=layers)

    def hf_config(
        self, dtype: str | None = None, bos: int | None = None, eos: int | None = None, pad: int | None = None
    ) -> dict[str, Any]:
        """The config.json dict, keyed as the family's real checkpoints key it."""
        cfg: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "num_experts_per_tok": self.top_k,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype or self.dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        }
        if self.family in ("qwen2_moe", "qwen3_moe"):
            cfg.update(
                intermediate_size=self.intermediate_size,
                moe_intermediate_size=self.moe_intermediate_size,
                num_experts=self.num_experts,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=1,
                use_sliding_window=False,
            )
        else:  # mixtral and olmoe call the expert size intermediate_size
            cfg["intermediate_size"] = self.moe_intermediate_size
            cfg["num_local_experts" if self.family == "mixtral" else "num_experts"] = self.num_experts
        if self.family == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        if self.family == "qwen3_moe":
            cfg.update(head_dim=self.dim_per_head, attention_bias=False, mlp_only_layers=[])
        if self.family == "olmoe":
            cfg.update(attention_bias=False, clip_qkv=None, norm_topk_prob=self.norm_topk_prob)
        if self.head_dim is not None:
            cfg["head_dim"] = self.head_dim
        cfg.update(self.extra)
        return dict(sorted(cfg.items()))


def _tiny(family: str, **kw: Any) -> Preset:
    base = dict(family=family, vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                moe_intermediate_size=32, num_experts=16, top_k=4, dtype="float32")
    return Preset(**{**base, **kw})


# Real shapes from the published config.json files. The tiny ones keep each family's quirks
# (shared expert, GQA, q/k norms, head_dim != hidden/heads) at sizes that build in well under
# a second; num_experts is divisible by 1, 2 and 4 so every expert-block size divides it.
PRESETS: dict[str, dict[str, Preset]] = {
    "qwen2_moe": {
        "tiny": _tiny("qwen2_moe", num_layers=3, top_k=2, intermediate_size=128,
                      shared_expert_intermediate_size=128, rope_theta=1e6, max_position_embeddings=8192,
                      extra={"max_window_layers": 21, "sliding_window": 32768, "router_aux_loss_coef": 0.001}),
        "qwen1.5-moe-a2.7b": Preset(
            family="qwen2_moe", vocab_size=151936, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
            intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
            num_experts=60, top_k=4, norm_topk_prob=False, rope_theta=1e6, rms_norm_eps=1e-6,
            max_position_embeddings=8192,
            extra={"max_window_layers": 21, "sliding_window": 32768, "router_aux_loss_coef": 0.001}),
    },
    "mixtral": {
        "tiny": _tiny("mixtral", moe_intermediate_size=128, num_experts=8, top_k=2, rope_theta=1e6,
                      rms_norm_eps=1e-5, max_position_embeddings=32768,
                      extra={"sliding_window": None, "router_aux_loss_coef": 0.02}),
        "mixtral-8x7b": Preset(
            family="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
            moe_intermediate_size=14336, num_experts=8, top_k=2, rope_theta=1e6, rms_norm_eps=1e-5,
            max_position_embeddings=32768, extra={"sliding_window": None, "router_aux_loss_coef": 0.02}),
    },
    "qwen3_moe": {
        "tiny": _tiny("qwen3_moe", head_dim=32, intermediate_size=128, norm_topk_prob=True, rope_theta=1e6,
                      max_position_embeddings=40960,
                      extra={"max_window_layers": 48, "sliding_window": None, "router_aux_loss_coef": 0.001}),
        "qwen3-30b-a3b": Preset(
            family="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
            head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, top_k=8,
            norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
            extra={"max_window_layers": 48, "sliding_window": None, "router_aux_loss_coef": 0.001}),
    },
    "olmoe": {
        "tiny": _tiny("olmoe", num_kv_heads=4, rms_norm_eps=1e-5,
                      extra={"router_aux_loss_coef": 0.01}),
        "olmoe-1b-7b": Preset(
            family="olmoe", vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
            moe_intermediate_size=1024, num_experts=64, top_k=8, norm_topk_prob=False, rope_theta=10000.0,
            rms_norm_eps=1e-5, max_position_embeddings=4096, extra={"router_aux_loss_coef": 0.01}),
    },
}


def get_preset(family: str, name: str = "tiny") -> Preset:
    """The preset `name` of `family`, or a ValueError that lists what exists."""
    if family not in PRESETS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if name in PRESETS[family]:
        return PRESETS[family][name]
    owner = next((f for f, names in PRESETS.items() if name in names), None)
    where = f"it is a {owner} preset" if owner else "no such preset"
    raise ValueError(
        f"preset {name!r} does not fit family {family!r} ({where}); "
        f"{family} presets: {', '.join(PRESETS[family])}"
    )
