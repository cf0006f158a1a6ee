"""Function ids name the weights: two frontends share identical functions, never different ones.

Real scheduler and worker processes; two frontends (RuntimeClients with their executors) serve
checkpoints that share a directory name but not their weights, or the same weights in another
block size. Every answer must be its own checkpoint's, as the in-process experts compute it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil

import torch

from faasmoe.engine.executors import RemoteExpertExecutor
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig
from faasmoe.model.experts import LocalExpertExecutor, Routing
from faasmoe.model.moe_model import load_expert_blocks
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

from .test_cluster import connect, counters, join_worker, start_scheduler


def remote(client, path, block_size: int) -> RemoteExpertExecutor:
    config = MoEConfig.from_pretrained(path)
    return RemoteExpertExecutor(client, path.name, path, config, block_size, torch.float32, 60.0)


def in_process(path, block_size: int) -> LocalExpertExecutor:
    config = MoEConfig.from_pretrained(path)
    blocks = load_expert_blocks(ExpertLayout(CheckpointReader(path), config), block_size, torch.float32,
                                torch.device("cpu"))
    return LocalExpertExecutor(blocks, block_size)


@contextlib.asynccontextmanager
async def one_worker_cluster():
    """A real scheduler, one joined worker and a client connected to both; all stopped after."""
    sched, address = start_scheduler()
    worker = join_worker(address, "w0", "256MiB")
    client = None
    try:
        client = await connect(address, 1)
        yield client
    finally:
        if client is not None:
            await client.close()
        worker.stop()
        sched.stop()


def layer_input(config: MoEConfig, tokens: int = 12) -> tuple[torch.Tensor, Routing]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, config.hidden_size, generator=g)
    experts = torch.stack([torch.randperm(config.num_experts, generator=g)[: config.top_k] for _ in range(tokens)])
    return x, Routing(experts, torch.full((tokens, config.top_k), 1.0 / config.top_k))


async def test_same_name_other_weights_never_share_a_function(tmp_path):
    seed0 = init_checkpoint(tmp_path / "a" / "tiny", "qwen2_moe", seed=0, progress=False)
    seed1 = init_checkpoint(tmp_path / "b" / "tiny", "qwen2_moe", seed=1, progress=False)
    copy0 = tmp_path / "c" / "tiny"
    shutil.copytree(seed0, copy0)  # the same weights at another path: the same functions
    sched, address = start_scheduler()
    worker = join_worker(address, "w0", "256MiB")
    frontends = []
    try:
        for _ in range(4):
            frontends.append(await connect(address, 1))
        config = MoEConfig.from_pretrained(seed0)
        layer = config.moe_layers[0]
        x, routing = layer_input(config)
        cases = [(frontends[0], seed0, 4), (frontends[1], seed1, 4), (frontends[2], seed0, 8), (frontends[3], copy0, 4)]
        executors = [remote(client, path, block) for client, path, block in cases]
        ids = [{f.function_id for f in e.functions} for e in executors]
        assert not ids[0] & ids[1] and not ids[0] & ids[2] and ids[0] == ids[3]
        for executor, (_, path, block) in zip(executors[:3], cases[:3]):
            got = await executor.run_layer(layer, x, routing)
            assert torch.allclose(got, in_process(path, block).run_layer(layer, x, routing), atol=1e-6), path
        cold = sum(c.get("cold_starts_disk", 0) + c.get("cold_starts_host", 0)
                   for c in (await counters(frontends[0])).values())
        got = await executors[3].run_layer(layer, x, routing)  # identical functions: warm, shared
        assert torch.allclose(got, in_process(seed0, 4).run_layer(layer, x, routing), atol=1e-6)
        again = sum(c.get("cold_starts_disk", 0) + c.get("cold_starts_host", 0)
                    for c in (await counters(frontends[0])).values())
        assert again == cold, "the same weights at another path were loaded again"
    finally:
        for client in frontends:
            await client.close()
        worker.stop()
        sched.stop()


async def test_a_private_owner_holds_at_most_its_quota(tmp_path):
    path = init_checkpoint(tmp_path / "mine", "qwen2_moe", seed=2, progress=False)
    config = MoEConfig.from_pretrained(path)
    block_bytes = 4 * config.expert_bytes(torch.float32)
    async with one_worker_cluster() as client:
        executor = RemoteExpertExecutor(client, "mine", path, config, 4, torch.float32, 600.0, owner="acme",
                                        owner_quota_bytes=2 * block_bytes)
        layer = config.moe_layers[0]
        x = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(1))
        local = in_process(path, 4)
        for block in range(config.num_experts // 4):  # one block at a time: each call needs a new one
            experts = torch.full((6, config.top_k), block * 4)
            experts[:, 1] += 1
            routing = Routing(experts, torch.full((6, config.top_k), 0.5))
            assert torch.allclose(await executor.run_layer(layer, x, routing), local.run_layer(layer, x, routing),
                                  atol=1e-6)
        held = 0
        for _ in range(50):  # evictions are asynchronous: wait for the workers to report them
            stats = await client.cluster_state()
            held = sum(r.nbytes for s in stats for r in s.resident if r.tier == "device" and r.function.owner == "acme")
            if held <= 2 * block_bytes:
                break
            await asyncio.sleep(0.1)
        assert 0 < held <= 2 * block_bytes, (held, block_bytes)



async def test_prefetched_blocks_are_warm_when_their_layer_calls(tmp_path):
    path = init_checkpoint(tmp_path / "pre", "qwen2_moe", seed=4, progress=False)
    config = MoEConfig.from_pretrained(path)
    async with one_worker_cluster() as client:
        executor = remote(client, path, 4)
        layer = config.moe_layers[1]
        x, routing = layer_input(config)
        experts = sorted(set(routing.experts.reshape(-1).tolist()))
        executor.prefetch(layer, experts)
        blocks = {e // 4 for e in experts}
        assert executor.prefetch_stats.issued == len(blocks)
        for _ in range(100):  # the loads run in the background
            if client.stats.prefetches == len(blocks):
                break
            await asyncio.sleep(0.05)
        assert client.stats.prefetches == len(blocks)
        got = await executor.run_layer(layer, x, routing)
        assert torch.allclose(got, in_process(path, 4).run_layer(layer, x, routing), atol=1e-6)
        cost = executor.take_step_cost()
        assert cost.cold_starts == 0 and cost.invocations == len(blocks)  # every block was warm already
        assert (executor.prefetch_stats.used, executor.prefetch_stats.wasted) == (len(blocks), 0)
        executor.prefetch(layer, experts)  # resident now: nothing to issue
        assert executor.prefetch_stats.issued == len(blocks)
