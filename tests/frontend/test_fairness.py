"""Tenants share a model fairly: virtual token counters order admission, and a tenant with nothing running
gets its prefill stepped at once beside another tenant's running batch (a lane), with the right tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

from faasmoe.api.metrics import FrontendMetrics
from faasmoe.engine.deployments import Deployment, Deployments, DeploymentSpec
from faasmoe.engine.executors import InProcessExpertExecutor
from faasmoe.engine.fairness import OUTPUT_COST, FairShares
from faasmoe.engine.offline import generate
from faasmoe.engine.requests import Finished, GenerationRequest
from faasmoe.engine.sampling import SamplingParams
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.experts import LocalExpertExecutor
from faasmoe.model.moe_model import MoEModel, load_expert_blocks
from runtime.compute import ComputeThread


def test_counters_lift_a_returning_tenant_and_weigh_service_by_share() -> None:
    fair = FairShares()
    fair.arrive("a", set())
    fair.charge("a", 1.0, prompt_tokens=10, output_tokens=5)
    assert fair.counter("a") == 10 + 5 * OUTPUT_COST
    fair.arrive("b", {"a"})  # new while a is busy: no credit for having asked for nothing
    assert fair.counter("b") == fair.counter("a")
    assert fair.most_underserved("b", {"a"}) and fair.most_underserved("a", {"b"})  # ties go to the asker
    fair.charge("b", 2.0, output_tokens=10)  # weight 2: the same tokens count half
    assert fair.counter("b") == fair.counter("a") + 10 * OUTPUT_COST / 2
    assert not fair.most_underserved("b", {"a"}) and not fair.most_underserved("a", set())
    assert fair.next_index(["b", "a", "b"]) == 1  # the least served tenant's first request


def test_weights_share_a_backlog_in_their_ratio() -> None:
    fair = FairShares()
    queue = ["a"] * 30 + ["b"] * 30  # both flood; a has weight 2
    weights = {"a": 2.0, "b": 1.0}
    for t in ("a", "b"):
        fair.arrive(t, set(queue))
    served = []
    for _ in range(30):
        tenant = queue.pop(fair.next_index(queue))
        fair.charge(tenant, weights[tenant], prompt_tokens=8, output_tokens=8)
        served.append(tenant)
    assert abs(served.count("a") - 2 * served.count("b")) <= 1, served


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("fair") / "tiny", "qwen2_moe", seed=8, progress=False)


def deployment(model_dir, max_running: int = 64) -> Deployment:
    compute = ComputeThread("trunk")

    def local(dep: Deployment) -> InProcessExpertExecutor:
        blocks = load_expert_blocks(ExpertLayout(CheckpointReader(model_dir), dep.config), dep.block_size,
                                    torch.float32, torch.device("cpu"))
        return InProcessExpertExecutor(LocalExpertExecutor(blocks, dep.block_size), compute)

    dep = Deployment(DeploymentSpec("tiny", model_dir, expert_block_size=4), local, compute)
    dep.engine.max_running = max_running
    return dep


def request(tenant: str, prompt: list[int], tokens: int) -> GenerationRequest:
    return GenerationRequest("tiny", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True), tenant=tenant)


async def tokens_of(r: GenerationRequest, seen: list | None = None) -> list[int]:
    out = []
    while True:
        event = await r.events.get()
        if isinstance(event, Finished):
            assert event.finish_reason == "length", event
            return out
        if seen is not None:
            seen.append(r.tenant)
        out.append(event.token_id)


async def test_a_quiet_tenant_s_prefill_runs_in_a_lane_before_the_flood_s_step_ends(model_dir):
    dep = deployment(model_dir)
    engine = dep.engine
    flood = [request("a", [5 + i, 17, 3 * i + 1, 99], 12) for i in range(6)]
    for r in flood:
        engine.submit(r)
    readers = [asyncio.ensure_future(tokens_of(r)) for r in flood]
    while engine.steps < 2 or not engine._stepping:  # a's batch is in the middle of a step
        await asyncio.sleep(0)
    steps_before = engine.steps
    quiet = request("b", [7, 8, 9, 10, 11], 3)
    engine.submit(quiet)
    assert engine.lanes == 0 and engine.lane == [quiet]  # not queued behind a's step
    first = await quiet.events.get()
    assert engine.steps == steps_before + 1  # its own step ended first: a's step waited between its ops
    rest = await tokens_of(quiet)
    got = [first.token_id, *rest]
    outputs = await asyncio.gather(*readers)
    model = MoEModel.from_pretrained(model_dir, expert_block_size=4)
    expected = generate(model, [r.prompt_token_ids for r in flood] + [quiet.prompt_token_ids], max_tokens=12,
                        ignore_eos=True)
    assert outputs == [e.token_ids for e in expected[:-1]]
    assert got == expected[-1].token_ids[:3]
    assert engine.lanes == 1
    metrics = FrontendMetrics()
    deployments = Deployments()
    deployments.add(dep)
    metrics.read_engines(deployments)
    text = metrics.registry.render()
    assert 'faasmoe_fair_share_lanes_total{model_name="tiny"} 1.0' in text, text
    await engine.stop()


async def test_the_least_served_tenant_is_admitted_first_and_a_lone_tenant_is_never_held_back(model_dir):
    dep = deployment(model_dir, max_running=2)
    engine = dep.engine
    flood = [request("a", [3, 4, 5 + i], 6) for i in range(4)]
    for r in flood:
        engine.submit(r)
    readers = [asyncio.ensure_future(tokens_of(r)) for r in flood]
    while engine.steps < 2:
        await asyncio.sleep(0)
    late = request("b", [9, 9, 9], 2)
    engine.submit(late)  # no room for a lane: two are running; it waits, but ahead of a's queued two
    await tokens_of(late)
    await asyncio.gather(*readers)
    assert engine.lanes == 0
    assert late.scheduled_at < flood[2].scheduled_at and late.scheduled_at < flood[3].scheduled_at
    # one tenant alone: every request joins the batch as room frees, in arrival order, no lane
    order = [r.scheduled_at for r in flood]
    assert order[:2] == sorted(order[:2]) and order[2] < order[3]
    await engine.stop()
