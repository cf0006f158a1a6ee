"""The worker's memory tiers in process: budget, LRU, host tier, keep-alive and pre-warm."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from faasmoe.engine.functions import block_content_at
from faasmoe.model.config import MoEConfig
from runtime.policies import HybridHistogramKeepAlive, make_eviction, make_keep_alive
from runtime.protocol import FunctionSpec
from worker.memory import ExpertStore, HostCache, NoMemory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("mem") / "tiny", "qwen2_moe", seed=2, progress=False)


def spec(model_dir, block: int, layer: int = 0) -> FunctionSpec:
    return FunctionSpec(f"t/{layer}/{block}", str(model_dir), layer, block * 4, 4,
                        content=block_content_at(model_dir, layer, block * 4, 4, "float32"))


def store(model_dir, blocks: int, keep_alive=None) -> ExpertStore:
    nbytes = 4 * MoEConfig.from_pretrained(model_dir).expert_bytes(torch.float32)
    policy = keep_alive or make_keep_alive("fixed", ttl_s=60)
    return ExpertStore(torch.device("cpu"), blocks * nbytes, HostCache(16 * nbytes, pin=False), make_eviction("lru"),
                       lambda s: policy)


async def test_budget_is_never_exceeded_and_busy_blocks_stay(model_dir):
    s = store(model_dir, blocks=2)
    a, _ = await s.acquire(spec(model_dir, 0))
    b, _ = await s.acquire(spec(model_dir, 1))
    with pytest.raises(NoMemory, match="busy"):  # both in flight: nothing may be evicted
        await s.acquire(spec(model_dir, 2))
    s.release(a)
    c, cold = await s.acquire(spec(model_dir, 2))
    assert cold and set(s.resident) == {"t/0/1", "t/0/2"} and s.used_bytes <= s.budget_bytes
    s.release(b)
    s.release(c)
    big = FunctionSpec("t/0/all", str(model_dir), 0, 0, 16, content=block_content_at(model_dir, 0, 0, 16, "float32"))
    with pytest.raises(NoMemory, match="budget"):
        await s.acquire(big)


async def test_concurrent_cold_calls_share_one_load(model_dir):
    s = store(model_dir, blocks=4)
    results = await asyncio.gather(*(s.acquire(spec(model_dir, 3)) for _ in range(5)))
    assert sum(cold for _, cold in results) == 1 and s.stats.cold_starts["disk"] == 1
    assert results[0][0].in_flight == 5


async def test_adaptive_keep_alive_unloads_between_calls_and_prewarms(model_dir):
    policy = HybridHistogramKeepAlive(ttl_s=30.0, bin_s=0.05, num_bins=40, min_samples=4, burst_gap_s=0.02,
                                      min_unload_s=0.1, cv_threshold=1.0)
    s = store(model_dir, blocks=4, keep_alive=policy)
    fn = spec(model_dir, 0)
    for i in range(8):  # a call every 0.6 s: the policy learns the period
        if i:
            await asyncio.sleep(0.6)
        r, _ = await s.acquire(fn)
        s.release(r)
    assert policy.prewarm_at(r.key, r.last_used) is not None
    deadline = time.monotonic() + 1.0
    while fn.function_id in s.resident and time.monotonic() < deadline:  # unloaded between calls
        s.expire(time.monotonic(), host_ttl_s=600)
        await asyncio.sleep(0.02)
    assert fn.function_id not in s.resident
    deadline = time.monotonic() + 1.5
    while fn.function_id not in s.resident:  # and back before the predicted call
        assert time.monotonic() < deadline, "never pre-warmed"
        for due, last in s.due_prewarms(time.monotonic()):
            await s.prewarm(due, last)
        await asyncio.sleep(0.02)
    assert s.resident[fn.function_id].source == "host"


async def test_evicted_blocks_leave_every_tier_without_a_host_cache(model_dir):
    nbytes = 4 * MoEConfig.from_pretrained(model_dir).expert_bytes(torch.float32)
    policy = make_keep_alive("fixed", ttl_s=0.0)
    s = ExpertStore(torch.device("cpu"), 2 * nbytes, HostCache(0, pin=False), make_eviction("lru"), lambda _: policy)
    r, _ = await s.acquire(spec(model_dir, 0))
    s.release(r)
    assert s.expire(time.monotonic() + 1, host_ttl_s=600) == ["t/0/0"]
    assert s.used_bytes == 0 and s.host.nbytes == 0 and s.host.held() == []
    with_host = store(model_dir, blocks=2)  # a host tier: the block and its bytes are listed there
    r, _ = await with_host.acquire(spec(model_dir, 1))
    with_host.release(r)
    assert with_host.evict("t/0/1", "test")
    assert with_host.host.held() == [("t/0/1", spec(model_dir, 1), nbytes)]


def test_cpu_workers_have_no_host_cache_by_default():
    from faasmoe.model.host_memory import return_free_memory
    from runtime.budgets import host_cache_budget

    assert host_cache_budget(torch.device("cpu")) == 0
    assert host_cache_budget(torch.device("cuda", 0), sharers=2) > 0  # pinned host RAM for GPU workers
    import platform

    assert return_free_memory() or platform.libc_ver()[0] != "glibc"  # malloc_trim is found where glibc is
