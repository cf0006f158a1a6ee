"""The OpenAI-compatible frontend on a real loopback port, talked to by the official `openai` client.

One module-wide server (multi-tenant: a TenantStore and a UsageLedger on one SQLite file) serves
a tiny checkpoint twice: `tiny` shared, `secret` private to tenant beta. Generated text is checked
against `MoEModel.generate` on the same checkpoint, greedy.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import openai
import pytest
import pytest_asyncio
import torch
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from faasmoe.api.app import FrontendContext, create_app
from faasmoe.api.http_server import ConnectionLimits, FrontendRunner
from faasmoe.engine.deployments import Deployment, Deployments, DeploymentSpec
from faasmoe.engine.executors import InProcessExpertExecutor
from faasmoe.engine.offline import generate
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.experts import LocalExpertExecutor
from faasmoe.model.moe_model import MoEModel, load_expert_blocks
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.tenancy.admission import Admission
from faasmoe.tenancy.ledger import UsageLedger
from faasmoe.tenancy.tenants import TenantStore
from runtime.compute import ComputeThread

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_KEY = "admin-secret"
RUNTIME_METRICS = ("# HELP faasmoe_expert_invocations_total Expert calls.\n"
                   "# TYPE faasmoe_expert_invocations_total counter\nfaasmoe_expert_invocations_total 7.0\n")


class Server:
    def __init__(self, port: int, deployments: Deployments, ledger: UsageLedger, keys: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.deployments = deployments
        self.ledger = ledger
        self.keys = keys

    def client(self, tenant: str = "acme") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.keys[tenant], max_retries=0)

    def headers(self, tenant: str | None = "acme") -> dict[str, str]:
        return {} if tenant is None else {"Authorization": f"Bearer {self.keys[tenant]}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("frontend") / "tiny", "qwen2_moe", seed=1, progress=False)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> MoEModel:
    return MoEModel.from_pretrained(checkpoint, expert_block_size=4)


def make_deployments(path: Path, compute: ComputeThread) -> Deployments:
    def local(dep: Deployment) -> InProcessExpertExecutor:
        blocks = load_expert_blocks(ExpertLayout(CheckpointReader(dep.spec.path), dep.config), dep.block_size,
                                    torch.float32, torch.device("cpu"))
        return InProcessExpertExecutor(LocalExpertExecutor(blocks, dep.block_size), compute)

    deployments = Deployments()
    deployments.add(Deployment(DeploymentSpec("tiny", path, expert_block_size=4), local, compute))
    deployments.add(Deployment(DeploymentSpec("secret", path, sharing="private", owner="beta", expert_block_size=4),
                               local, compute))
    return deployments


async def serve(ctx: FrontendContext, limits: ConnectionLimits | None = None) -> tuple[web.AppRunner, int]:
    runner = FrontendRunner(create_app(ctx), limits)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(checkpoint: Path, tmp_path_factory):
    compute = ComputeThread("trunk")
    state = tmp_path_factory.mktemp("state") / "state.db"
    tenants, ledger = TenantStore(state), UsageLedger(state)
    keys = {name: tenants.add_tenant(name, **limits)[1] for name, limits in {
        "acme": {}, "beta": {}, "ops": {"admin": True},
        "metered": {"tokens_per_minute": 40}, "solo": {"max_concurrent": 1},
        "narrow": {"allowed_models": ["other"]}}.items()}
    keys["admin"] = ADMIN_KEY
    deployments = make_deployments(checkpoint, compute)

    async def cluster_state() -> dict:
        return {"workers": [], "models": {"tiny": {"resident_bytes": 0}}}

    async def runtime_metrics() -> str:
        return RUNTIME_METRICS

    ctx = FrontendContext(deployments, tenants, None, ADMIN_KEY, Admission(), ledger, cluster_state, runtime_metrics)
    runner, port = await serve(ctx)
    yield Server(port, deployments, ledger, keys)
    await runner.cleanup()
    await deployments.stop()
    compute.shutdown()
    tenants.close()
    ledger.close()


async def raw(server: Server, method: str, path: str, body: object = None, tenant: str | None = "acme",
              data: bytes | None = None) -> tuple[int, dict, object]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.url + path, json=body if data is None else None, data=data,
                                   headers=server.headers(tenant)) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text)
            except ValueError:
                payload = text
            return resp.status, dict(resp.headers), payload


def greedy(reference: MoEModel, prompt: str | list[int], max_tokens: int, **kw):
    return generate(reference, [prompt], temperature=0.0, max_tokens=max_tokens, **kw)[0]


def assert_error(payload: object, type_: str, param: str | None = None) -> dict:
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == type_ and error["param"] == param, error
    return error


# --- generation ---------------------------------------------------------------------------------------


async def test_completion_string_prompt_matches_the_reference(server: Server, reference: MoEModel) -> None:
    prompt = "The quick brown fox"
    out = await server.client().completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                   logprobs=2)
    want = greedy(reference, prompt, 12)
    choice = out.choices[0]
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == "tiny"
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    assert out.usage.completion_tokens == len(want.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(want.logprobs) == len(lp.tokens) == len(lp.text_offset)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want.logprobs)) < 1e-5
    assert all(len(top) >= 2 and max(top.values()) >= lp.token_logprobs[i] - 1e-6  # greedy = the top token
               for i, top in enumerate(lp.top_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


async def test_completion_token_id_prompt_and_ledger_row(server: Server, reference: MoEModel) -> None:
    ids = reference.tokenizer.encode("Once upon a time")
    want = greedy(reference, ids, 10)
    for prompt in (ids, [ids]):  # a list of ids, or a batch of one as the openai client allows
        out = await server.client().completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
        assert out.choices[0].text == want.text
    rows = [r for r in server.ledger.query(tenant="acme") if r.request_id == out.id]
    assert len(rows) == 1, "the usage row is committed before the response is sent"
    row = rows[0]
    assert (row.model, row.status, row.prompt_tokens, row.completion_tokens) == (
        "tiny", "ok", len(ids), out.usage.completion_tokens)
    assert row.expert_invocations > 0 and row.finished_at >= row.started_at > 0 and row.ttft_s is not None


async def test_chat_applies_the_template(server: Server, reference: MoEModel) -> None:
    messages = [{"role": "user", "content": "Hello! How are you today?"}]
    out = await server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                        temperature=0, logprobs=True, top_logprobs=3)
    templated = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    want = greedy(reference, reference.tokenizer.encode(templated, add_special_tokens=False), 10)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    message = out.choices[0].message
    assert message.role == "assistant" and message.content == want.text
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    content = out.choices[0].logprobs.content
    assert max(abs(c.logprob - w) for c, w in zip(content, want.logprobs)) < 1e-5
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace").startswith(want.text[:1])
    # content given as text parts renders the same prompt
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello! How are you "},
                                          {"type": "text", "text": "today?"}]}]
    again = await server.client().chat.completions.create(model="tiny", messages=parts, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == want.text


async def test_stop_string_cuts_the_text(server: Server, reference: MoEModel) -> None:
    full = greedy(reference, "Hello", 16, ignore_eos=True).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), f"pick a prompt whose completion has text: {full!r}"
    out = await server.client().completions.create(model="tiny", prompt="Hello", max_tokens=16, temperature=0,
                                                   stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[:full.find(stop)] and out.choices[0].finish_reason == "stop"


async def test_streamed_completion_equals_the_whole_one(server: Server) -> None:
    client = server.client()
    kw = dict(model="tiny", prompt="A mixture of experts", max_tokens=14, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True})
    whole = await client.completions.create(**kw)
    chunks = [c async for c in await client.completions.create(**kw, stream=True,
                                                               stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    streamed_lps = [lp for c in chunks if c.choices and c.choices[0].logprobs
                    for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed_lps == whole.choices[0].logprobs.token_logprobs
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14
    assert chunks[-1].usage == whole.usage
    # The raw stream: SSE framing, [DONE] last; without include_usage no chunk carries usage.
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/v1/completions", headers=server.headers(),
                                json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            body = (await resp.read()).decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] and "usage" not in last


async def test_streamed_chat_starts_with_the_role(server: Server) -> None:
    client = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
              temperature=0)
    whole = await client.chat.completions.create(**kw)
    chunks = [c async for c in await client.chat.completions.create(**kw, stream=True,
                                                                    stream_options={"include_usage": True})]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


async def test_seeded_sampling_is_reproducible(server: Server) -> None:
    kw = dict(model="tiny", prompt="Once upon", max_tokens=12, temperature=1.5, top_p=0.9, seed=1234,
              extra_body={"ignore_eos": True})
    a, b = [await server.client().completions.create(**kw) for _ in range(2)]
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 12


async def test_engine_failure_is_a_500_and_an_error_row(server: Server, monkeypatch) -> None:
    executor = server.deployments.by_name["secret"].executor

    async def broken(layer, x, routing, rows=None):
        raise RuntimeError("worker died")

    monkeypatch.setattr(executor, "run_layer", broken)
    body = {"model": "secret", "prompt": "x", "max_tokens": 3}
    status, _, payload = await raw(server, "POST", "/v1/completions", body, tenant="beta")
    assert status == 500 and "worker died" in assert_error(payload, "server_error")["message"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/v1/completions", json={**body, "stream": True},
                                headers=server.headers("beta")) as resp:
            events = [e for e in (await resp.read()).decode().split("\n\n") if e]
    assert "worker died" in json.loads(events[0][len("data: "):])["error"]["message"]
    assert events[-1] == "data: [DONE]"
    rows = [r for r in server.ledger.query(tenant="beta") if r.status == "error"]
    assert len(rows) == 2 and "worker died" in rows[0].error


async def test_echo_and_neutral_extras(server: Server) -> None:
    out = await server.client().completions.create(model="tiny", prompt="Echo me", max_tokens=4, temperature=0,
                                                   echo=True, extra_body={"top_k": -1, "repetition_penalty": 1.0})
    assert out.choices[0].text.startswith("Echo me")


# --- models, auth, errors ---------------------------------------------------------------------------


async def test_models_are_listed_per_tenant(server: Server) -> None:
    assert [m.id for m in (await server.client("acme").models.list()).data] == ["tiny"]
    assert [m.id for m in (await server.client("beta").models.list()).data] == ["tiny", "secret"]
    assert (await server.client("narrow").models.list()).data == []
    card = await server.client("beta").models.retrieve("secret")
    assert (card.id, card.owned_by) == ("secret", "beta")
    status, _, payload = await raw(server, "GET", "/v1/models/secret", tenant="acme")
    assert status == 404 and assert_error(payload, "not_found_error", "model")["code"] == "model_not_found"


async def test_unknown_and_foreign_private_models_are_404(server: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        await server.client("acme").completions.create(model="nope", prompt="x", max_tokens=1)
    errors = {}
    for model in ("nope", "secret"):  # the same answer, so private names cannot be probed
        status, _, payload = await raw(server, "POST", "/v1/completions", {"model": model, "prompt": "x"})
        assert status == 404
        errors[model] = assert_error(payload, "not_found_error", "model")
    assert errors["nope"]["message"].replace("nope", "secret") == errors["secret"]["message"]
    beta = await server.client("beta").completions.create(model="secret", prompt="x", max_tokens=2, temperature=0)
    assert beta.usage.completion_tokens >= 1


async def test_wrong_or_missing_key_is_401(server: Server) -> None:
    server.keys["wrong"] = "fm-acme-not-a-key"
    with pytest.raises(openai.AuthenticationError):
        await server.client("wrong").models.list()
    for tenant in ("wrong", None):
        status, headers, payload = await raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x"},
                                             tenant=tenant)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert assert_error(payload, "authentication_error")["code"] == "invalid_api_key"


BAD_REQUESTS = [
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 9000}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 8200}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 10**6]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", 5]}, "prompt"),  # a batch holds prompts, not a number
    ("/v1/completions", {"model": "tiny", "prompt": 42}, "prompt"),
    ("/v1/completions", {"model": "tiny"}, "prompt"),
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 1.5}, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages[0].content[0]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x " * 9000}]},
     "messages"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS, ids=[f"{p}-{param}" for p, _, param in BAD_REQUESTS])
async def test_bad_parameters_are_400_naming_the_param(server: Server, path: str, body: dict, param: str) -> None:
    status, _, payload = await raw(server, "POST", path, body)
    assert status == 400, payload
    error = assert_error(payload, "invalid_request_error", param)
    assert param.split("[")[0].split(".")[0] in error["message"] or "context length" in error["message"], error


async def test_bad_json_unknown_routes_and_methods_are_openai_errors(server: Server) -> None:
    status, _, payload = await raw(server, "POST", "/v1/completions", data=b"{not json")
    assert status == 400 and assert_error(payload, "invalid_request_error")["code"] == "invalid_json"
    status, _, payload = await raw(server, "POST", "/v1/completions", data=b"[1, 2]")
    assert status == 400 and "JSON object" in payload["error"]["message"]
    status, _, payload = await raw(server, "GET", "/v1/nothing")
    assert status == 404 and assert_error(payload, "not_found_error")
    status, headers, payload = await raw(server, "GET", "/v1/completions")
    assert status == 405 and "POST" in headers["Allow"] and assert_error(payload, "invalid_request_error")


# --- admission, disconnects, metering -----------------------------------------------------------------


async def test_tokens_per_minute_limit_is_429_with_retry_after(server: Server) -> None:
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 30, "ignore_eos": True}
    status, _, first = await raw(server, "POST", "/v1/completions", body, tenant="metered")
    assert status == 200 and first["usage"]["completion_tokens"] == 30
    status, headers, payload = await raw(server, "POST", "/v1/completions", body, tenant="metered")
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert assert_error(payload, "rate_limit_exceeded")["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        await server.client("metered").completions.create(model="tiny", prompt="Hi", max_tokens=30)
    status, _, payload = await raw(server, "POST", "/v1/completions", {**body, "max_tokens": 100}, tenant="metered")
    assert status == 400 and payload["error"]["code"] == "request_too_large"  # waiting cannot help: no 429


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_disconnect_mid_stream_frees_the_sequence_and_the_slot(server: Server) -> None:
    engine = server.deployments.by_name["tiny"].engine
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    session = aiohttp.ClientSession()
    resp = await session.post(f"{server.url}/v1/completions", json=body, headers=server.headers("solo"))
    assert resp.status == 200
    request_id = resp.headers["X-Request-Id"]
    await resp.content.readuntil(b"\n\n")  # the first token is out: the sequence is running
    assert engine.running
    status, headers, payload = await raw(server, "POST", "/v1/completions", {**body, "stream": False},
                                         tenant="solo")
    assert status == 429 and headers["Retry-After"] == "1"
    assert payload["error"]["code"] == "concurrency_limit_exceeded"
    resp.close()
    await session.close()
    await wait_for(lambda: not engine.running and not engine.waiting)
    await wait_for(lambda: any(r.request_id == request_id for r in server.ledger.query(tenant="solo")))
    row = next(r for r in server.ledger.query(tenant="solo") if r.request_id == request_id)
    assert row.status == "cancelled" and 1 <= row.completion_tokens < 2000
    status, _, _ = await raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1},
                             tenant="solo")
    assert status == 200, "the cancelled request's concurrency slot was released"


async def test_disconnect_of_a_non_streamed_request_cancels_it(server: Server) -> None:
    engine = server.deployments.by_name["tiny"].engine
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(f"{server.url}/v1/completions", json=body, headers=server.headers("solo"),
                               timeout=aiohttp.ClientTimeout(total=0.5))
    await wait_for(lambda: not engine.running and not engine.waiting)


async def test_usage_endpoint(server: Server) -> None:
    status, _, own = await raw(server, "GET", "/v1/usage", tenant="acme")
    assert status == 200 and own["data"] and {r["tenant"] for r in own["data"]} == {"acme"}
    assert own["data"][0]["prompt_tokens"] > 0 and own["data"][0]["ok"] >= 1
    status, _, payload = await raw(server, "GET", "/v1/usage?tenant=beta", tenant="acme")
    assert status == 403 and assert_error(payload, "permission_error", "tenant")
    status, _, other = await raw(server, "GET", "/v1/usage?tenant=beta", tenant="admin")
    assert status == 200 and {r["tenant"] for r in other["data"]} == {"beta"}
    status, _, everyone = await raw(server, "GET", "/v1/usage?since=1h", tenant="ops")
    assert status == 200 and {"acme", "beta"} <= {r["tenant"] for r in everyone["data"]}
    status, _, payload = await raw(server, "GET", "/v1/usage?since=soon", tenant="acme")
    assert status == 400 and payload["error"]["param"] == "since"


async def test_metrics_health_and_admin(server: Server) -> None:
    await server.client().completions.create(model="tiny", prompt="metrics", max_tokens=3, temperature=0)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/metrics", headers=server.headers("admin")) as resp:  # every series
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        async with session.get(f"{server.url}/health") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
    series = {(s.name, frozenset(s.labels.items())): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    acme = {("model_name", "tiny"), ("tenant", "acme")}
    for family in ("faasmoe_time_to_first_token_seconds", "faasmoe_inter_token_latency_seconds",
                   "faasmoe_e2e_request_latency_seconds"):
        assert f"# TYPE {family} histogram" in text
        assert (f"{family}_bucket", frozenset(acme | {("le", "+Inf")})) in series
    for name, labels in (("faasmoe_num_requests_running", {("model_name", "tiny")}),
                         ("faasmoe_num_requests_waiting", {("model_name", "tiny")}),
                         ("faasmoe_prompt_tokens_total", acme), ("faasmoe_generation_tokens_total", acme),
                         ("faasmoe_request_success_total", acme | {("finished_reason", "length")}),
                         ("faasmoe_request_success_total", {("model_name", "tiny"), ("tenant", "solo"),
                                                            ("finished_reason", "abort")}),
                         ("faasmoe_requests_rejected_total", {("tenant", "metered"), ("code", "rate_limit_exceeded")}),
                         ("faasmoe_expert_invocations_total", set())):
        assert (name, frozenset(labels)) in series, (name, labels)
    assert series[("faasmoe_num_requests_running", frozenset({("model_name", "tiny")}))] == 0
    assert series[("faasmoe_expert_invocations_total", frozenset())] == 7
    status, _, payload = await raw(server, "GET", "/admin/cluster", tenant=None)
    assert status == 401 and assert_error(payload, "authentication_error")
    status, _, payload = await raw(server, "GET", "/admin/cluster", tenant="acme")
    assert status == 403 and assert_error(payload, "permission_error")
    for admin in ("admin", "ops"):  # the admin key, or an admin tenant's key
        status, _, payload = await raw(server, "GET", "/admin/cluster", tenant=admin)
        assert status == 200 and payload["models"]["tiny"] == {"resident_bytes": 0}


async def test_single_tenant_and_open_modes(server: Server) -> None:
    async def state() -> dict:
        return {}

    async def no_metrics() -> str:
        return ""

    async def broken_state() -> dict:
        raise RuntimeError("scheduler unreachable")

    deployments = server.deployments
    for api_key in ("sk-single", None):
        # As `faasmoe serve --api-key K` wires it: K is also the admin key.
        ctx = FrontendContext(deployments, None, api_key, api_key, Admission(), None,
                              state if api_key else broken_state, no_metrics, max_waiting=1 if api_key else 0)
        runner, port = await serve(ctx)
        try:
            local = Server(port, deployments, server.ledger, {"right": "sk-single", "wrong": "sk-other"})
            models = await local.client("right").models.list()
            assert [m.id for m in models.data] == ["tiny"]  # "default" is not the private model's owner
            if api_key is None:  # open: whatever key a client sends is fine
                assert len((await local.client("wrong").models.list()).data) == 1
            else:
                with pytest.raises(openai.AuthenticationError):
                    await local.client("wrong").models.list()
            status, _, payload = await raw(local, "GET", "/admin/cluster", tenant="right")
            if api_key is None:  # an unexpected exception is a logged 500 in OpenAI's shape
                assert status == 500 and assert_error(payload, "server_error")
            else:
                assert status == 200  # no admin key: the single user is the operator
                out = await local.client("right").completions.create(model="tiny", prompt="x", max_tokens=2)
                assert out.usage.completion_tokens >= 1
                _, _, text = await raw(local, "GET", "/metrics", tenant="right")  # the operator: every series
                assert 'faasmoe_prompt_tokens_total{model_name="tiny",tenant="default"}' in text
            if api_key is None:  # a full queue is a 503 with Retry-After, never an unbounded wait
                status, headers, payload = await raw(local, "POST", "/v1/completions",
                                                     {"model": "tiny", "prompt": "x"}, tenant="right")
                assert status == 503 and headers["Retry-After"] == "1" and payload["error"]["code"] == "overloaded"
            status, _, payload = await raw(local, "GET", "/v1/usage", tenant="right")
            assert status == 404 and payload["error"]["code"] == "no_ledger"
        finally:
            await runner.cleanup()
