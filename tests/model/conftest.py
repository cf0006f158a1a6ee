"""Tiny random checkpoints saved by Hugging Face transformers itself, one per variant.

Each variant is a transformers config class plus overrides that exercise one math path
(shared expert, decoder_sparse_step + mlp_only_layers, norm_topk_prob, top-1, q/k norms,
explicit head_dim, GQA, tied embeddings) and one on-disk layout (single file, sharded,
fused expert tensors). transformers is the reference; it is a test-only dependency.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

COMMON = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15)

# name -> (config class name, overrides, save options)
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40,
             num_experts=8, num_experts_per_tok=4, norm_topk_prob=False),
        {},
    ),
    "qwen2_moe_sparse_step": (
        "Qwen2MoeConfig",
        dict(num_hidden_layers=5, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40,
             num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[3],
             tie_word_embeddings=True),
        {},
    ),
    "qwen2_moe_sharded": (
        "Qwen2MoeConfig",
        dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40,
             num_experts=8, num_experts_per_tok=4, norm_topk_prob=True),
        dict(max_shard_size="40KB"),
    ),
    "qwen2_moe_fused": (
        "Qwen2MoeConfig",
        dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40,
             num_experts=8, num_experts_per_tok=4),
        dict(save_original_format=False),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(num_hidden_layers=2, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        dict(max_shard_size="50KB"),
    ),
    "mixtral_fused": (
        "MixtralConfig",
        dict(num_hidden_layers=2, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        dict(save_original_format=False),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, head_dim=16, mlp_only_layers=[1]),
        {},
    ),
    "qwen3_moe_fused": (
        "Qwen3MoeConfig",
        dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=False, head_dim=16),
        dict(save_original_format=False),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
             clip_qkv=2.0),
        {},
    ),
    "olmoe_top1": (
        "OlmoeConfig",
        dict(num_hidden_layers=2, intermediate_size=16, num_experts=4, num_experts_per_tok=1, norm_topk_prob=False),
        {},
    ),
}


def save_hf_checkpoint(root: Path, name: str, seed: int = 0) -> Path:
    import transformers

    class_name, overrides, save_options = VARIANTS[name]
    config = getattr(transformers, class_name)(**COMMON, **overrides, eos_token_id=1, bos_token_id=0, pad_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = root / name
    model.save_pretrained(out, **save_options)
    return out


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> directory of a transformers-saved tiny checkpoint (built on first use)."""
    root = tmp_path_factory.mktemp("hf")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = save_hf_checkpoint(root, name)
        return built[name]

    return get


def load_reference(path: Path):
    import transformers

    # transformers 5 may pick fused attention / experts kernels; the eager loops are the reference.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())
