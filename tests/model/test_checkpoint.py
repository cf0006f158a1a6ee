"""Checkpoint reading: expert blocks read only their own bytes; broken inputs fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from faasmoe.model.checkpoint import CheckpointError, CheckpointReader, ExpertLayout
from faasmoe.model.config import ConfigError, MoEConfig
from faasmoe.model.moe_model import MoEModel

from ..pagecache import drop_page_cache, page_cache_bytes, readahead_bytes


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory):
    """One MoE layer of 16 experts at 1.5 MiB each, per-expert and fused layouts."""
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=256, intermediate_size=64, moe_intermediate_size=512,
        shared_expert_intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        num_experts=16, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    root = tmp_path_factory.mktemp("wide")
    model.save_pretrained(root / "per_expert")
    model.save_pretrained(root / "fused", save_original_format=False)
    return root


@pytest.mark.parametrize("layout_name", ["per_expert", "fused"])
def test_loading_a_block_reads_only_its_bytes(wide_checkpoints, layout_name):
    path = wide_checkpoints / layout_name
    shard = path / "model.safetensors"
    config = MoEConfig.from_pretrained(path)
    block_bytes = 2 * config.expert_bytes(torch.float32)  # 3 MiB out of a ~25 MiB file
    drop_page_cache(shard)
    if page_cache_bytes(shard) > 0:
        pytest.skip("this filesystem does not let us drop a file's page cache")

    layout = ExpertLayout(CheckpointReader(path), config)
    block = layout.load_block(0, first=6, count=2, dtype=torch.float32)
    assert block.nbytes == block_bytes
    read = page_cache_bytes(shard)
    assert read >= block_bytes * 0.9  # the block really came from this file
    # Beyond the block, at most what the kernel reads ahead by itself (8 MiB on some disks): a block's parts
    # are read as the kernel sees a stream. Turning readahead off (POSIX_FADV_RANDOM) would make this exact
    # but halves a cold load's read rate (1300 -> 730 MiB/s measured on an ext4 virtio disk).
    limit = block_bytes + readahead_bytes(shard) + 256 * 1024
    assert read < limit, f"read {read} bytes for a {block_bytes}-byte block"
    assert limit < shard.stat().st_size, "the file is too small for this test to tell a block from the whole file"

    # Control: the measurement sees a whole-layer load as the whole layer.
    layout.load_block(0, first=0, count=16, dtype=torch.float32)
    assert page_cache_bytes(shard) >= 16 * config.expert_bytes(torch.float32) * 0.9


def test_read_many_reads_back_to_back_tensors_at_once_and_short_reads_too(wide_checkpoints, monkeypatch):
    import os

    reader = CheckpointReader(wide_checkpoints / "per_expert")
    names = [n for n in reader.names() if ".experts." in n][::-1]  # any order: read in the file's
    alone = {n: reader.tensor(n) for n in names}
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: calls.append(len(buffers)) or real(fd, buffers, offset))
    got = reader.read_many(names)
    assert all(torch.equal(got[n], alone[n]) for n in names)
    assert len(calls) < len(names) and max(calls) > 1  # tensors back to back came in one call, 2 MiB at most
    arrived = []
    into = {names[0]: torch.empty_like(alone[names[0]])}

    def short(fd, buffers, offset):  # the kernel may return fewer bytes than asked: the rest is asked again
        return real(fd, [buffers[0][:1000]], offset)

    monkeypatch.setattr(os, "preadv", short)
    got = reader.read_many(names, into, lambda name, tensor: arrived.append(name))
    assert got[names[0]] is into[names[0]] and all(torch.equal(got[n], alone[n]) for n in names)
    assert sorted(arrived) == sorted(names)


def test_block_equals_the_checkpoint_tensors(wide_checkpoints):
    per_expert = ExpertLayout(CheckpointReader(wide_checkpoints / "per_expert"),
                              MoEConfig.from_pretrained(wide_checkpoints / "per_expert"))
    fused = ExpertLayout(CheckpointReader(wide_checkpoints / "fused"),
                         MoEConfig.from_pretrained(wide_checkpoints / "fused"))
    a = per_expert.load_block(0, 5, 3, torch.float32)
    b = fused.load_block(0, 5, 3, torch.float32)
    tensors = load_file(wide_checkpoints / "per_expert" / "model.safetensors")
    assert torch.equal(a.gate_up[1, :512], tensors["model.layers.0.mlp.experts.6.gate_proj.weight"])
    assert torch.equal(a.gate_up[1, 512:], tensors["model.layers.0.mlp.experts.6.up_proj.weight"])
    assert torch.equal(a.down[2], tensors["model.layers.0.mlp.experts.7.down_proj.weight"])
    assert torch.equal(a.gate_up, b.gate_up) and torch.equal(a.down, b.down)
    assert a.gate_up.untyped_storage().nbytes() == a.gate_up.nbytes  # owned memory, not the file map


def test_bfloat16_blocks_convert_on_load(wide_checkpoints):
    layout = ExpertLayout(CheckpointReader(wide_checkpoints / "fused"),
                          MoEConfig.from_pretrained(wide_checkpoints / "fused"))
    block = layout.load_block(0, 0, 4, torch.bfloat16)
    assert block.gate_up.dtype == torch.bfloat16
    assert block.nbytes == 4 * 3 * 256 * 512 * 2


# --- broken checkpoints -----------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_expert_tensor_is_named(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("qwen2_moe"), tmp_path / "broken")
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' not found"):
        MoEModel.from_pretrained(path)


def test_misshaped_tensor_is_named(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("qwen2_moe"), tmp_path / "broken")
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(31, 32)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[31, 32\]"):
        MoEModel.from_pretrained(path)


def test_misshaped_fused_experts_are_named(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("qwen2_moe_fused"), tmp_path / "broken")
    name = "model.layers.0.mlp.experts.down_proj"  # [E, H, I] stored as [E, I, H]
    _rewrite(path, lambda t: t.update({name: t[name].transpose(1, 2).contiguous()}))
    with pytest.raises(CheckpointError, match=r"down_proj' has shape \[8, 16, 32\], expected \[8, 32, 16\]"):
        MoEModel.from_pretrained(path)


def test_missing_shard_is_named(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("qwen2_moe_sharded"), tmp_path / "broken")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        MoEModel.from_pretrained(path)


def test_no_weights_at_all(tmp_path, hf_checkpoint):
    shutil.copy(hf_checkpoint("qwen2_moe") / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        MoEModel.from_pretrained(tmp_path)


def _config_with(tmp_path: Path, base: Path, **changes) -> Path:
    raw = json.loads((base / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_unsupported_architecture_names_file_key_and_families(hf_checkpoint, tmp_path):
    path = _config_with(tmp_path, hf_checkpoint("qwen2_moe"), model_type="llama")
    with pytest.raises(ConfigError) as err:
        MoEConfig.from_pretrained(path)
    message = str(err.value)
    assert str(path / "config.json") in message and "'model_type'" in message
    assert all(f in message for f in ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe"))


@pytest.mark.parametrize(("variant", "key"), [
    ("qwen2_moe", "moe_intermediate_size"),
    ("qwen2_moe", "shared_expert_intermediate_size"),
    ("mixtral", "num_local_experts"),
    ("olmoe", "num_experts_per_tok"),
    ("qwen3_moe", "hidden_size"),
])
def test_missing_key_names_the_key(hf_checkpoint, tmp_path, variant, key):
    path = _config_with(tmp_path, hf_checkpoint(variant), **{key: None})
    with pytest.raises(ConfigError, match=f"missing required key '{key}'"):
        MoEConfig.from_pretrained(path)


def test_config_aliases_across_releases(hf_checkpoint, tmp_path):
    base = hf_checkpoint("qwen2_moe")
    raw = json.loads((base / "config.json").read_text())
    theta = raw["rope_parameters"]["rope_theta"]
    path = _config_with(tmp_path, base, rope_parameters=None, rope_theta=theta * 2, dtype=None,
                        torch_dtype="bfloat16", num_experts=None, num_local_experts=raw["num_experts"])
    config = MoEConfig.from_pretrained(path)
    assert config.rope_theta == theta * 2
    assert config.dtype == torch.bfloat16
    assert config.num_experts == raw["num_experts"]
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        MoEConfig.from_pretrained(_config_with(tmp_path, base, rope_parameters={"rope_type": "yarn", "factor": 4.0}))


def test_truncated_shard_is_named(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("qwen2_moe"), tmp_path / "broken")
    shard = path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* inconsistent offsets"):
        MoEModel.from_pretrained(path)
    shard.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        MoEModel.from_pretrained(path)
