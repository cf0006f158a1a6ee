"""The serving engine in process: batching across requests, trunk keep-alive, failures."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
import torch

from faasmoe.engine.deployments import Deployment, Deployments, DeploymentSpec
from faasmoe.engine.executors import InProcessExpertExecutor
from faasmoe.engine.offline import generate
from faasmoe.engine.requests import Finished, GenerationRequest
from faasmoe.engine.sampling import SamplingParams
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.experts import LocalExpertExecutor
from faasmoe.model.moe_model import MoEModel, load_expert_blocks
from runtime.compute import ComputeThread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("engine") / "tiny", "olmoe", seed=4, progress=False)


def deployment(model_dir, **spec) -> Deployment:
    compute = ComputeThread("trunk")

    def local(dep: Deployment) -> InProcessExpertExecutor:
        def load() -> LocalExpertExecutor:
            blocks = load_expert_blocks(ExpertLayout(CheckpointReader(model_dir), dep.config), dep.block_size,
                                        torch.float32, torch.device("cpu"))
            return LocalExpertExecutor(blocks, dep.block_size)

        return InProcessExpertExecutor(load(), compute, loader=load if spec.get("whole_model_keep_alive_s") else None)

    return Deployment(DeploymentSpec("tiny", model_dir, expert_block_size=4, **spec), local, compute)


async def run(dep: Deployment, prompt: list[int], tokens: int = 6) -> tuple[list[int], Finished]:
    request = GenerationRequest("tiny", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    dep.engine.submit(request)
    out = []
    while True:
        event = await request.events.get()
        if isinstance(event, Finished):
            return out, event
        out.append(event.token_id)


async def test_concurrent_requests_share_steps_and_match_the_model(model_dir):
    dep = deployment(model_dir)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [42]]
    results = await asyncio.gather(*(run(dep, p, 8) for p in prompts))
    expected = generate(MoEModel.from_pretrained(model_dir, expert_block_size=4), prompts, max_tokens=8, ignore_eos=True)
    assert [tokens for tokens, _ in results] == [r.token_ids for r in expected]
    assert dep.engine.steps == 8  # one prefill+decode step per token, shared by all three
    await dep.engine.stop()


async def test_idle_trunk_unloads_and_reloads(model_dir):
    dep = deployment(model_dir, trunk_keep_alive_s=0.2)
    deployments = Deployments()
    deployments.add(dep)
    deployments.start()
    first, _ = await run(dep, [4, 5, 6])
    deadline = asyncio.get_running_loop().time() + 5
    while dep.trunk_bytes:
        assert asyncio.get_running_loop().time() < deadline, "the idle trunk stayed loaded"
        await asyncio.sleep(0.1)
    again, _ = await run(dep, [4, 5, 6])
    assert again == first and dep.trunk_loads == 2
    await deployments.stop()


async def test_idle_whole_model_unloads_and_reloads_as_one_cold_start(model_dir):
    dep = deployment(model_dir, whole_model_keep_alive_s=0.2)
    deployments = Deployments()
    deployments.add(dep)
    deployments.start()
    first, done = await run(dep, [4, 5, 6])
    assert done.usage.cold_starts == 0 and dep.resident_expert_bytes() == dep.executor.nbytes > 0
    deadline = asyncio.get_running_loop().time() + 5
    while dep.trunk_bytes or dep.resident_expert_bytes():
        assert asyncio.get_running_loop().time() < deadline, "the idle model stayed loaded"
        await asyncio.sleep(0.1)
    assert dep.executor.resident_functions() == 0 and dep.executor.functions  # still known, none held
    again, done = await run(dep, [4, 5, 6])
    assert again == first and dep.trunk_loads == 2 and dep.model_reloads == 1 and dep.model_reload_s > 0
    assert done.usage.cold_starts == pytest.approx(1.0)  # the reload is metered as the request's cold start
    assert dep.resident_expert_bytes() == dep.executor.nbytes
    await deployments.stop()


async def test_cancelled_waiting_request_is_finished(model_dir):
    dep = deployment(model_dir)
    request = GenerationRequest("tiny", [1, 2], SamplingParams(max_tokens=4))
    request.cancel()
    dep.engine.submit(request)
    finished = await asyncio.wait_for(request.events.get(), 10)
    assert isinstance(finished, Finished) and finished.finish_reason == "cancelled"
    assert not dep.engine.busy
    await dep.engine.stop()


async def test_a_request_whose_trunk_cannot_load_gets_its_error(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    dep = deployment(broken)  # config, tokenizer and (in process) the experts are read now; the trunk lazily
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:64])  # the disk lost the file's tail
    tokens, finished = await asyncio.wait_for(run(dep, [1, 2, 3]), 30)
    assert tokens == [] and finished.finish_reason == "error" and finished.error
    again, finished = await asyncio.wait_for(run(dep, [4, 5]), 30)  # the engine lives on
    assert again == [] and finished.finish_reason == "error"
    assert not dep.engine.busy
    await dep.engine.stop()


async def test_a_bad_request_fails_alone(model_dir):
    dep = deployment(model_dir)
    vocab = dep.config.vocab_size
    good, bad = await asyncio.wait_for(asyncio.gather(run(dep, [1, 2, 3], 6), run(dep, [1, vocab + 5], 6)), 60)
    expected = generate(MoEModel.from_pretrained(model_dir, expert_block_size=4), [[1, 2, 3]], max_tokens=6,
                        ignore_eos=True)[0]
    assert good[0] == expected.token_ids and good[1].finish_reason == "length"
    assert bad[0] == [] and bad[1].finish_reason == "error" and "out of range" in bad[1].error
    await dep.engine.stop()


async def test_kv_cache_admission_keeps_every_sequence_inside_the_budget(model_dir):
    probe = deployment(model_dir)
    per_token = probe.engine.kv_bytes_per_token
    prompt, new = [5, 6, 7], 12
    dep = deployment(model_dir, kv_cache_bytes=3 * per_token * (len(prompt) + new))  # three at a time
    seen = {"running": 0, "reserved": 0, "allocated": 0}

    async def watch() -> None:
        while True:
            seen["running"] = max(seen["running"], len(dep.engine.running))
            seen["reserved"] = max(seen["reserved"], dep.engine.kv_reserved_bytes())
            seen["allocated"] = max(seen["allocated"], dep.engine.kv_allocated_bytes())
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    results = await asyncio.wait_for(asyncio.gather(*(run(dep, prompt, new) for _ in range(8))), 120)
    watcher.cancel()
    expected = generate(MoEModel.from_pretrained(model_dir, expert_block_size=4), [prompt], max_tokens=new,
                        ignore_eos=True)[0].token_ids
    assert all(tokens == expected and f.finish_reason == "length" for tokens, f in results)
    assert seen["running"] == 3
    assert seen["reserved"] <= dep.spec.kv_cache_bytes and seen["allocated"] <= dep.spec.kv_cache_bytes
    too_big, finished = await asyncio.wait_for(run(dep, prompt, 4 * new), 30)  # could never fit: fails alone
    assert too_big == [] and finished.finish_reason == "error" and "KV cache budget" in finished.error
    await dep.engine.stop()
    await probe.engine.stop()


async def test_kv_caches_grow_with_their_sequences(model_dir):
    dep = deployment(model_dir)
    request = GenerationRequest("tiny", [1, 2, 3], SamplingParams(max_tokens=3000, ignore_eos=True))
    dep.engine.submit(request)
    await asyncio.wait_for(request.events.get(), 30)  # the first token: prefill done
    allocated = dep.engine.kv_allocated_bytes()
    assert 0 < allocated <= dep.engine.kv_bytes_per_token * 32  # not prompt + max_tokens up front
    request.cancel()
    while not isinstance(await asyncio.wait_for(request.events.get(), 30), Finished):
        pass
    await dep.engine.stop()


async def test_micro_batches_give_the_same_tokens(model_dir):
    dep = deployment(model_dir, micro_batches=2)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [42], [7, 7]]
    results = await asyncio.gather(*(run(dep, p, 8) for p in prompts))
    expected = generate(MoEModel.from_pretrained(model_dir, expert_block_size=4), prompts, max_tokens=8, ignore_eos=True)
    assert [tokens for tokens, _ in results] == [r.token_ids for r in expected]
    assert dep.engine.steps == 8
    await dep.engine.stop()


async def test_a_step_splits_into_micro_batches_only_with_tokens_enough(model_dir):
    """--micro-batch-min-tokens: the prefill step (11 tokens) ping-pongs, the decode steps (4 tokens) do not."""
    dep = deployment(model_dir, micro_batches=2, micro_batch_min_tokens=8)
    calls: list[int] = []  # rows of each layer call
    original = dep.executor.run_layer

    async def counted(layer, x, routing, rows=None):
        calls.append(x.shape[0])
        return await original(layer, x, routing, rows)

    dep.executor.run_layer = counted
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [42], [7, 7]]
    results = await asyncio.gather(*(run(dep, p, 3) for p in prompts))
    moe_layers = len(dep.config.moe_layers)
    # One step with all four prefills (11 tokens), in two groups; then two decode steps of 4 rows, whole.
    prefill = calls[:2 * moe_layers]
    assert sum(prefill) == 11 * moe_layers and max(prefill) < 11, calls
    assert calls[2 * moe_layers:] == [4] * (2 * moe_layers), calls
    expected = generate(MoEModel.from_pretrained(model_dir, expert_block_size=4), prompts, max_tokens=3, ignore_eos=True)
    assert [tokens for tokens, _ in results] == [r.token_ids for r in expected]
    await dep.engine.stop()


def test_micro_batches_split_by_tokens() -> None:
    from types import SimpleNamespace

    from faasmoe.engine.model_engine import micro_batches

    def seq(n: int):
        return SimpleNamespace(seq=SimpleNamespace(pending=[0] * n))

    batch = [seq(1), seq(1), seq(1), seq(1)]
    assert [len(g) for g in micro_batches(batch, 2)] == [2, 2]
    assert [len(g) for g in micro_batches(batch, 3)] == [2, 1, 1]
    assert [len(g) for g in micro_batches([seq(100), seq(1), seq(1)], 2)] == [1, 2]
    assert micro_batches(batch[:1], 4) == [batch[:1]]


async def test_a_long_prompt_is_prefilled_in_chunks_beside_running_decodes(model_dir):
    dep = deployment(model_dir)
    dep.engine.prefill_chunk_tokens = 4
    short, long = [3, 1, 4], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9]
    first = asyncio.create_task(run(dep, short, 12))
    while dep.engine.steps < 1:  # the short one is decoding when the long prompt arrives
        await asyncio.sleep(0.001)
    request = GenerationRequest("tiny", long, SamplingParams(max_tokens=4, ignore_eos=True))
    submitted, decoded_before = dep.engine.steps, len(dep.engine.running)
    dep.engine.submit(request)
    tokens = [(await asyncio.wait_for(request.events.get(), 60)).token_id]
    prefill_steps = dep.engine.steps - submitted
    while not isinstance(event := await asyncio.wait_for(request.events.get(), 60), Finished):
        tokens.append(event.token_id)
    short_tokens, _ = await asyncio.wait_for(first, 60)
    model = MoEModel.from_pretrained(model_dir, expert_block_size=4)
    assert short_tokens == generate(model, [short], max_tokens=12, ignore_eos=True)[0].token_ids
    assert tokens == generate(model, [long], max_tokens=4, ignore_eos=True)[0].token_ids
    # chunks of 4 + 4 + 2, each beside a decode of the short one (+1: the step in flight at submit)
    assert decoded_before == 1 and prefill_steps in (3, 4)
    await dep.engine.stop()


async def test_a_request_waiting_for_the_compute_thread_is_still_held(model_dir):
    dep = deployment(model_dir)
    busy = dep.engine.compute.run(time.sleep, 1.0)  # another model's step holds the one compute thread
    request = GenerationRequest("tiny", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    dep.engine.submit(request)
    await asyncio.sleep(0.3)
    assert request.events.empty() and not busy.done()
    assert dep.engine.holds(request) and dep.engine.busy  # starting: not dropped, not idle
    while not isinstance(await asyncio.wait_for(request.events.get(), 30), Finished):
        pass
    assert not dep.engine.holds(request)
    await dep.engine.stop()
