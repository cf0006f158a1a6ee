"""A worker serves only the bytes a function's id names: every block is hashed on its first read, a
reload from the same unchanged file is proven by that hash, and a file written to since (even with
its mtime put back) is hashed again and refused when it no longer holds those bytes."""

from __future__ import annotations

import os

import pytest
import torch

from faasmoe.engine.functions import block_content_at
from faasmoe.model.checkpoint import CheckpointReader
from faasmoe.model.config import MoEConfig
from faasmoe.model.content import ContentMismatch
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from runtime.policies import make_eviction, make_keep_alive
from runtime.protocol import FunctionSpec
from worker.memory import ExpertStore, HostCache

from ..checkpoint_edits import overwrite_middle


def store() -> ExpertStore:
    keep = make_keep_alive("fixed", ttl_s=60)
    return ExpertStore(torch.device("cpu"), 1 << 30, HostCache(0, pin=False), make_eviction("lru"), lambda s: keep)


async def test_a_reload_is_proven_by_the_first_hash_until_the_file_is_written_even_with_its_mtime_put_back(tmp_path):
    path = init_checkpoint(tmp_path / "m", "qwen2_moe", seed=6, progress=False)
    layer = MoEConfig.from_pretrained(path).moe_layers[0]
    fn = FunctionSpec("f", str(path), layer, 0, 4, content=block_content_at(path, layer, 0, 4, "float32"))
    s = store()
    for reload in range(2):
        resident, cold = await s.acquire(fn)
        assert cold and s.proven.reused == reload  # the first read hashed, the reload did not need to
        s.release(resident)
        assert s.evict(fn.function_id, "test")
    name = f"model.layers.{layer}.mlp.experts.1.down_proj.weight"
    file = CheckpointReader(path).entry(name).file
    before = os.stat(file)
    overwrite_middle(path, name)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))  # the write hidden from mtime; ctime moved
    assert os.stat(file).st_mtime_ns == before.st_mtime_ns and os.stat(file).st_size == before.st_size
    with pytest.raises(ContentMismatch, match=f"experts 0..3 of layer {layer} .* hash to .* not"):
        await s.acquire(fn)
    assert fn.function_id not in s.resident


async def test_a_spec_without_a_content_digest_is_refused(tmp_path):
    path = init_checkpoint(tmp_path / "m", "qwen2_moe", seed=6, progress=False)
    with pytest.raises(ContentMismatch, match="names no content digest"):
        await store().acquire(FunctionSpec("f", str(path), 0, 0, 4))


async def test_a_proof_covers_the_place_it_was_read_from_not_every_place_claiming_that_content(tmp_path):
    path = init_checkpoint(tmp_path / "m", "qwen2_moe", seed=6, progress=False)
    layer = MoEConfig.from_pretrained(path).moe_layers[0]
    content = block_content_at(path, layer, 0, 4, "float32")
    s = store()
    resident, _ = await s.acquire(FunctionSpec("f", str(path), layer, 0, 4, content=content))
    s.release(resident)
    liar = FunctionSpec("g", str(path), layer, 4, 4, content=content)  # other experts, the same claimed bytes
    with pytest.raises(ContentMismatch, match="experts 4..7"):
        await s.acquire(liar)
