"""OpenAI's Responses API (`POST /v1/responses`, issue 12 item 4) against a real `faasmoe serve` process,
driven by the real `openai` client: the same text as chat completions, typed stream events, usage, errors.

One process (`--experts in-process`: no worker processes) serves a tiny shared model and a private one of
tenant globex, for tenants acme, globex and tight (one request at a time), declared in a TOML config.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid

import openai
import pytest

from faasmoe.api.responses_api import ResponsesShape, parse_responses
from faasmoe.engine.requests import Finished, TokenEvent, Usage
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.model.tokenizer import Tokenizer

from ..processes import free_port, serving

KEYS = {"acme": "fm-acme-0123456789abcdefghijklmnopqrstuv", "globex": "fm-globex-0123456789abcdefghijklmnopqrstu",
        "tight": "fm-tight-0123456789abcdefghijklmnopqrstuvw"}
MESSAGES = [{"role": "user", "content": "Hello there"}]
GREEDY = {"model": "tiny", "temperature": 0, "max_output_tokens": 8}
STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added"]
STREAM_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses")
    model = init_checkpoint(root / "tiny", "qwen2_moe", seed=5, progress=False)
    port = free_port()
    config = root / "faasmoe.toml"
    config.write_text(
        f'[server]\nport = {port}\ndevice = "cpu"\nstate = "{root / "state.db"}"\n\n'
        f'[[models]]\nname = "tiny"\npath = "{model}"\n\n'
        f'[[models]]\nname = "globex-private"\npath = "{model}"\nsharing = "private"\nowner = "globex"\n\n'
        f'[[tenants]]\nname = "acme"\nmodels = ["*"]\napi_keys = ["{KEYS["acme"]}"]\n\n'
        f'[[tenants]]\nname = "globex"\nmodels = ["*"]\napi_keys = ["{KEYS["globex"]}"]\n\n'
        f'[[tenants]]\nname = "tight"\nmodels = ["tiny"]\nmax_concurrent = 1\napi_keys = ["{KEYS["tight"]}"]\n')
    proc = serving(port, "--config", str(config), "--experts", "in-process")
    proc.model_dir = model
    yield proc
    assert proc.stop() == 0, proc.output


def client(server, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def post(server, path: str, body: dict, tenant: str | None = "acme") -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if tenant:
        request.add_header("Authorization", f"Bearer {KEYS[tenant]}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def chat_text(server, messages: list[dict]):
    return client(server).chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)


# --- text in, text out ----------------------------------------------------------------------------------------


def test_text_equals_chat_completions_for_the_same_messages(server) -> None:
    chat = chat_text(server, MESSAGES)
    c = client(server)
    as_string = c.responses.create(input="Hello there", **GREEDY)
    as_items = c.responses.create(input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello "},
                                                                     {"type": "input_text", "text": "there"}]}], **GREEDY)
    as_messages = c.responses.create(input=[{"type": "message", "role": "user", "content": "Hello there"}], **GREEDY)
    expected = chat.choices[0].message.content
    assert expected and as_string.output_text == as_items.output_text == as_messages.output_text == expected
    r = as_string
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [part.type for part in item.content] == ["output_text"] and item.content[0].annotations == []
    u = r.usage
    assert (u.input_tokens, u.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens == 0 and u.output_tokens_details.reasoning_tokens == 0
    assert r.max_output_tokens == 8 and r.temperature == 0 and r.tools == [] and r.error is None


def test_max_output_tokens_stops_an_incomplete_response(server) -> None:
    r = client(server).responses.create(input="Once upon a time", model="tiny", max_output_tokens=3,
                                        extra_body={"ignore_eos": True})
    assert r.usage.output_tokens == 3 and r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens" and r.output[0].status == "incomplete"


def test_instructions_are_a_system_message(server) -> None:
    chat = chat_text(server, [{"role": "system", "content": "Answer in French."}, *MESSAGES])
    r = client(server).responses.create(input="Hello there", instructions="Answer in French.", **GREEDY)
    plain = client(server).responses.create(input="Hello there", **GREEDY)
    assert r.output_text == chat.choices[0].message.content and r.instructions == "Answer in French."
    # the checkpoint's (Qwen's) template puts a default system message where none is given: the counts differ
    assert r.usage.input_tokens == chat.usage.prompt_tokens != plain.usage.input_tokens


def test_a_conversation_with_assistant_turns(server) -> None:
    history = [*MESSAGES, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "And then?"}]
    chat = chat_text(server, history)
    items = [history[0], {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                          "content": [{"type": "output_text", "text": "Hi!", "annotations": []}]}, history[2]]
    r = client(server).responses.create(input=items, **GREEDY)
    assert r.output_text == chat.choices[0].message.content


def test_seeded_sampling_reproduces(server) -> None:
    c = client(server)
    a, b = (c.responses.create(input="Hello", model="tiny", temperature=1.0, top_p=0.9, max_output_tokens=6,
                               extra_body={"seed": 7}) for _ in range(2))
    assert a.output_text == b.output_text and a.top_p == 0.9


def test_logprobs_of_the_output_tokens(server) -> None:
    r = client(server).responses.create(input="Hello there", include=["message.output_text.logprobs"], top_logprobs=2,
                                        **GREEDY)
    logprobs = r.output[0].content[0].logprobs
    assert len(logprobs) == r.usage.output_tokens and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    assert all(lp.logprob <= 0 and lp.top_logprobs[0].logprob >= lp.logprob - 1e-5 for lp in logprobs)  # greedy


# --- streams ------------------------------------------------------------------------------------------------


def test_stream_events_in_order_and_deltas_add_up(server) -> None:
    whole = client(server).responses.create(input="Hello there", **GREEDY)

    async def stream() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEYS["acme"], max_retries=0) as c:
            return [event async for event in await c.responses.create(input="Hello there", stream=True, **GREEDY)]

    events = asyncio.run(stream())
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and kinds == STREAM_ORDER + ["response.output_text.delta"] * len(deltas) + STREAM_END + [
        f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in deltas)
    done, part_done, item_done, last = events[-4:]
    assert text == done.text == part_done.part.text == item_done.item.content[0].text == whole.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert last.response.output_text == text and last.response.usage.total_tokens == whole.usage.total_tokens
    assert {e.item_id for e in deltas} == {item_done.item.id} == {o.id for o in last.response.output}
    assert events[0].response.id == last.response.id


def test_stream_frames_name_their_event_and_end_without_done(server) -> None:
    status, headers, body = post(server, "/v1/responses", {**GREEDY, "input": "Hi", "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream; charset=utf-8"
    frames = [f for f in body.split("\n\n") if f]
    assert "[DONE]" not in body and len(frames) >= len(STREAM_ORDER) + len(STREAM_END) + 1
    for frame in frames:
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[len("data: "):])["type"] == event[len("event: "):]


def stream_events(server, body: dict) -> list[dict]:
    """The events of a raw streamed POST /v1/responses, as vllm bench reads them."""
    status, _, text = post(server, "/v1/responses", {**body, "stream": True})
    assert status == 200, text
    return [json.loads(frame.split("\n")[1][len("data: "):]) for frame in text.split("\n\n") if frame]


def test_vllm_bench_sampling_extras_are_honoured(server) -> None:
    """vllm bench's openai-responses body (ignore_eos) and the other vLLM sampling options chat takes: with EOS
    made certain by logit_bias, ignore_eos still generates max_output_tokens; without it one token ends the
    response; each stream has a delta (the EOS tokens' text is empty) and the deltas add up to the text."""
    eos = min(Tokenizer.from_pretrained(server.model_dir).eos_token_ids)
    bench = {"model": "tiny", "input": "Hello there", "max_output_tokens": 16, "store": False,
             "logit_bias": {str(eos): 100}}
    for extra, tokens, last in (({"ignore_eos": True}, 16, "response.incomplete"), ({}, 1, "response.completed")):
        events = stream_events(server, {**bench, **extra})
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        done = next(e for e in events if e["type"] == "response.output_text.done")
        assert events[-1]["type"] == last and events[-1]["response"]["usage"]["output_tokens"] == tokens
        assert deltas and "".join(deltas) == done["text"] == events[-1]["response"]["output"][0]["content"][0]["text"]
    # stop_token_ids stop on a token logit_bias makes certain; top_k, min_p, repetition_penalty, stop are taken
    r = client(server).responses.create(input="Hello there", model="tiny", max_output_tokens=8, extra_body={
        "logit_bias": {"42": 100}, "stop_token_ids": [42], "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
        "stop": ["\n\n"]})
    assert r.usage.output_tokens == 1 and r.status == "completed"
    assert "ignoring the unknown request field 'ignore_eos'" not in server.output
    assert "ignoring the unknown request field 'top_k'" not in server.output
    with pytest.raises(openai.BadRequestError) as caught:  # a known field with a bad value is a 400, as in chat
        client(server).responses.create(input="Hi", **GREEDY, extra_body={"top_k": "five"})
    assert caught.value.param == "top_k"


def test_the_sync_client_streams_too(server) -> None:
    with client(server).responses.create(input="Hello there", stream=True, **GREEDY) as stream:
        events = list(stream)
    assert events[-1].type in ("response.completed", "response.incomplete") and events[-1].response.usage.output_tokens


# --- tenancy, admission, metering ------------------------------------------------------------------------------


def test_usage_is_metered_as_for_chat(server) -> None:
    def totals() -> tuple[int, int]:
        request = urllib.request.Request(server.url + "/v1/usage", headers={"Authorization": f"Bearer {KEYS['globex']}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            rows = [r for r in json.loads(response.read())["data"] if r["model"] == "tiny"]
        return sum(r["prompt_tokens"] for r in rows), sum(r["completion_tokens"] for r in rows)

    before = totals()
    r = client(server, "globex").responses.create(input="Hello there", **GREEDY)
    after = totals()
    assert (after[0] - before[0], after[1] - before[1]) == (r.usage.input_tokens, r.usage.output_tokens)


def test_a_key_is_needed(server) -> None:
    status, headers, body = post(server, "/v1/responses", {**GREEDY, "input": "Hi"}, tenant=None)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0).responses.create(
            input="Hi", **GREEDY)


@pytest.mark.parametrize("model", ["no-such-model", "globex-private"])
def test_unknown_and_other_tenants_private_models_are_404(server, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(server, "acme").responses.create(input="Hi", **{**GREEDY, "model": model})
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert client(server, "globex").responses.create(input="Hi", **{**GREEDY, "model": "globex-private"}).output_text


def test_admission_limits_apply(server) -> None:
    """tight may have one request in flight: a second one while a stream is open is a 429."""
    request = urllib.request.Request(server.url + "/v1/responses", method="POST", headers={
        "Authorization": f"Bearer {KEYS['tight']}", "Content-Type": "application/json"},
        data=json.dumps({**GREEDY, "input": "Hi", "stream": True, "max_output_tokens": 64}).encode())
    with urllib.request.urlopen(request, timeout=120) as stream:
        assert stream.readline().startswith(b"event: response.created")  # admitted: its slot is held
        status, headers, body = post(server, "/v1/responses", {**GREEDY, "input": "Hi"}, tenant="tight")
        rest = stream.read().decode()
    assert status == 429 and "Retry-After" in headers
    assert json.loads(body)["error"]["code"] == "concurrency_limit_exceeded"
    assert "event: response.completed" in rest or "event: response.incomplete" in rest


# --- what is not supported: a 400 naming the parameter ----------------------------------------------------------


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}, "tools[0].parameters"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0]"),
    ({"input": [{"type": "custom_tool_call_output", "call_id": "c", "output": "4"}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": 3}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"instructions": ["x"]}, "instructions"),
])
def test_unsupported_or_bad_options_are_400_naming_the_param(server, extra: dict, param: str) -> None:
    body = {**GREEDY, "input": "Hi", **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).responses.create(**body)
    assert caught.value.param == param and caught.value.type == "invalid_request_error", caught.value.body


def test_unknown_fields_are_ignored_and_logged_once(server) -> None:
    name = f"future_option_{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        r = client(server).responses.create(input="Hi", **GREEDY, extra_body={name: {"x": 1}, "reasoning": {"effort": None},
                                                                                "service_tier": "auto"})
        assert r.output_text is not None
    assert server.output.count(f"ignoring the unknown request field {name!r}") == 1, server.output


def test_a_client_gone_mid_stream_frees_its_slot(server) -> None:
    """tight's one slot comes back when its streaming client leaves."""
    request = urllib.request.Request(server.url + "/v1/responses", method="POST", headers={
        "Authorization": f"Bearer {KEYS['tight']}", "Content-Type": "application/json"},
        data=json.dumps({**GREEDY, "input": "Hi", "stream": True, "max_output_tokens": 200,
                         "ignore_eos": True}).encode())
    with urllib.request.urlopen(request, timeout=120) as stream:
        assert stream.readline().startswith(b"event: response.created")
    deadline = time.monotonic() + 30
    while (status := post(server, "/v1/responses", {**GREEDY, "input": "Hi"}, tenant="tight")[0]) == 429 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200


# --- the stream's ends, without a server ----------------------------------------------------------------------


def shape_of(body: dict) -> ResponsesShape:
    return ResponsesShape(parse_responses({"model": "tiny", "input": "Hi", **body}), "tiny", tokenizer=None)


def test_a_failed_generation_ends_the_stream_with_response_failed() -> None:
    shape = shape_of({"stream": True})
    events = [*shape.start_events(), *shape.token_events(TokenEvent(5, "a", -0.1))]
    events += shape.end_events(Finished("error", "a", Usage(3, 1), error="worker lost"))
    assert [e["type"] for e in events][-1] == "response.failed" and "response.completed" not in str(events)
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "worker lost" in failed["error"]["message"]
    assert failed["usage"]["total_tokens"] == 4


def test_text_still_held_back_at_the_end_is_one_more_delta() -> None:
    shape = shape_of({"stream": True})
    events = [*shape.token_events(TokenEvent(5, "ab", -0.1)), *shape.token_events(TokenEvent(6, "", -0.2))]
    events += shape.end_events(Finished("stop", "abc", Usage(3, 2)))
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "abc"
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["output"][0]["status"] == "completed"


def test_a_stream_whose_tokens_had_no_text_still_sends_one_delta() -> None:
    """Tokens with no text (special tokens, or half a UTF-8 character never completed) send no delta as they
    come; the end sends one, empty, so that the stream has a delta for each response with output tokens."""
    shape = shape_of({"stream": True})
    events = [*shape.token_events(TokenEvent(5, "", -0.1)), *shape.token_events(TokenEvent(6, "", -0.2))]
    events += shape.end_events(Finished("length", "", Usage(3, 2)))
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == [""]
    kinds = [e["type"] for e in events]
    assert kinds.index("response.output_text.delta") < kinds.index("response.output_text.done")
    nothing = shape_of({"stream": True})  # no token generated (cancelled before its first): no delta
    assert "response.output_text.delta" not in str(nothing.end_events(Finished("cancelled", "", Usage(3, 0))))


def test_vllm_sampling_extras_parse_as_for_chat() -> None:
    body = parse_responses({"model": "tiny", "input": "Hi", "ignore_eos": True, "top_k": 5, "min_p": 0.1,
                            "repetition_penalty": 1.2, "stop": "x", "stop_token_ids": [3], "presence_penalty": 0.5,
                            "frequency_penalty": 0.25, "logit_bias": {"7": -100}})
    assert (body.ignore_eos, body.top_k, body.min_p, body.repetition_penalty, body.stop, body.stop_token_ids) == (
        True, 5, 0.1, 1.2, ["x"], [3])
    assert (body.presence_penalty, body.frequency_penalty, body.logit_bias) == (0.5, 0.25, {7: -100.0})


def test_instructions_come_first_as_a_system_message() -> None:
    body = parse_responses({"model": "tiny", "instructions": "Be brief.", "input": [
        {"role": "developer", "content": "d"}, {"role": "user", "content": [{"type": "input_text", "text": "u"}]}]})
    assert body.messages == [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "d"},
                             {"role": "user", "content": "u"}]
    assert body.chat and body.max_tokens is None and body.logprobs is None
