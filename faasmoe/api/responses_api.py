"""OpenAI's Responses API (`POST /v1/responses`) at the edge: its body, its response object, its stream events.

A Responses request is a chat request in another envelope: `input` (a string or a list of message items)
and `instructions` (a system message) become chat messages for the model's template, and the answer is
one `message` output item with `output_text` content. What needs state or tools this server does not have
(previous_response_id, stored responses, tools, background runs, image/file/audio input) is a 400 that
names the parameter. Nothing here knows about aiohttp.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from faasmoe.api.openai_requests import (
    MAX_CHAT_TOP_LOGPROBS,
    SAMPLING_EXTRAS,
    GenerationBody,
    _bool,
    _ignore_unknown,
    _int,
    _json_type,
    _parse_common,
    invalid,
    parse_json_body,
)
from faasmoe.api.openai_responses import TokenText
from faasmoe.api.structured_requests import parse_text_format
from faasmoe.api.tool_parsers import ToolCall, ToolCallStream, parse_tool_calls
from faasmoe.api.tool_requests import parse_tools, template_tool_calls
from faasmoe.engine.requests import Finished, TokenEvent, Usage
from faasmoe.model.tokenizer import Tokenizer

# What `_parse_common` validates for us (the same checks and messages as chat); `seed` and the sampling extras
# (ignore_eos, top_k, min_p, repetition_penalty, stop, stop_token_ids, ...) are extensions, as in vLLM:
# OpenAI's Responses API has none of them, `vllm bench serve --backend openai-responses` sends ignore_eos.
_SAMPLING = ("model", "temperature", "top_p", "seed", "user", "stream", *SAMPLING_EXTRAS)
# Fields of OpenAI's schema that are read below; every other one is ignored and logged once per name.
_KNOWN = {*_SAMPLING, "input", "instructions", "max_output_tokens", "metadata", "store", "tools", "tool_choice",
          "parallel_tool_calls", "previous_response_id", "conversation", "prompt", "background", "text",
          "truncation", "top_logprobs", "include", "stream_options"}
_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text")
_MEDIA_PARTS = {"input_image": "image", "input_file": "file", "input_audio": "audio"}
LOGPROBS_INCLUDE = "message.output_text.logprobs"
MAX_METADATA_PAIRS = 16
# Finished.finish_reason -> the response's status, and the stream's last event (there is no response.cancelled)
_STATUS = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled", "error": "failed"}
_LAST_EVENT = {"completed": "response.completed", "failed": "response.failed"}


@dataclass
class ResponsesBody(GenerationBody):
    """A validated `/v1/responses` body: the chat body it runs as, and what the response object echoes."""

    instructions: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    parallel_tool_calls: bool = True
    tool_choice: str = "auto"
    user: str | None = None
    text_format: dict = field(default_factory=lambda: {"type": "text"})  # echoed as the response's text.format
    tools_echo: list = field(default_factory=list)  # the request's tools, echoed


def parse_responses_json(raw: bytes) -> ResponsesBody:
    """The request body of `POST /v1/responses`, validated."""
    return parse_responses(parse_json_body(raw))


def parse_responses(body: dict) -> ResponsesBody:
    """Validate a `/v1/responses` body (a JSON object)."""
    _ignore_unknown(body, _KNOWN)
    _refuse_unsupported(body)
    common = _parse_common({k: body[k] for k in _SAMPLING if k in body}, chat=True)
    out = ResponsesBody(**{f.name: getattr(common, f.name) for f in fields(GenerationBody)})
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid(f"instructions must be a string, got {_json_type(instructions)}.", "instructions")
    out.instructions = instructions
    system = [{"role": "system", "content": instructions}] if instructions else []
    out.messages = system + _input_messages(body.get("input"))
    out.max_tokens = _int(body, "max_output_tokens", None, lo=1)
    out.metadata = _metadata(body.get("metadata"))
    out.parallel_tool_calls = _bool(body, "parallel_tool_calls", True)
    out.tool_choice = body.get("tool_choice") or "auto"
    out.tools = parse_tools(body, flat=True)
    out.tools_echo = list(body.get("tools") or [])
    out.user = body.get("user")  # a string: _parse_common checked it
    out.structured = parse_text_format(body.get("text"))
    if out.structured is not None:
        out.text_format = body["text"]["format"]
    top = _int(body, "top_logprobs", None, lo=0, hi=MAX_CHAT_TOP_LOGPROBS)
    if LOGPROBS_INCLUDE in _include(body.get("include")) or top is not None:
        out.logprobs = top or 0
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid(f"stream_options must be an object, got {_json_type(options)}.", "stream_options")
    return out


def _refuse_unsupported(body: dict) -> None:
    """Options this server cannot honour: a 400 naming each, never a silent difference."""
    if body.get("previous_response_id") is not None:
        raise invalid("previous_response_id is not supported: this server stores no responses; send the whole "
                      "conversation in input.", "previous_response_id")
    if body.get("conversation") is not None:
        raise invalid("conversation is not supported: this server stores no conversations; send the whole "
                      "conversation in input.", "conversation")
    if body.get("prompt") is not None:
        raise invalid("prompt (stored prompt templates) is not supported; send input and instructions.", "prompt")
    if _bool(body, "store", False):
        raise invalid("store must be false: this server does not store responses for later retrieval.", "store")
    if _bool(body, "background", False):
        raise invalid("background responses are not supported; use stream to see output as it comes.", "background")
    if body.get("truncation") not in (None, "disabled"):
        raise invalid("truncation must be 'disabled': input that does not fit the context is refused, not cut.",
                      "truncation")


def _input_messages(value: Any) -> list[dict]:
    """`input` as chat messages: a string is one user message; a list holds message items."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if value is None:
        raise invalid("you must provide input (a string or a list of input items).", "input")
    if not isinstance(value, list) or not value:
        raise invalid("input must be a string or a non-empty list of input items.", "input")
    messages = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object, got {_json_type(item)}.", where)
        kind = item.get("type", "message")
        if kind == "function_call":  # a call the model made earlier: the assistant's turn (calls in a row: one)
            call = _function_call(item, where)
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        if kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
                raise invalid(f"{where} must hold call_id and output (strings).", where)
            messages.append({"role": "tool", "content": output, "tool_call_id": item["call_id"]})
            continue
        if kind != "message":
            raise invalid(_item_refusal(kind, where), f"{where}.type")
        role = item.get("role")
        if role not in _ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}.", f"{where}.role")
        messages.append({"role": role, "content": _content_text(item.get("content"), f"{where}.content")})
    return messages


def _function_call(item: dict, where: str) -> dict:
    if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str) \
            or not isinstance(item.get("arguments"), str):
        raise invalid(f"{where} must hold call_id, name and arguments (strings).", where)
    [call] = template_tool_calls([{"id": item["call_id"], "function": {"name": item["name"],
                                                                      "arguments": item["arguments"]}}], where)
    return call


def _item_refusal(kind: Any, where: str) -> str:
    if kind in ("custom_tool_call", "custom_tool_call_output"):
        return f"{where}: {kind} items are not supported: only function tools are."
    if kind == "item_reference":
        return f"{where}: item_reference is not supported: this server stores no items; send their content."
    return f"{where}: {kind!r} items are not supported; send messages ({{\"role\", \"content\"}}) with text."


def _content_text(content: Any, where: str) -> str:
    """A message's content as one string: a string, or a list of input_text / output_text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts, got {_json_type(content)}.", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in _MEDIA_PARTS:
            raise invalid(f"{where}[{j}]: {_MEDIA_PARTS[kind]} input ({kind}) is not supported: this server "
                          "serves text-only models.", f"{where}[{j}]")
        else:
            got = repr(kind) if kind is not None else _json_type(part)
            raise invalid(f"{where}[{j}]: only text parts ({{\"type\": \"input_text\", \"text\": ...}}) are "
                          f"supported, got {got}.", f"{where}[{j}]")
    return "".join(texts)


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid("metadata must be an object of string values.", "metadata")
    if len(value) > MAX_METADATA_PAIRS:
        raise invalid(f"metadata holds at most {MAX_METADATA_PAIRS} pairs, got {len(value)}.", "metadata")
    return dict(value)


def _include(value: Any) -> list[str]:
    """`include`: only the output's logprobs mean anything here (there are no tool or reasoning items)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(f"include must be a list of strings, got {_json_type(value)}.", "include")
    return value


def usage_object(usage: Usage) -> dict:
    """The Responses API's usage: input/output/total tokens and their details (no cache, no reasoning)."""
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


class ResponsesShape:
    """The response object of one `/v1/responses` request, whole or as its stream of typed events."""

    def __init__(self, body: ResponsesBody, model: str, tokenizer: Tokenizer, created: int | None = None) -> None:
        self.body = body
        self.model = model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time()) if created is None else created
        self.tokens = TokenText(tokenizer) if body.logprobs is not None else None
        self._sequence = 0
        self._item_sent = False  # output_item.added and content_part.added go out with the first token
        self._logprobs: list[dict] = []
        self._streamed = ""  # the text sent in deltas so far
        self._deltas = 0  # output_text.delta events sent
        # With tools: the text is read for calls; each becomes a function_call item after the message's
        self._tool_stream = ToolCallStream(body.tool_parser) if body.tool_parser else None
        self._split: tuple[str, list[ToolCall]] | None = None

    def _parts(self, finished: Finished) -> tuple[str, list[ToolCall]]:
        """The message's text and the calls made (the same ids every time it is asked)."""
        if self._split is None:
            self._split = (finished.text, [])
            if self.body.tool_parser:
                content, calls = parse_tool_calls(self.body.tool_parser, finished.text)
                if calls:
                    self._split = (content or "", calls)
        return self._split

    # --- whole responses ------------------------------------------------------------------------

    def response(self, finished: Finished, events: list[TokenEvent], prompt: Any = None) -> dict:
        """The non-streamed response object (`prompt`, prompt logprobs, has no place in it)."""
        for event in events:
            self._logprobs.extend(self._token_logprobs(event))
        return self._response(finished)

    def _response(self, finished: Finished | None) -> dict:
        status = "in_progress" if finished is None else _STATUS.get(finished.finish_reason, "failed")
        b = self.body
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
               "background": False, "error": None, "incomplete_details": None, "instructions": b.instructions,
               "max_output_tokens": b.max_tokens, "max_tool_calls": None, "metadata": b.metadata, "model": self.model,
               "output": [], "parallel_tool_calls": b.parallel_tool_calls, "previous_response_id": None,
               "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": b.temperature,
               "text": {"format": b.text_format}, "tool_choice": b.tool_choice, "tools": b.tools_echo,
               "top_logprobs": b.logprobs or 0, "top_p": b.top_p, "truncation": "disabled", "usage": None,
               "user": b.user}
        if finished is None:
            return out
        out["completed_at"] = int(time.time())
        out["usage"] = usage_object(finished.usage)
        if status == "failed":
            out["error"] = {"code": "server_error", "message": f"Generation failed: {finished.error}"}
            return out
        if status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        text, calls = self._parts(finished)
        item_status = "completed" if status == "completed" else "incomplete"
        message = [self._item(item_status, text)] if text or not calls or self._item_sent else []
        out["output"] = message + [self._call_item(c, "completed") for c in calls]
        return out

    @staticmethod
    def _call_item(call: ToolCall, status: str) -> dict:
        return {"id": f"fc_{call.id.removeprefix('call_')}", "type": "function_call", "status": status,
                "call_id": call.id, "name": call.name, "arguments": call.arguments if status == "completed" else ""}

    def _item(self, status: str, text: str | None) -> dict:
        content = [] if text is None else [self._part(text)]
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(self._logprobs)}

    # --- streams ----------------------------------------------------------------------------------

    def start_events(self) -> list[dict]:
        """Sent once the request is admitted, before any token."""
        return [self._event("response.created", response=self._response(None)),
                self._event("response.in_progress", response=self._response(None))]

    def token_events(self, event: TokenEvent) -> list[dict]:
        """The events of one token: at the first, the message item and its text part; then its text delta
        (none while the engine holds the token's text back, unless its logprob was asked for)."""
        logprobs = self._token_logprobs(event)
        self._logprobs.extend(logprobs)
        text = event.text if self._tool_stream is None else self._tool_stream.feed(event.text).get("content", "")
        if not (text or logprobs) and (self._tool_stream is not None or self._item_sent):
            return []  # with tools, the message item opens with its first text: a call alone has none
        out = self._open_item()
        if text or logprobs:
            out.append(self._delta(text, logprobs))
        return out

    def end_events(self, finished: Finished) -> list[dict]:
        """The closing events; the last is response.completed, .incomplete (max_output_tokens), or .failed."""
        final = self._response(finished)
        if final["status"] == "failed":
            return [self._event(_LAST_EVENT["failed"], response=final)]
        text, calls = self._parts(finished)
        out = []
        if text or not calls or self._item_sent:
            out += self._open_item()
            held = text[len(self._streamed):] if text.startswith(self._streamed) else ""
            if held or (self._deltas == 0 and finished.usage.completion_tokens > 0):
                # text the engine still held back when it stopped: the deltas must add up to the whole; and a
                # response that generated tokens has at least one delta, even an empty one (its text was all
                # special tokens): clients such as vllm bench count a stream without any delta as failed
                out.append(self._delta(held, []))
            part = self._part(text)
            out.append(self._event("response.output_text.done", **self._where(), text=text, logprobs=part["logprobs"]))
            out.append(self._event("response.content_part.done", **self._where(), part=part))
            out.append(self._event("response.output_item.done", output_index=0, item=final["output"][0]))
        first = len(final["output"]) - len(calls)
        for index, call in enumerate(calls, start=first):  # each call: announced, its arguments, done
            item_id = final["output"][index]["id"]
            out.append(self._event("response.output_item.added", output_index=index,
                                   item=self._call_item(call, "in_progress")))
            out.append(self._event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                                   delta=call.arguments))
            out.append(self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                   arguments=call.arguments))
            out.append(self._event("response.output_item.done", output_index=index, item=final["output"][index]))
        out.append(self._event(_LAST_EVENT.get(final["status"], "response.incomplete"), response=final))
        return out

    def _delta(self, text: str, logprobs: list[dict]) -> dict:
        self._streamed += text
        self._deltas += 1
        return self._event("response.output_text.delta", **self._where(), delta=text, logprobs=logprobs)

    def _open_item(self) -> list[dict]:
        if self._item_sent:
            return []
        self._item_sent = True
        return [self._event("response.output_item.added", output_index=0, item=self._item("in_progress", None)),
                self._event("response.content_part.added", **self._where(), part=self._part(""))]

    def _where(self) -> dict:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _token_logprobs(self, event: TokenEvent) -> list[dict]:
        if self.tokens is None:
            return []
        top = sorted((event.top_logprobs or {}).items(), key=lambda kv: -kv[1])[:self.body.logprobs]
        return [{**self._entry(event.token_id, event.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in top]}]

    def _entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.tokens.text(token_id), "bytes": self.tokens.bytes(token_id), "logprob": logprob}
