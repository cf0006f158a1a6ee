"""Scale to zero gives the memory back: a real worker process's RSS falls by the bytes it held.

A CPU worker has no host tier by default (it would be the same RAM), and glibc is told to hand
freed expert memory back to the OS; the metric of every tier reads 0 once the blocks expire.
"""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest
import torch

from faasmoe.engine.functions import block_content_at
from faasmoe.model.config import MoEConfig
from runtime import protocol as p
from runtime.client import FunctionCall, RuntimeClient

from ..processes import faasmoe
from .test_cluster import TOKEN, start_scheduler

KEEP_ALIVE_S = 1.0
# 8 MiB gate_up + 4 MiB down per expert in float32: medium allocations glibc keeps in its heaps
# once a freed mmap'd chunk has raised its mmap threshold.
SHAPE = dict(vocab_size=1024, hidden_size=512, num_layers=1, num_heads=4, num_kv_heads=2, moe_intermediate_size=2048,
             num_experts=8, top_k=2, dtype="float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
    from faasmoe.model.synthetic.presets import Preset

    return init_checkpoint(tmp_path_factory.mktemp("rss") / "m", "mixtral", preset=Preset(family="mixtral", **SHAPE),
                           seed=1, progress=False)


def spec(model_dir, expert: int, dtype: str) -> p.FunctionSpec:
    nbytes = MoEConfig.from_pretrained(model_dir).expert_bytes(getattr(torch, dtype))
    return p.FunctionSpec(f"big-{dtype}/0/{expert}", str(model_dir), 0, expert, 1, dtype, nbytes, "", KEEP_ALIVE_S,
                          content=block_content_at(model_dir, 0, expert, 1, dtype))


def call(fn: p.FunctionSpec) -> FunctionCall:
    x = torch.randn(8, SHAPE["hidden_size"]).to(getattr(torch, fn.dtype))
    return FunctionCall(fn, x, torch.zeros(8, dtype=torch.long))


def tier_bytes(metrics_text: str) -> dict[str, float]:
    tiers = {}
    for line in metrics_text.splitlines():
        if line.startswith("faasmoe_resident_expert_bytes{"):
            tiers[line.split('tier="')[1].split('"')[0]] = float(line.split()[-1])
    return tiers


async def held_bytes(client: RuntimeClient) -> tuple[float, dict[str, float]]:
    (stats,) = await client.cluster_state()
    return stats.counters["device_bytes"] + stats.counters["host_bytes"], tier_bytes(stats.metrics_text)


# bfloat16: on a CPU with native bf16 the worker repacks blocks for oneDNN; those bytes go back too.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_expired_blocks_leave_the_worker_rss(model_dir, dtype):
    sched, address = start_scheduler()
    worker = faasmoe("worker", "join", address, "--token", TOKEN, "--id", "w-rss", "--device", "cpu",
                     "--memory", "256MiB", "--listen", "127.0.0.1:0")  # the default host cache: off on CPU
    client = None
    try:
        client = await RuntimeClient(address, TOKEN).start()
        async with asyncio.timeout(60):
            while "w-rss" not in client.workers:
                await asyncio.sleep(0.05)
        rss = psutil.Process(client.workers["w-rss"].pid).memory_info
        fns = [spec(model_dir, e, dtype) for e in range(8)]
        expert_bytes = sum(fn.nbytes for fn in fns)
        for round_ in range(2):  # the second round loads into memory glibc kept from the first, unless trimmed
            await client.invoke([call(fn) for fn in fns])
            held, _ = await held_bytes(client)
            assert held == expert_bytes
            loaded_rss = rss().rss
            deadline = time.monotonic() + KEEP_ALIVE_S + 5
            while (await held_bytes(client))[0] > 0:
                assert time.monotonic() < deadline, f"round {round_}: blocks still held {await held_bytes(client)}"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # an expiry round (every 0.25 s) that saw nothing left to do
            freed = loaded_rss - rss().rss
            print(f"round {round_}: worker RSS {loaded_rss / 2**20:.0f} MiB holding {expert_bytes / 2**20:.0f} MiB "
                  f"of experts, {(loaded_rss - freed) / 2**20:.0f} MiB after they expired")
            assert freed >= 0.75 * expert_bytes, (round_, freed / 2**20, expert_bytes / 2**20)
            _, tiers = await held_bytes(client)
            assert tiers == {"device": 0.0, "host": 0.0}
    finally:
        if client:
            await client.close()
        worker.stop()
        sched.stop()
