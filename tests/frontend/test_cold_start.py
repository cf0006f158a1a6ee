"""A cold model's first request, on real scheduler and worker processes: its later layers' blocks are
asked for before the layers before them compute (the load pipeline), the tokens are the in-process
model's, and the request's cold-start seconds are metered (> 0 cold, 0 warm), in the usage and in
`GET /metrics` of a real `faasmoe serve`."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from faasmoe.engine.deployments import Deployment, DeploymentSpec
from faasmoe.engine.executors import RemoteExpertExecutor
from faasmoe.engine.offline import generate
from faasmoe.engine.requests import Finished, GenerationRequest
from faasmoe.engine.sampling import SamplingParams
from faasmoe.model.moe_model import MoEModel
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from runtime.compute import ComputeThread

from ..processes import faasmoe, free_port
from ..runtime.test_cluster import connect, join_worker, start_scheduler

PROMPT = [11, 3, 250, 7, 99, 4, 18, 600, 42, 5]
TOKENS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("cold") / "tiny", "qwen2_moe", seed=8, layers=4, progress=False)


async def generate_one(dep: Deployment) -> tuple[list[int], Finished]:
    request = GenerationRequest("tiny", PROMPT, SamplingParams(max_tokens=TOKENS, ignore_eos=True))
    dep.engine.submit(request)
    tokens = []
    while not isinstance(event := await request.events.get(), Finished):
        tokens.append(event.token_id)
    return tokens, event


async def test_a_cold_request_asks_for_later_layers_before_the_earlier_ones_compute(model_dir):
    sched, address = start_scheduler()
    worker = join_worker(address, "w0", "256MiB")
    client = None
    try:
        client = await connect(address, 1)
        compute = ComputeThread("trunk")
        dep = Deployment(DeploymentSpec("tiny", model_dir, expert_block_size=4),
                         lambda d: RemoteExpertExecutor(client, "tiny", model_dir, d.config, d.block_size, d.dtype, 60.0),
                         compute)
        executor = dep.executor
        events: list[tuple[str, int, int]] = []  # (what, layer, cold starts so far)
        prefetch, run_layer = client.prefetch, executor.run_layer

        def recording_prefetch(spec):
            events.append(("prefetch", spec.layer, client.stats.cold_starts))
            prefetch(spec)

        async def recording_run_layer(layer, x, routing, rows=None):
            events.append(("call", layer, client.stats.cold_starts))
            out = await run_layer(layer, x, routing, rows)
            events.append(("done", layer, client.stats.cold_starts))
            return out

        client.prefetch, executor.run_layer = recording_prefetch, recording_run_layer
        tokens, cold = await generate_one(dep)

        expected = generate(MoEModel.from_pretrained(model_dir, expert_block_size=4), [PROMPT], max_tokens=TOKENS,
                            ignore_eos=True)
        assert tokens == expected[0].token_ids
        first, second, *later = dep.config.moe_layers
        assert len(later) >= 2
        calls = [i for i, e in enumerate(events) if e[0] == "call"]
        asked_early = {layer for what, layer, _ in events[:calls[1]] if what == "prefetch"}
        assert set(later) <= asked_early  # layers 2.. were asked for while layer 0 computed
        # The prefill's calls past the first layer loaded nothing themselves: loads asked ahead had their blocks.
        prefill = [e for e in events if e[0] != "prefetch"][:2 * len(dep.config.moe_layers)]
        for (what, layer, before), (done, same, after) in zip(prefill[2::2], prefill[3::2]):
            assert (what, done, same) == ("call", "done", layer) and after == before, layer
        stats = executor.prefetch_stats
        assert stats.issued > 0 and stats.used > 0 and stats.used + stats.wasted <= stats.issued
        assert cold.usage.cold_start_s > 0

        loads = client.stats.cold_starts
        tokens, warm = await generate_one(dep)  # every block it needs is resident now
        assert tokens == expected[0].token_ids
        assert client.stats.cold_starts == loads and warm.usage.cold_start_s == 0
        # Warm, the layers' calls went from the compute thread through the ring, no event loop between halves.
        assert client.stats.sync_messages >= TOKENS * len(dep.config.moe_layers) - 1
        compute.shutdown()
    finally:
        if client is not None:
            await client.close()
        worker.stop()
        sched.stop()


def test_cold_start_seconds_in_the_metrics_of_faasmoe_serve(model_dir, tmp_path):
    port = free_port()
    proc = faasmoe("serve", str(model_dir), "--port", str(port), "--workers", "1", "--device", "cpu",
                   "--expert-block-size", "4", "--state", str(tmp_path / "state.db"))
    try:
        proc.wait_for("faasmoe serving", timeout=120)
        url = f"http://127.0.0.1:{port}"
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0}
        sums = []
        for _ in range(2):  # cold, then warm
            request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                assert response.status == 200
            with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
                text = response.read().decode()
            samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                       if s.name.startswith("faasmoe_request_cold_start_seconds") and "le" not in s.labels}
            sums.append((samples["faasmoe_request_cold_start_seconds_count"],
                         samples["faasmoe_request_cold_start_seconds_sum"]))
        (count_cold, cold_s), (count_warm, both_s) = sums
        assert (count_cold, count_warm) == (1, 2)
        assert cold_s > 0 and both_s == cold_s  # the warm request waited for no load
    finally:
        proc.stop()
