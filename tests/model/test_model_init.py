"""`faasmoe model init`: random checkpoints in the real HF format, checked against transformers."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint, tensor_specs, zipf_offsets
from faasmoe.model.synthetic.presets import FAMILIES, PRESETS, get_preset
from runtime.sizes import parse_size, parse_size_or_zero

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny per-expert checkpoint per family, seed 0."""
    root = tmp_path_factory.mktemp("model_init")
    return {f: init_checkpoint(root / f, f, seed=0, progress=False) for f in FAMILIES}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("model*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _logits(path: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits.float()


def _sha(path: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(path.glob("model*.safetensors")))).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_loads_in_transformers_with_finite_logits(tiny: dict[str, Path], family: str) -> None:
    path = tiny[family]
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    assert model.config.model_type == family
    logits = _logits(path)
    assert logits.shape == (2, 12, PRESETS[family]["tiny"].vocab_size)
    assert torch.isfinite(logits).all() and 0.01 < logits.std() < 10

    config = json.loads((path / "config.json").read_text())
    ids = transformers.AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert config["eos_token_id"] == ids[1] and config["pad_token_id"] == ids[0]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [ids[1], ids[0]]
    assert config["torch_dtype"] == "float32" and "rope_theta" in config
    experts_key = "num_local_experts" if family == "mixtral" else "num_experts"
    assert config[experts_key] == PRESETS[family]["tiny"].num_experts


@pytest.mark.parametrize("expert_format", ["per_expert", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_names_and_shapes_match_what_transformers_saves(
    tiny: dict[str, Path], tmp_path: Path, family: str, expert_format: str
) -> None:
    path = tiny[family] if expert_format == "per_expert" else init_checkpoint(
        tmp_path / "fused", family, expert_format="fused", progress=False)
    ours = {k: tuple(t.shape) for k, t in _tensors(path).items()}
    # transformers' own save: original (per-expert) names, or its fused v5 layout.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model.save_pretrained(tmp_path / "hf", save_original_format=expert_format == "per_expert")
    assert ours == {k: tuple(t.shape) for k, t in _tensors(tmp_path / "hf").items()}


def test_family_specific_tensor_names(tiny: dict[str, Path]) -> None:
    p = PRESETS["qwen2_moe"]["tiny"]
    names = set(_tensors(tiny["qwen2_moe"]))
    assert {"model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.shared_expert.up_proj.weight",
            "model.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.self_attn.q_proj.bias"} <= names
    assert f"model.layers.{p.num_layers - 1}.mlp.experts.{p.num_experts - 1}.down_proj.weight" in names
    mixtral = set(_tensors(tiny["mixtral"]))
    assert {"model.layers.1.block_sparse_moe.gate.weight",
            *(f"model.layers.1.block_sparse_moe.experts.7.{w}.weight" for w in ("w1", "w2", "w3"))} <= mixtral
    olmoe, qwen3 = _tensors(tiny["olmoe"]), _tensors(tiny["qwen3_moe"])
    assert olmoe["model.layers.0.self_attn.q_norm.weight"].shape == (64,)  # the whole projection
    assert qwen3["model.layers.0.self_attn.q_norm.weight"].shape == (32,)  # one head
    assert not any("bias" in k for k in (*mixtral, *olmoe, *qwen3))


def test_weights_are_initialised_like_hf(tiny: dict[str, Path]) -> None:
    t = _tensors(tiny["qwen2_moe"])
    assert abs(t["model.embed_tokens.weight"].std().item() - 0.02) < 0.002
    assert abs(t["model.layers.0.mlp.experts.3.up_proj.weight"].std().item() - 0.02) < 0.003
    assert torch.equal(t["model.norm.weight"], torch.ones(64))
    assert torch.equal(t["model.layers.0.self_attn.k_proj.bias"], torch.zeros(32))


def test_sharded_index_is_complete_and_loads_to_the_same_logits(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = init_checkpoint(tmp_path / "sharded", "qwen2_moe", max_shard_bytes=300_000, progress=False)
    shards = sorted(path.glob("model*.safetensors"))
    assert len(shards) >= 4 and not (path / "model.safetensors").exists()
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    held = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            held.update({k: shard.name for k in f.keys()})
    assert index["weight_map"] == held
    assert set(held) == set(_tensors(tiny["qwen2_moe"]))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(path).values())
    assert all(s.stat().st_size < 300_000 + 4096 for s in shards)
    torch.testing.assert_close(_logits(path), _logits(tiny["qwen2_moe"]), rtol=0, atol=0)
    # Rewriting the same directory unsharded leaves no stale shards or index behind.
    init_checkpoint(path, "qwen2_moe", progress=False)
    assert [f.name for f in path.glob("model*")] == ["model.safetensors"]


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_fused_format_loads_to_the_same_logits(tiny: dict[str, Path], tmp_path: Path, family: str) -> None:
    fused = init_checkpoint(tmp_path / "fused", family, expert_format="fused", progress=False)
    torch.testing.assert_close(_logits(fused), _logits(tiny[family]), rtol=1e-5, atol=1e-6)


def test_deterministic_and_seeded(tiny: dict[str, Path], tmp_path: Path) -> None:
    again = init_checkpoint(tmp_path / "again", "olmoe", seed=0, progress=False)
    assert _sha(again) == _sha(tiny["olmoe"])
    assert _sha(init_checkpoint(tmp_path / "other", "olmoe", seed=1, progress=False)) != _sha(tiny["olmoe"])
    # A tensor's values depend on its name and the seed only: fewer layers keep the same layer 0.
    one = _tensors(init_checkpoint(tmp_path / "one", "olmoe", layers=1, progress=False))
    full = _tensors(tiny["olmoe"])
    assert json.loads((tmp_path / "one" / "config.json").read_text())["num_hidden_layers"] == 1
    assert all(torch.equal(t, full[k]) for k, t in one.items()) and len(one) < len(full)


def test_bfloat16_checkpoint(tmp_path: Path) -> None:
    path = init_checkpoint(tmp_path / "bf16", "qwen3_moe", dtype="bfloat16", progress=False)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _tensors(path).values())
    assert torch.isfinite(_logits(path, torch.bfloat16)).all()


def _router_load(path: Path) -> tuple[list[float], float]:
    """Per layer, the busiest expert's load over the mean load on random tokens; the mean fitted Zipf exponent."""
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, model.config.vocab_size - 3, (32, 64), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    ratios, slopes = [], []
    for logits in router_logits:
        counts = torch.bincount(logits.topk(model.config.num_experts_per_tok).indices.flatten(),
                                minlength=logits.shape[-1]).double()
        share = (counts / counts.sum()).sort(descending=True).values
        ratios.append(share[0].item() * len(share))
        x = torch.arange(1, len(share) + 1, dtype=torch.double).log()[share > 0]
        y = share[share > 0].log()
        slopes.append((-((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item())
    return ratios, sum(slopes) / len(slopes)


def test_router_skew_makes_expert_load_zipf_like(tiny: dict[str, Path], tmp_path: Path) -> None:
    flat, _ = _router_load(tiny["qwen2_moe"])
    one, slope_one = _router_load(init_checkpoint(tmp_path / "s1", "qwen2_moe", router_skew=1.0, progress=False))
    steep, _ = _router_load(init_checkpoint(tmp_path / "s15", "qwen2_moe", router_skew=1.5, progress=False))
    assert max(flat) < 2.0  # random routers: about uniform
    assert min(one) > 3.5 and 0.8 < slope_one < 1.2  # Zipf(1) over 16 experts: busiest = 4.7x mean
    assert min(steep) > 6.0 and min(steep) > 3 * max(flat)


def test_zipf_offsets_are_ordered_and_flat_at_zero() -> None:
    offsets = zipf_offsets(16, 2, 1.0)
    assert (offsets[:-1] >= offsets[1:]).all()
    assert zipf_offsets(16, 2, 0.0).abs().max() < 0.1


# Published dimensions; checked without writing any weights.
REAL = {
    ("qwen2_moe", "qwen1.5-moe-a2.7b"): dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                             moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                             num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                                             num_experts_per_tok=4, num_hidden_layers=24, norm_topk_prob=False,
                                             rope_theta=1e6, max_position_embeddings=8192, rms_norm_eps=1e-6),
    ("mixtral", "mixtral-8x7b"): dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                      num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                      num_experts_per_tok=2, num_hidden_layers=32, rope_theta=1e6,
                                      max_position_embeddings=32768, rms_norm_eps=1e-5),
    ("qwen3_moe", "qwen3-30b-a3b"): dict(vocab_size=151936, hidden_size=2048, moe_intermediate_size=768,
                                         num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                         num_experts=128, num_experts_per_tok=8, num_hidden_layers=48,
                                         norm_topk_prob=True, rope_theta=1e6, max_position_embeddings=40960),
    ("olmoe", "olmoe-1b-7b"): dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                                   num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                                   num_experts_per_tok=8, num_hidden_layers=16, norm_topk_prob=False,
                                   rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5),
}
TOTAL_PARAMS_B = {"qwen1.5-moe-a2.7b": 14.3, "mixtral-8x7b": 46.7, "qwen3-30b-a3b": 30.5, "olmoe-1b-7b": 6.9}


@pytest.mark.parametrize(("family", "name"), list(REAL))
def test_real_presets_have_the_published_dimensions(tmp_path: Path, family: str, name: str) -> None:
    preset = get_preset(family, name)
    config = preset.hf_config()
    assert {k: config[k] for k in REAL[family, name]} == REAL[family, name]
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    params = sum(math.prod(s.shape) for s in tensor_specs(preset))
    assert abs(params / 1e9 - TOTAL_PARAMS_B[name]) < 0.1
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.model_type == family and loaded.num_hidden_layers == preset.num_layers
    assert get_preset(family, name).with_layers(2).hf_config()["num_hidden_layers"] == 2


def test_wrong_preset_for_family_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen2_moe preset"):
        init_checkpoint(tmp_path / "x", "mixtral", preset="qwen1.5-moe-a2.7b")
    with pytest.raises(ValueError, match="no such preset"):
        init_checkpoint(tmp_path / "x", "olmoe", preset="huge")
    assert not (tmp_path / "x").exists()


def test_parse_size() -> None:
    assert parse_size("2GiB") == 2 * 1024**3 and parse_size("500MB") == 500 * 10**6 and parse_size("4096") == 4096
    assert parse_size_or_zero("0") == 0 and parse_size_or_zero("1KiB") == 1024
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("lots")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faasmoe.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_model_init(tmp_path: Path) -> None:
    done = _cli("model", "init", str(tmp_path / "m"), "--family", "mixtral", "--seed", "3", "--router-skew", "1",
                "--max-shard-size", "200KB")
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "m") in done.stdout and "MiB" in done.stdout
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "mixtral"

    bad = _cli("model", "init", str(tmp_path / "bad"), "--family", "mixtral", "--preset", "qwen3-30b-a3b")
    assert bad.returncode != 0 and "qwen3_moe preset" in bad.stderr and "Traceback" not in bad.stderr
    unknown = _cli("model", "init", str(tmp_path / "bad"), "--family", "gpt2")
    assert unknown.returncode != 0 and "invalid choice" in unknown.stderr
