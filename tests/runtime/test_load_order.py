"""A worker's loads in the order the forward pass needs them: a call's loads before prefetches, earlier
layers first, a prefetch a call now waits for moved up; and a prefetch never evicts a block."""

from __future__ import annotations

import asyncio

import pytest
import torch

from faasmoe.engine.functions import block_content_at
from faasmoe.model.config import MoEConfig
from runtime.policies import make_eviction, make_keep_alive
from runtime.protocol import FunctionSpec
from worker.memory import ExpertStore, HostCache, LoadSlots, NoMemory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("order") / "tiny", "qwen2_moe", seed=2, layers=3, progress=False)


def spec(model_dir, layer: int, block: int) -> FunctionSpec:
    return FunctionSpec(f"t/{layer}/{block}", str(model_dir), layer, block * 4, 4,
                        content=block_content_at(model_dir, layer, block * 4, 4, "float32"))


async def test_waiting_loads_start_by_priority_and_a_promoted_one_goes_first():
    slots = LoadSlots(1)
    started: list[str] = []

    async def load(key: str, priority: tuple[int, int]) -> None:
        slot = await slots.take(key, priority)
        started.append(key)
        await asyncio.sleep(0)
        slot.release()
        slot.release()  # once only

    running = await slots.take("running", (0, 0))  # the one slot is busy: everyone below waits
    tasks = [asyncio.create_task(load(key, priority)) for key, priority in
             [("ahead-2", (1, 2)), ("ahead-1", (1, 1)), ("ahead-3", (1, 3)), ("call-2", (0, 2))]]
    await asyncio.sleep(0)
    slots.promote("ahead-3", (0, 1))  # a call now waits for what was a prefetch of layer 3
    running.release()
    await asyncio.gather(*tasks)
    assert started == ["ahead-3", "call-2", "ahead-1", "ahead-2"]
    assert slots.free == 1


async def test_a_cancelled_waiter_passes_its_slot_on():
    slots = LoadSlots(1)
    first = await slots.take("a", (0, 0))
    waiter = asyncio.create_task(slots.take("b", (0, 0)))
    other = asyncio.create_task(slots.take("c", (1, 0)))
    await asyncio.sleep(0)
    first.release()  # b is handed the slot ...
    waiter.cancel()  # ... but is cancelled before it runs: c gets it
    await asyncio.wait_for(other, 1)
    assert slots.free == 0


async def test_loads_ahead_of_their_calls_leave_a_slot_to_calls():
    slots = LoadSlots(3)  # one of them reserved for calls
    ahead = [asyncio.create_task(slots.take(f"ahead-{i}", (1, 1))) for i in range(3)]
    await asyncio.sleep(0)
    assert [t.done() for t in ahead] == [True, True, False] and slots.free == 1
    call = await asyncio.wait_for(slots.take("call", (0, 2)), 1)  # starts at once
    assert slots.free == 0
    call.release()
    await asyncio.sleep(0)
    assert not ahead[2].done()  # the freed slot is the calls' again
    (await ahead[0]).release()
    await asyncio.wait_for(ahead[2], 1)


async def test_a_load_ahead_of_its_call_takes_only_free_memory(model_dir):
    nbytes = 4 * MoEConfig.from_pretrained(model_dir).expert_bytes(torch.float32)
    keep = make_keep_alive("fixed", ttl_s=60)
    store = ExpertStore(torch.device("cpu"), 2 * nbytes, HostCache(0, pin=False), make_eviction("lru"), lambda s: keep)
    for block in (0, 1):
        resident, _ = await store.acquire(spec(model_dir, 0, block))
        store.release(resident)
    with pytest.raises(NoMemory, match="evicts nothing"):
        await store.acquire(spec(model_dir, 1, 0), ahead=True)
    assert set(store.resident) == {"t/0/0", "t/0/1"}
    resident, cold = await store.acquire(spec(model_dir, 1, 0))  # a call's load evicts as before
    assert cold and len(store.resident) == 2 and "t/1/0" in store.resident


async def test_a_call_is_not_kept_waiting_behind_prefetched_later_layers(model_dir):
    keep = make_keep_alive("fixed", ttl_s=60)
    loaded: list[str] = []
    store = ExpertStore(torch.device("cpu"), 1 << 30, HostCache(0, pin=False), make_eviction("lru"), lambda s: keep,
                        max_parallel_loads=1,
                        on_change=lambda new, gone, why: loaded.extend(r.spec.function_id for r in new))
    ahead = [asyncio.create_task(store.acquire(spec(model_dir, layer, block), ahead=True))
             for layer in (2, 1) for block in range(4)]
    await asyncio.sleep(0)
    call = await store.acquire(spec(model_dir, 0, 3))  # layer 0's call arrives after the prefetches
    await asyncio.gather(*ahead)
    assert call[1]
    # Only the load already running went before the call's; then the prefetches, the earlier layer first.
    assert loaded == ["t/2/0", "t/0/3", *(f"t/1/{b}" for b in range(4)), *(f"t/2/{b}" for b in range(1, 4))]


async def test_a_block_is_usable_at_once_and_packed_when_the_worker_is_quiet(tmp_path, monkeypatch):
    import worker.memory as memory
    from faasmoe.model.experts import PackedExpertWeights, pack_experts
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    path = init_checkpoint(tmp_path / "bf16", "qwen2_moe", seed=3, dtype="bfloat16", progress=False)
    monkeypatch.setattr(memory, "PACK_IDLE_S", 0.2)
    keep = make_keep_alive("fixed", ttl_s=60)
    store = ExpertStore(torch.device("cpu"), 1 << 30, HostCache(0, pin=False), make_eviction("lru"), lambda s: keep)
    fn = FunctionSpec("b/0/0", str(path), 0, 0, 4, "bfloat16", content=block_content_at(path, 0, 0, 4, "bfloat16"))
    resident, _ = await store.acquire(fn)
    plain = resident.block
    assert not isinstance(plain.weights, PackedExpertWeights)  # the call did not wait for packing
    x, experts = torch.randn(5, plain.hidden_size, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 3, 1])
    before = plain.forward(x, experts)
    store.release(resident)
    async with asyncio.timeout(10):
        while store.unpacked:
            await asyncio.sleep(0.05)
    packable = pack_experts(plain.weights) is not plain.weights  # a CPU with native bf16 and oneDNN
    assert isinstance(store.resident["b/0/0"].block.weights, PackedExpertWeights) == packable
    torch.testing.assert_close(store.resident["b/0/0"].block.forward(x, experts), before)
