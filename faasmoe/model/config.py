"""One validated description of an MoE model, read from a Hugging Face `config.json`.

Every key that changes the math is resolved here, once, per family; the rest of the code
reads `MoEConfig` and never looks at the raw JSON again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from faasmoe.model.quant_scheme import QuantizationError, QuantScheme

SUPPORTED_FAMILIES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


class ConfigError(ValueError):
    """A config.json we cannot serve: names the file, the key and what is supported."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` / `"torch.bfloat16"` / a torch dtype -> the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


@dataclass(frozen=True)
class MoEConfig:
    """The architecture of one MoE checkpoint, normalised across families."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP layers (mlp_only_layers / decoder_sparse_step gaps)
    moe_intermediate_size: int  # one routed expert
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int  # 0 = no shared expert
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    qkv_bias: bool
    o_bias: bool
    qk_norm: str  # "none" | "per_head" (qwen3) | "full" (olmoe: over the whole projection)
    clip_qkv: float | None
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    quantization: QuantScheme | None = None  # the checkpoint's quantization_config (None: plain weights)
    source: str = field(default="", compare=False)

    def is_moe_layer(self, layer: int) -> bool:
        """The HF rule: sparse unless listed dense or skipped by decoder_sparse_step."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def expert_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of one routed expert's three matrices as a worker holds them (quantized ones: their codes
        and scales, `QuantScheme.expert_bytes`)."""
        dtype = dtype or self.dtype
        if self.quantization is not None:
            from faasmoe.model.quantized import words_held  # builds the 4-bit kernel once, on first use

            return self.quantization.expert_bytes(self.hidden_size, self.moe_intermediate_size, dtype,
                                                  words=words_held(self.quantization))
        return 3 * self.hidden_size * self.moe_intermediate_size * dtype.itemsize

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MoEConfig:
        """Read `path/config.json` (or a config.json path) and validate it."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no config.json at {file}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from exc
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> MoEConfig:
        return _Reader(raw, source).build()


class _Reader:
    """Reads one raw config dict with errors that name the file and the key."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message} (supported families: {', '.join(SUPPORTED_FAMILIES)})")

    def need(self, *keys: str) -> Any:
        """The first of `keys` present (aliases across releases), or a clear error."""
        for key in keys:
            if self.raw.get(key) is not None:
                return self.raw[key]
        raise self.fail(f"missing required key {' or '.join(repr(k) for k in keys)} for model_type {self.family!r}")

    def get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        return default if value is None else value

    @property
    def family(self) -> str:
        return str(self.raw.get("model_type", ""))

    def build(self) -> MoEConfig:
        family = self.family
        if family not in SUPPORTED_FAMILIES:
            raise self.fail(f"unsupported model_type {family!r} (key 'model_type')")
        if self.get("hidden_act", "silu") != "silu":
            raise self.fail(f"unsupported hidden_act {self.raw['hidden_act']!r} (key 'hidden_act'; only 'silu')")
        if self.get("use_sliding_window", False):
            raise self.fail("sliding-window attention is not supported (key 'use_sliding_window')")

        hidden = int(self.need("hidden_size"))
        heads = int(self.need("num_attention_heads"))
        head_dim = int(self.get("head_dim", hidden // heads))
        common = dict(
            family=family,
            vocab_size=int(self.need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(self.need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(self.get("num_key_value_heads", heads)),
            head_dim=head_dim,
            rope_theta=self._rope_theta(),
            rms_norm_eps=float(self.need("rms_norm_eps")),
            max_position_embeddings=int(self.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(self.get("tie_word_embeddings", False)),
            dtype=self._dtype(),
            bos_token_id=self.raw.get("bos_token_id"),
            eos_token_ids=self._eos_ids(),
            pad_token_id=self.raw.get("pad_token_id"),
            top_k=int(self.need("num_experts_per_tok")),
            quantization=self._quantization(),
            source=self.source,
        )
        family_keys = getattr(self, f"_{family}")()
        config = MoEConfig(**common, **family_keys)
        if config.num_heads % config.num_kv_heads:
            raise self.fail("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < config.top_k <= config.num_experts:
            raise self.fail(f"num_experts_per_tok={config.top_k} must be in 1..{config.num_experts}")
        return config

    def _qwen2_moe(self) -> dict[str, Any]:
        return dict(
            intermediate_size=int(self.need("intermediate_size")),
            moe_intermediate_size=int(self.need("moe_intermediate_size")),
            num_experts=int(self.need("num_experts", "num_local_experts")),
            norm_topk_prob=bool(self.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=int(self.need("shared_expert_intermediate_size")),
            decoder_sparse_step=int(self.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(self.get("mlp_only_layers", ())),
            qkv_bias=bool(self.get("qkv_bias", True)),  # Qwen1.5/2-MoE always had q/k/v bias
            o_bias=False,
            qk_norm="none",
            clip_qkv=None,
        )

    def _qwen3_moe(self) -> dict[str, Any]:
        bias = bool(self.get("attention_bias", False))
        return dict(
            intermediate_size=int(self.need("intermediate_size")),
            moe_intermediate_size=int(self.need("moe_intermediate_size")),
            num_experts=int(self.need("num_experts", "num_local_experts")),
            norm_topk_prob=bool(self.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=0,
            decoder_sparse_step=int(self.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(self.get("mlp_only_layers", ())),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="per_head",
            clip_qkv=None,
        )

    def _mixtral(self) -> dict[str, Any]:
        expert_size = int(self.need("intermediate_size"))
        return dict(
            intermediate_size=expert_size,
            moe_intermediate_size=expert_size,
            num_experts=int(self.need("num_local_experts", "num_experts")),
            norm_topk_prob=True,  # Mixtral always renormalises its top-k
            shared_expert_intermediate_size=0,
            decoder_sparse_step=1,
            mlp_only_layers=(),
            qkv_bias=False,
            o_bias=False,
            qk_norm="none",
            clip_qkv=None,
        )

    def _olmoe(self) -> dict[str, Any]:
        expert_size = int(self.need("intermediate_size"))
        bias = bool(self.get("attention_bias", False))
        clip = self.raw.get("clip_qkv")
        return dict(
            intermediate_size=expert_size,
            moe_intermediate_size=expert_size,
            num_experts=int(self.need("num_experts", "num_local_experts")),
            norm_topk_prob=bool(self.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=0,
            decoder_sparse_step=1,
            mlp_only_layers=(),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="full",
            clip_qkv=None if clip is None else float(clip),
        )

    def _rope_theta(self) -> float:
        params = self.raw.get("rope_parameters") or {}
        scaling = self.raw.get("rope_scaling") or {}
        for spec, key in ((params, "rope_parameters"), (scaling, "rope_scaling")):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind != "default":
                raise self.fail(f"unsupported rope_type {kind!r} (key {key!r}; only 'default')")
        if "rope_theta" in params:
            return float(params["rope_theta"])
        return float(self.get("rope_theta", 10000.0))

    def _quantization(self) -> QuantScheme | None:
        try:
            return QuantScheme.from_config(self.raw.get("quantization_config"))
        except QuantizationError as exc:
            raise self.fail(f"{exc} (key 'quantization_config')") from exc

    def _dtype(self) -> torch.dtype:
        name = self.raw.get("dtype") or self.raw.get("torch_dtype") or "float32"
        try:
            return parse_dtype(name)
        except ValueError as exc:
            raise self.fail(f"{exc} (key 'dtype' / 'torch_dtype')") from exc

    def _eos_ids(self) -> tuple[int, ...]:
        eos = self.raw.get("eos_token_id")
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (int(eos),)
