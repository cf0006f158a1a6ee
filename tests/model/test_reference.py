"""MoEModel against Hugging Face transformers on checkpoints transformers itself saved."""

from __future__ import annotations

import pytest
import torch

from faasmoe.engine.offline import generate
from faasmoe.model.moe_model import MoEModel

from .conftest import VARIANTS, load_reference, relative_error

TOLERANCE = 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(hf_checkpoint, variant):
    path = hf_checkpoint(variant)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_reference(path)(ids).logits
    actual = MoEModel.from_pretrained(path)(ids)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < TOLERANCE


def test_variants_cover_the_layouts(hf_checkpoint):
    # The fixtures must really exercise what they claim, or the test above proves less.
    assert len(list(hf_checkpoint("qwen2_moe_sharded").glob("model-*.safetensors"))) > 1
    assert len(list(hf_checkpoint("mixtral").glob("model-*.safetensors"))) > 1
    from safetensors import safe_open

    with safe_open(hf_checkpoint("qwen2_moe_fused") / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    with safe_open(hf_checkpoint("mixtral_fused") / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.down_proj" in f.keys()
    model = MoEModel.from_pretrained(hf_checkpoint("qwen2_moe_sparse_step"))
    assert model.config.moe_layers == [1]
    assert model.trunk.lm_head is model.trunk.embed


@pytest.mark.parametrize("variant", ["qwen2_moe", "mixtral", "olmoe_top1"])
def test_greedy_tokens_match_transformers(hf_checkpoint, variant):
    path = hf_checkpoint(variant)
    prompt = [5, 17, 42, 8, 61]
    reference = load_reference(path)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = out[0, len(prompt):].tolist()
    result = generate(MoEModel.from_pretrained(path), [prompt], max_tokens=12, ignore_eos=True)[0]
    assert result.token_ids == expected


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("options", [{}, {"expert_format": "fused", "router_skew": 1.0}])
def test_model_init_output_matches_transformers(tmp_path, family, options):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    path = init_checkpoint(tmp_path / family, family, preset="tiny", seed=3, progress=False, **options)
    model = MoEModel.from_pretrained(path)
    ids = torch.tensor([model.tokenizer.encode("Mixture of experts, served as functions.")])
    with torch.no_grad():
        expected = load_reference(path)(ids).logits
    assert relative_error(model(ids), expected) < TOLERANCE
