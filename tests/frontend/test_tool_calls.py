"""Tool calling (issue 24): tools reach the chat template, `required` and named choices are enforced by the
grammar (so even the tiny random model calls with arguments that validate), calls come back as OpenAI's
tool_calls, whole and streamed (id and name first, then the arguments in pieces), history with calls and
results renders, and the parsers read each family's format however the text is cut."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from faasmoe.api.tool_requests import MAX_PARALLEL_CALLS
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.model.tokenizer import Tokenizer

from .test_api_compat import open_server_fixtures, sse, start
from .test_server import Server, assert_error, raw
from .test_structured_outputs import PERSON, check_person

pytestmark = pytest.mark.asyncio(loop_scope="module")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD_USER = {"type": "function", "function": {"name": "add_user", "parameters": PERSON}}


def check_weather(arguments: dict) -> None:
    assert set(arguments) == {"city", "unit"} and isinstance(arguments["city"], str) and len(arguments["city"]) <= 10
    assert arguments["unit"] in ("celsius", "fahrenheit")


CHECKS = {"get_weather": check_weather, "add_user": check_person}


checkpoint, server = open_server_fixtures("tools", seed=4)


def ask(**extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER, ADD_USER], "max_tokens": 250, **extra}


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
async def test_required_gives_valid_calls(server: Server, sampling: dict) -> None:
    # Up to MAX_PARALLEL_CALLS calls (a random model repeats its call until the bound): room for all of them.
    status, _, out = await raw(server, "POST", "/v1/chat/completions", ask(tool_choice="required", max_tokens=1200,
                                                                          **sampling))
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert 1 <= len(calls) <= MAX_PARALLEL_CALLS and choice["message"]["content"] is None
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        CHECKS[call["function"]["name"]](json.loads(call["function"]["arguments"]))
    assert len({c["id"] for c in calls}) == len(calls)


async def test_a_named_function_without_parallel_calls_is_exactly_one_call_of_it(server: Server) -> None:
    for seed in range(3):
        status, _, out = await raw(server, "POST", "/v1/chat/completions", ask(
            tool_choice={"type": "function", "function": {"name": "add_user"}}, parallel_tool_calls=False,
            temperature=1.0, seed=seed))
        assert status == 200, out
        [call] = out["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "add_user"
        check_person(json.loads(call["function"]["arguments"]))


async def test_a_streamed_call_sends_id_and_name_then_argument_pieces(server: Server) -> None:
    body = ask(tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=1200)
    _, _, whole = await raw(server, "POST", "/v1/chat/completions", body)
    _, _, events = await sse(server, "/v1/chat/completions", {**body, "stream": True})
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert deltas[0]["role"] == "assistant"
    pieces = [t for d in deltas for t in d.get("tool_calls") or []]
    calls = whole["choices"][0]["message"]["tool_calls"]
    assert sorted({p["index"] for p in pieces}) == list(range(len(calls)))
    for index, call in enumerate(calls):
        first, *rest = [p for p in pieces if p["index"] == index]
        assert first["id"].startswith("call_") and first["type"] == "function"
        assert first["function"] == {"name": "get_weather", "arguments": ""}
        assert rest and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
        arguments = "".join(p["function"]["arguments"] for p in rest)
        assert json.loads(arguments) == json.loads(call["function"]["arguments"])
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "tool_calls"


async def test_auto_and_none_leave_the_choice_to_the_model(server: Server) -> None:
    for choice in ("auto", "none"):
        status, _, out = await raw(server, "POST", "/v1/chat/completions", ask(tool_choice=choice, max_tokens=8,
                                                                              temperature=0))
        assert status == 200, out
        assert out["choices"][0]["finish_reason"] == "length"  # the random model wrote text, no call


async def test_history_with_calls_and_results_renders_through_the_template(server: Server, checkpoint: Path) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"}]
    status, _, out = await raw(server, "POST", "/tokenize", {"model": "tiny", "messages": messages})
    assert status == 200, out
    text = Tokenizer.from_pretrained(checkpoint).decode(out["tokens"], skip_special_tokens=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21\n</tool_response>" in text
    status, _, out = await raw(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": messages,
                                                                       "tools": [WEATHER], "max_tokens": 4})
    assert status == 200, out
    status, _, tools_prompt = await raw(server, "POST", "/tokenize", {"model": "tiny", "messages": messages[:1],
                                                                     "tools": [WEATHER]})
    assert "get_weather" in Tokenizer.from_pretrained(checkpoint).decode(tools_prompt["tokens"])


async def test_the_responses_api_calls_functions_and_takes_their_output(server: Server) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    body = {"model": "tiny", "input": "Weather in Paris?", "tools": [tool], "tool_choice": "required",
            "max_output_tokens": 200, "temperature": 0, "parallel_tool_calls": False}
    status, _, out = await raw(server, "POST", "/v1/responses", body)
    assert status == 200, out
    calls = [item for item in out["output"] if item["type"] == "function_call"]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and calls[0]["status"] == "completed"
    check_weather(json.loads(calls[0]["arguments"]))
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/responses", json={**body, "stream": True},
                                headers=server.headers()) as resp:
            stream = (await resp.read()).decode()
    events = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "response.completed" and "response.output_text.delta" not in kinds  # a call alone: no text
    assert kinds.index("response.function_call_arguments.delta") < kinds.index("response.function_call_arguments.done")
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [json.loads(e["arguments"]) for e in done] == [json.loads(c["arguments"]) for c in calls]
    follow = {"model": "tiny", "tools": [tool], "max_output_tokens": 4, "input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0]["call_id"], "name": "get_weather",
         "arguments": calls[0]["arguments"]},
        {"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "sunny"}]}
    status, _, out = await raw(server, "POST", "/v1/responses", follow)
    assert status == 200, out


@pytest.mark.parametrize("body,param", [
    (ask(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools[0].function.parameters"),
    (ask(tools=[{"type": "code_interpreter"}]), "tools[0]"),
    (ask(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
    (ask(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (ask(tool_choice="sometimes"), "tool_choice"),
    (ask(tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    ({**ask(), "tools": None, "tool_choice": "required"}, "tool_choice"),
    (ask(parallel_tool_calls="yes"), "parallel_tool_calls"),
])
async def test_bad_tools_are_a_400_naming_the_parameter(server: Server, body: dict, param: str) -> None:
    status, _, out = await raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400, out
    assert_error(out, "invalid_request_error", param)


async def test_auto_tool_choice_can_be_turned_off_as_in_vllm(checkpoint: Path) -> None:
    server, stop = await start(checkpoint, auto_tool_choice=False)
    try:
        status, _, out = await raw(server, "POST", "/v1/chat/completions", ask())
        assert status == 400 and "--enable-auto-tool-choice" in out["error"]["message"]
        status, _, out = await raw(server, "POST", "/v1/chat/completions", ask(tool_choice="required", max_tokens=120))
        assert status == 200, out
    finally:
        await stop()


async def test_mixtral_models_call_in_mistrals_format_by_default(tmp_path) -> None:
    checkpoint = init_checkpoint(tmp_path / "mixtral", "mixtral", seed=2, progress=False)
    server, stop = await start(checkpoint)
    try:
        body = ask(tool_choice="required", temperature=1.0, seed=1, max_tokens=1200)
        status, _, out = await raw(server, "POST", "/v1/chat/completions", body)
        assert status == 200, out
        calls = out["choices"][0]["message"]["tool_calls"]
        for call in calls:
            CHECKS[call["function"]["name"]](json.loads(call["function"]["arguments"]))
        _, _, events = await sse(server, "/v1/chat/completions", {**body, "stream": True})
        pieces = [t for e in events for c in e["choices"] for t in c["delta"].get("tool_calls") or []]
        assert [p["function"]["name"] for p in pieces if "id" in p] == [c["function"]["name"] for c in calls]
    finally:
        await stop()
