"""What the clients users already run expect of the API (issue 12): vLLM's and OpenAI's behaviour where
ours differed. An in-process server on a loopback port as in test_server.py, in open mode (no keys)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from faasmoe.api.app import FrontendContext
from faasmoe.api.openai_requests import parse_chat, prepare
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.model.tokenizer import Tokenizer
from faasmoe.tenancy.admission import Admission
from runtime.compute import ComputeThread

from .test_server import Server, assert_error, make_deployments, raw, serve

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def start(checkpoint: Path, **options):
    """An in-process server in open mode (no keys) on `checkpoint`, on a loopback port; (server, stop)."""
    compute = ComputeThread("trunk")
    deployments = make_deployments(checkpoint, compute)

    async def cluster_state() -> dict:
        return {}

    async def runtime_metrics() -> str:
        return ""

    ctx = FrontendContext(deployments, None, None, None, Admission(), None, cluster_state, runtime_metrics, **options)
    runner, port = await serve(ctx)

    async def stop() -> None:
        await runner.cleanup()
        await deployments.stop()
        compute.shutdown()

    return Server(port, deployments, None, {"acme": "any-key"}), stop


def open_server_fixtures(name: str, seed: int):
    """Module fixtures `checkpoint` (a tiny qwen2_moe of this seed) and `server` (started on it)."""

    @pytest.fixture(scope="module")
    def checkpoint(tmp_path_factory) -> Path:
        return init_checkpoint(tmp_path_factory.mktemp(name) / "tiny", "qwen2_moe", seed=seed, progress=False)

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def server(checkpoint: Path):
        server, stop = await start(checkpoint)
        yield server
        await stop()

    return checkpoint, server


checkpoint, server = open_server_fixtures("compat", seed=1)


async def sse(server: Server, path: str, body: dict) -> tuple[dict, bytes, list[dict]]:
    """Headers, raw body and the parsed events (without [DONE]) of one streamed request."""
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, json=body, headers=server.headers()) as resp:
            assert resp.status == 200, await resp.text()
            headers, data = dict(resp.headers), await resp.read()
    events = [e[len("data: "):] for e in data.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return headers, data, [json.loads(e) for e in events[:-1]]


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, "temperature": 0}


# --- 3: unknown fields are ignored (logged once per name); known ones with bad values are 400 ----------------


async def test_unknown_fields_are_ignored_and_logged_once(server: Server, caplog) -> None:
    tag = uuid.uuid4().hex[:8]
    extras = {f"reasoning_effort_{tag}": "low", f"prompt_cache_key_{tag}": "k", f"audio_{tag}": None}
    caplog.set_level(logging.WARNING, logger="faasmoe.api.openai_requests")
    for _ in range(2):
        for path, body in (("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}),
                           ("/v1/chat/completions", CHAT)):
            status, _, payload = await raw(server, "POST", path, {**body, **extras, "reasoning_effort": "low",
                                                                  "safety_identifier": "u1", "prompt_cache_key": "p"})
            assert status == 200, payload
    for name in extras:
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name


async def test_chat_template_kwargs_and_add_generation_prompt(server: Server, checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                               "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}")
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}

    def text_of(body: dict) -> str:
        return tokenizer.decode(prepare(parse_chat(body), tokenizer, 4096, 10**6).token_ids, skip_special_tokens=False)

    assert text_of(base) == "hi<|im_start|>assistant\n"
    assert text_of({**base, "chat_template_kwargs": {"enable_thinking": False}}) == "hi<|im_start|>assistant\n/no_think"
    assert text_of({**base, "add_generation_prompt": False}) == "hi"
    assert text_of({**base, "chat_template_kwargs": {"add_generation_prompt": False}}) == "hi"
    # Over HTTP, with the checkpoint's own template: add_generation_prompt changes the prompt's length.
    status, _, with_prompt = await raw(server, "POST", "/v1/chat/completions", CHAT)
    status2, _, without = await raw(server, "POST", "/v1/chat/completions", {**CHAT, "add_generation_prompt": False})
    assert status == status2 == 200
    assert without["usage"]["prompt_tokens"] < with_prompt["usage"]["prompt_tokens"]


@pytest.mark.parametrize("field,value,param", [
    ("chat_template_kwargs", 3, "chat_template_kwargs"),
    ("chat_template_kwargs", {"messages": []}, "chat_template_kwargs"),
    ("add_generation_prompt", "yes", "add_generation_prompt"),
    ("temperature", "hot", "temperature"),
])
async def test_known_fields_with_bad_values_are_still_400(server: Server, field: str, value, param: str) -> None:
    status, _, payload = await raw(server, "POST", "/v1/chat/completions", {**CHAT, field: value})
    assert status == 400 and assert_error(payload, "invalid_request_error", param)


# --- 8: SSE details ------------------------------------------------------------------------------------------


async def test_stream_usage_only_when_asked(server: Server) -> None:
    for path, body in (("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3}), ("/v1/chat/completions", CHAT)):
        headers, _, events = await sse(server, path, {**body, "stream": True})
        assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert all("usage" not in e for e in events), events[-1]
        assert events[-1]["choices"][0]["finish_reason"]
        _, _, events = await sse(server, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert [e for e in events if "usage" in e] == [events[-1]] and events[-1]["choices"] == []
        assert events[-1]["usage"]["total_tokens"] > 0


async def test_json_is_utf8_not_ascii_escapes(server: Server) -> None:
    prompt = "Grüße 世界"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "echo": True}
    _, data, events = await sse(server, "/v1/completions", {**body, "stream": True})
    # JSON must still escape control characters (a random token may decode to one): check the prompt's own
    # non-ASCII characters went out as UTF-8, not as \u escapes.
    assert prompt.encode() in data and b"\\u00fc" not in data and b"\\u4e16" not in data
    assert events[0]["choices"][0]["text"] == prompt
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/completions", json=body, headers=server.headers()) as resp:
            data = await resp.read()
            assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert prompt.encode() in data and json.loads(data)["choices"][0]["text"].startswith(prompt)


# --- 2: a chat stream's first chunk (role + content) waits for the first token -------------------------------


async def test_chat_stream_sends_the_role_with_the_first_token(server: Server, monkeypatch) -> None:
    executor = server.deployments.by_name["tiny"].executor
    original, gate = executor.run_layer, asyncio.Event()

    async def held(layer, x, routing, rows=None):
        await gate.wait()
        return await original(layer, x, routing, rows)

    monkeypatch.setattr(executor, "run_layer", held)
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                                headers=server.headers()) as resp:
            with pytest.raises(TimeoutError):  # prefill has not run: nothing may be sent yet
                await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 0.5)
            gate.set()
            first = json.loads((await resp.content.readuntil(b"\n\n"))[len(b"data: "):])
            rest = (await resp.read()).decode()
    delta = first["choices"][0]["delta"]
    assert delta["role"] == "assistant" and "content" in delta
    later = [json.loads(e[len("data: "):]) for e in rest.split("\n\n") if e and e != "data: [DONE]"]
    assert all("role" not in e["choices"][0]["delta"] for e in later)


# --- 6: /tokenize, /detokenize, /version, /ping, CORS --------------------------------------------------------


async def test_tokenize_and_detokenize(server: Server, checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    status, _, out = await raw(server, "POST", "/tokenize", {"model": "tiny", "prompt": "Hello world",
                                                            "return_token_strs": True})
    ids = tokenizer.encode("Hello world")
    assert status == 200 and out == {"count": len(ids), "max_model_len": server.deployments.by_name["tiny"].max_context,
                                     "tokens": ids, "token_strs": [tokenizer.id_to_token(t) for t in ids]}
    # messages go through the chat template, exactly as a chat completion's prompt
    status, _, chat = await raw(server, "POST", "/tokenize", {"model": "tiny", "messages": CHAT["messages"]})
    _, _, done = await raw(server, "POST", "/v1/chat/completions", CHAT)
    assert status == 200 and chat["count"] == done["usage"]["prompt_tokens"] and chat["token_strs"] is None
    status, _, back = await raw(server, "POST", "/detokenize", {"model": "tiny", "tokens": ids})
    assert status == 200 and back == {"prompt": "Hello world"}
    status, _, payload = await raw(server, "POST", "/detokenize", {"model": "tiny", "tokens": [10**7]})
    assert status == 400 and assert_error(payload, "invalid_request_error", "tokens")
    status, _, payload = await raw(server, "POST", "/tokenize", {"model": "nope", "prompt": "x"})
    assert status == 404 and assert_error(payload, "not_found_error", "model")


async def test_version_and_ping(server: Server) -> None:
    import importlib.metadata

    status, _, out = await raw(server, "GET", "/version", tenant=None)
    assert status == 200 and out == {"version": importlib.metadata.version("faasmoe")}
    for method in ("GET", "POST"):
        status, _, body = await raw(server, method, "/ping", tenant=None)
        assert status == 200 and body == ""


async def test_cors_is_off_by_default_and_on_for_allowed_origins(server: Server) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with aiohttp.ClientSession() as session:
        async with session.options(server.url + "/v1/chat/completions", headers=preflight) as resp:
            assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers
        async with session.get(server.url + "/v1/models", headers={"Origin": "https://app.example"}) as resp:
            assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers

    async def nothing() -> str:
        return ""

    async def no_state() -> dict:
        return {}

    ctx = FrontendContext(server.deployments, None, None, None, Admission(), None, no_state, nothing,
                          allowed_origins=("https://app.example",))
    runner, port = await serve(ctx)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.options(url + "/v1/chat/completions", headers=preflight) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
                assert "POST" in resp.headers["Access-Control-Allow-Methods"]
                assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
            async with session.options(url + "/v1/models", headers={**preflight, "Origin": "https://evil.example"}) as resp:
                assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
            async with session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True},
                                    headers={"Origin": "https://app.example"}) as resp:  # a stream too
                assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
                await resp.read()
            async with session.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"},
                                    headers={"Origin": "https://app.example"}) as resp:  # and errors
                assert resp.status == 404 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    finally:
        await runner.cleanup()


# --- 4: served names with '/', aliases -------------------------------------------------------------------------


def in_process_experts(compute: ComputeThread):
    import torch

    from faasmoe.engine.executors import InProcessExpertExecutor
    from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
    from faasmoe.model.experts import LocalExpertExecutor
    from faasmoe.model.moe_model import load_expert_blocks

    def local(dep):
        blocks = load_expert_blocks(ExpertLayout(CheckpointReader(dep.spec.path), dep.config), dep.block_size,
                                    torch.float32, torch.device("cpu"))
        return InProcessExpertExecutor(LocalExpertExecutor(blocks, dep.block_size), compute)

    return local


async def test_served_names_with_a_slash_and_aliases(server: Server, checkpoint: Path) -> None:
    from faasmoe.engine.deployments import Deployment, Deployments, DeploymentSpec

    compute = ComputeThread("trunk")
    deployments = Deployments()
    spec = DeploymentSpec("Qwen/Qwen1.5-MoE-A2.7B-Chat", checkpoint, expert_block_size=4, aliases=("qwen-moe",))
    deployments.add(Deployment(spec, in_process_experts(compute), compute))
    with pytest.raises(ValueError, match="deployed twice"):
        deployments.add(Deployment(DeploymentSpec("qwen-moe", checkpoint), in_process_experts(compute), compute))

    async def nothing() -> str:
        return ""

    async def no_state() -> dict:
        return {}

    runner, port = await serve(FrontendContext(deployments, None, None, None, Admission(), None, no_state, nothing))
    named = Server(port, deployments, None, {"acme": "k"})
    try:
        status, _, models = await raw(named, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["Qwen/Qwen1.5-MoE-A2.7B-Chat", "qwen-moe"]
        for name in ("Qwen/Qwen1.5-MoE-A2.7B-Chat", "qwen-moe"):
            status, _, card = await raw(named, "GET", f"/v1/models/{name}")
            assert status == 200 and card["id"] == name
            status, _, out = await raw(named, "POST", "/v1/completions", {"model": name, "prompt": "x", "max_tokens": 1})
            assert status == 200 and out["model"] == "Qwen/Qwen1.5-MoE-A2.7B-Chat"
        status, _, payload = await raw(named, "GET", "/v1/models/Qwen/nope")
        assert status == 404 and assert_error(payload, "not_found_error", "model")
    finally:
        await runner.cleanup()
        await deployments.stop()
        compute.shutdown()


# --- 5: sampling options over HTTP -------------------------------------------------------------------------


async def test_sampling_options_reach_the_sampler(server: Server, checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    forced = tokenizer.encode(" experts", add_special_tokens=False)[0]
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}
    status, _, out = await raw(server, "POST", "/v1/completions", {**body, "temperature": 1.0, "seed": 3,
                                                                  "logit_bias": {str(forced): 100}, "top_k": 5,
                                                                  "min_p": 0.01, "repetition_penalty": 1.0})
    assert status == 200 and out["choices"][0]["text"] == tokenizer.decode([forced] * 4), out
    _, _, greedy = await raw(server, "POST", "/v1/completions", {**body, "temperature": 0})
    _, _, top1 = await raw(server, "POST", "/v1/completions", {**body, "temperature": 1.0, "top_k": 1, "seed": 9})
    assert top1["choices"][0]["text"] == greedy["choices"][0]["text"]


# --- 1: prompt logprobs (lm-eval's loglikelihood: echo + logprobs; vLLM's prompt_logprobs) -----------------------


def transformers_prompt_logprobs(checkpoint: Path, ids: list[int]):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager",
                                                              experts_implementation="eager").eval()
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return lsm[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], lsm


async def test_echo_with_logprobs_are_transformers_prompt_logprobs(server: Server, checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids = tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    want, lsm = transformers_prompt_logprobs(checkpoint, ids)
    # as lm-eval's local-completions sends it, through the openai SDK
    out = await server.client().completions.create(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=1,
                                                   temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = lp.token_logprobs[1:len(ids)]
    assert max(abs(a - float(b)) for a, b in zip(got, want)) < 1e-4
    assert lp.tokens[:len(ids)] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.text_offset[0] == 0 and out.choices[0].text.startswith(tokenizer.decode(ids))
    # lm-eval's is_greedy compares the prompt token with the top alternative: transformers' argmax
    for i, top in enumerate(lp.top_logprobs[1:len(ids)], start=1):
        assert max(top, key=top.get) == tokenizer.decode([int(lsm[i - 1].argmax())], skip_special_tokens=False)
        assert lp.tokens[i] in top
    # a stream carries the same prompt logprobs in its first chunk
    chunks = [c async for c in await server.client().completions.create(
        model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0, stream=True)]
    assert chunks[0].choices[0].text == tokenizer.decode(ids)
    assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]


async def test_vllm_prompt_logprobs_field(server: Server, checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids = tokenizer.encode("Mixture of experts, served as functions.")
    want, lsm = transformers_prompt_logprobs(checkpoint, ids)
    status, _, out = await raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 1,
                                                                  "prompt_logprobs": 2})
    assert status == 200, out
    prompt = out["choices"][0]["prompt_logprobs"]
    assert len(prompt) == len(ids) and prompt[0] is None
    for i, entry in enumerate(prompt[1:], start=1):
        own = entry[str(ids[i])]
        assert abs(own["logprob"] - float(want[i - 1])) < 1e-4
        assert own["rank"] == int((lsm[i - 1] > lsm[i - 1, ids[i]]).sum()) + 1
        assert own["decoded_token"] == tokenizer.decode([ids[i]], skip_special_tokens=False)
        top2 = lsm[i - 1].topk(2).indices.tolist()
        assert set(entry) == {str(t) for t in top2} | {str(ids[i])}
    status, _, chat = await raw(server, "POST", "/v1/chat/completions", {**CHAT, "prompt_logprobs": 0})
    assert status == 200 and chat["choices"][0]["prompt_logprobs"][0] is None
    assert len(chat["choices"][0]["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in chat["choices"][0]["prompt_logprobs"][1:])


async def test_return_tokens_as_token_ids_names_every_token_by_its_id(server: Server, checkpoint: Path) -> None:
    ids = Tokenizer.from_pretrained(checkpoint).encode("Experts by id.")
    body = {"model": "tiny", "prompt": ids, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True,
            "return_tokens_as_token_ids": True}
    status, _, plain = await raw(server, "POST", "/v1/completions", {**body, "return_tokens_as_token_ids": False})
    status, _, out = await raw(server, "POST", "/v1/completions", body)
    assert status == 200, out
    lp, plain_lp = out["choices"][0]["logprobs"], plain["choices"][0]["logprobs"]
    assert lp["tokens"][:len(ids)] == [f"token_id:{i}" for i in ids]
    generated = [int(t.removeprefix("token_id:")) for t in lp["tokens"][len(ids):]]
    assert len(generated) == 4 and Tokenizer.from_pretrained(checkpoint).decode(generated) == \
        plain["choices"][0]["text"][len("".join(plain_lp["tokens"][:len(ids)])):]
    assert lp["text_offset"] == plain_lp["text_offset"]  # offsets still count the text
    assert all(f"token_id:{i}" in top for i, top in zip(ids[1:], lp["top_logprobs"][1:len(ids)]))
    _, _, events = await sse(server, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 1,
                                                              "stream": True, "return_tokens_as_token_ids": True})
    content = [c for e in events for ch in e["choices"] for c in ((ch.get("logprobs") or {}).get("content") or [])]
    assert content and all(c["token"].startswith("token_id:") for c in content)
    assert all(bytes(c["bytes"]).decode() == c["token"] for c in content)
    status, _, bad = await raw(server, "POST", "/v1/completions", {**body, "return_tokens_as_token_ids": "yes"})
    assert status == 400 and bad["error"]["param"] == "return_tokens_as_token_ids"


async def test_n_choices(server: Server) -> None:
    client = server.client()
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=1.5, seed=11,
              extra_body={"ignore_eos": True})
    out = await client.completions.create(**kw, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    singles = [await client.completions.create(**{**kw, "seed": 11 + i}) for i in range(3)]
    assert [c.text for c in out.choices] == [s.choices[0].text for s in singles]  # choice i: seed + i
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.prompt_tokens == singles[0].usage.prompt_tokens and out.usage.completion_tokens == 18
    chat = await client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=4, temperature=0,
                                                n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same twice
    chunks = [c async for c in await client.completions.create(**kw, n=3, stream=True,
                                                               stream_options={"include_usage": True})]
    texts = ["", "", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in out.choices]
    assert sorted(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason) == ["length"] * 3
    assert chunks[-1].usage.completion_tokens == 18 and chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens


async def test_a_token_without_text_is_streamed_when_its_logprob_is_asked(tmp_path) -> None:
    from faasmoe.api.openai_responses import ResponseShape
    from faasmoe.engine.requests import TokenEvent
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
    from faasmoe.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(init_checkpoint(tmp_path / "t", "qwen2_moe", progress=False))
    silent = TokenEvent(token_id=5, text="", logprob=-1.5, top_logprobs={5: -1.5})
    with_logprobs = ResponseShape(False, "cmpl-1", "tiny", tokenizer, logprobs=1)
    chunk = with_logprobs.token_chunk(silent)
    assert chunk is not None and chunk["choices"][0]["logprobs"]["token_logprobs"] == [-1.5]  # clients count it
    assert ResponseShape(False, "cmpl-2", "tiny", tokenizer, logprobs=None).token_chunk(silent) is None
