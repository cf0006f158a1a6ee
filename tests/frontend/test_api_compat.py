"""What the clients users already run expect of the API (issue 12): vLLM's and OpenAI's behaviour where
ours differed. An in-process server on a loopback port as in test_server.py, in open mode (no keys)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from faasmoe.api.app import FrontendContext
from faasmoe.api.openai_requests import parse_chat, prepare
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.model.tokenizer import Tokenizer
from faasmoe.tenancy.admission import Admission

from .test_server import Server, assert_error, make_deployments, raw, serve

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("compat") / "tiny", "qwen2_moe", seed=1, progress=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(checkpoint: Path):
    compute = ThreadPoolExecutor(1)
    deployments = make_deployments(checkpoint, compute)

    async def cluster_state() -> dict:
        return {}

    async def runtime_metrics() -> str:
        return ""

    ctx = FrontendContext(deployments, None, None, None, Admission(), None, cluster_state, runtime_metrics)
    runner, port = await serve(ctx)
    yield Server(port, deployments, None, {"acme": "any-key"})
    await runner.cleanup()
    await deployments.stop()
    compute.shutdown()


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
    assert prompt.encode() in data and b"\\u" not in data
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

    async def held(layer, x, routing):
        await gate.wait()
        return await original(layer, x, routing)

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
