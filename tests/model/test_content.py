"""Content digests: every byte of a block names it, in either on-disk layout; loads prove them; files are
hashed once and cached by their identity; trunks share identical tensors and refuse changed ones."""

from __future__ import annotations

import pytest
import torch

from faasmoe.engine.functions import block_content
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig
from faasmoe.model.content import CheckpointDigests, ContentMismatch, DigestCache
from faasmoe.model.moe_model import MoEModel
from faasmoe.model.shared_tensors import SharedTensors
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.model.trunk import Trunk

from ..checkpoint_edits import copy_checkpoint, overwrite_middle, retrain_tensor


def digests_of(path, cache: DigestCache) -> tuple[ExpertLayout, CheckpointDigests]:
    reader = CheckpointReader(path)
    return ExpertLayout(reader, MoEConfig.from_pretrained(path)), CheckpointDigests.of(reader, cache)


def all_blocks(path, cache: DigestCache, block: int = 1, dtype=torch.float32) -> dict[tuple[int, int], str]:
    layout, digests = digests_of(path, cache)
    cfg = layout.config
    return {(layer, first): block_content(layout, digests, layer, first, block, dtype)
            for layer in cfg.moe_layers for first in range(0, cfg.num_experts, block)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("content") / "base", "qwen2_moe", seed=3, progress=False)


def test_a_block_is_named_by_its_bytes_in_either_layout_and_by_its_served_dtype(tmp_path, base) -> None:
    fused = init_checkpoint(tmp_path / "fused", "qwen2_moe", seed=3, progress=False, expert_format="fused")
    other = init_checkpoint(tmp_path / "other", "qwen2_moe", seed=4, progress=False)
    cache = DigestCache(tmp_path / "cache")
    ids = all_blocks(base, cache)
    assert ids == all_blocks(fused, cache)  # per-expert or fused tensors: the same bytes, the same functions
    assert len(set(ids.values())) == len(ids)  # random experts all differ
    assert not set(ids.values()) & set(all_blocks(other, cache).values())
    assert not set(ids.values()) & set(all_blocks(base, cache, dtype=torch.bfloat16).values())  # served otherwise
    assert set(all_blocks(base, cache, block=4).values()).isdisjoint(ids.values())


def test_a_change_in_the_middle_of_an_expert_renames_its_block_only_and_its_load_is_refused(tmp_path, base) -> None:
    tuned = copy_checkpoint(base, tmp_path / "tuned")
    cache = DigestCache(tmp_path / "cache")
    before = all_blocks(tuned, cache, block=2)
    layer = MoEConfig.from_pretrained(base).moe_layers[1]
    name = f"model.layers.{layer}.mlp.experts.5.down_proj.weight"
    overwrite_middle(tuned, name)
    after = all_blocks(tuned, cache, block=2)  # the file's identity changed: hashed anew
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {(layer, 4)}, changed
    assert all_blocks(base, cache, block=2) == before  # the base is untouched
    layout, _ = digests_of(tuned, cache)
    with pytest.raises(ContentMismatch, match="experts 4..5 of layer .* hash to .* not"):
        layout.load_block(layer, 4, 2, torch.float32, expect=before[(layer, 4)])
    weights = layout.load_block(layer, 4, 2, torch.float32, expect=after[(layer, 4)])  # what it holds now
    assert weights.nbytes == 2 * layout.config.expert_bytes(torch.float32)


def test_files_are_hashed_once_and_the_cache_follows_the_file(tmp_path, base) -> None:
    copy = copy_checkpoint(base, tmp_path / "copy")
    first = DigestCache(tmp_path / "cache")
    ids = all_blocks(copy, first)
    size = sum(f.stat().st_size for f in copy.glob("*.safetensors"))
    assert first.hashed_bytes == size
    all_blocks(copy, first)
    assert first.hashed_bytes == size  # in memory
    restarted = DigestCache(tmp_path / "cache")
    assert all_blocks(copy, restarted) == ids and restarted.hashed_bytes == 0  # on disk
    layer = MoEConfig.from_pretrained(copy).moe_layers[0]
    retrain_tensor(copy, f"model.layers.{layer}.mlp.experts.0.gate_proj.weight", seed=9)
    again = DigestCache(tmp_path / "cache")
    changed = all_blocks(copy, again)
    assert again.hashed_bytes == sum(f.stat().st_size for f in copy.glob("*.safetensors"))  # another file: read again
    assert {k for k in ids if ids[k] != changed[k]} == {(layer, 0)}


def test_trunks_share_identical_tensors_and_refuse_a_changed_one(tmp_path, base) -> None:
    tuned = copy_checkpoint(base, tmp_path / "tuned")
    layer = MoEConfig.from_pretrained(base).moe_layers[0]
    retrain_tensor(tuned, f"model.layers.{layer}.mlp.experts.2.up_proj.weight", seed=1)  # an expert: not the trunk's
    retrain_tensor(tuned, "model.layers.0.post_attention_layernorm.weight", seed=2)
    cache, shared = DigestCache(tmp_path / "cache"), SharedTensors()
    config = MoEConfig.from_pretrained(base)

    def trunk(path):
        reader = CheckpointReader(path)
        return Trunk(config, reader, torch.float32, torch.device("cpu"), CheckpointDigests.of(reader, cache), shared)

    a, b = trunk(base), trunk(tuned)
    assert a.embed is b.embed and a.layers[1].qkv is b.layers[1].qkv and a.layers[0].qkv is b.layers[0].qkv
    assert a.layers[0].post_attention_norm is not b.layers[0].post_attention_norm
    assert torch.equal(a.layers[0].input_norm, b.layers[0].input_norm)
    assert len({id(t) for t in a.tensors() + b.tensors()}) == len(a.tensors()) + 1  # one tensor of its own
    reference = MoEModel.from_pretrained(tuned, dtype=torch.float32)
    assert torch.equal(reference.trunk.layers[0].post_attention_norm, b.layers[0].post_attention_norm)

    digests = CheckpointDigests.of(CheckpointReader(tuned), cache)
    overwrite_middle(tuned, "model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(ContentMismatch, match="o_proj.weight.* hashes to"):
        Trunk(config, CheckpointReader(tuned), torch.float32, torch.device("cpu"), digests, SharedTensors())
