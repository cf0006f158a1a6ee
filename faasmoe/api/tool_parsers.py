"""Tool calls in generated text, per model family (vLLM's `--tool-call-parser`), whole and streamed.

    hermes    Qwen2.5 / Qwen3 (and the families whose templates follow them): each call is
              <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>
    mistral   Mistral / Mixtral: [TOOL_CALLS] then a JSON array of {"name": ..., "arguments": {...}}

Text before the first call is the message's content. A stream gives the content as it comes, then each call
as OpenAI streams it: its id, type and name first, then its arguments in pieces (the raw JSON text of the
arguments as generated, so the pieces join to exactly the final `arguments`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

PARSERS = ("hermes", "mistral")
DEFAULT_PARSER = {"qwen2_moe": "hermes", "qwen3_moe": "hermes", "olmoe": "hermes", "mixtral": "mistral"}
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=call_id)

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Markers:
    """Where calls start and end in a family's output."""

    start: str  # before the calls (hermes: before each call)
    end: str | None  # after each call (hermes), or None: the calls run to the end of the text (mistral)
    array: bool  # the calls are a JSON array after `start`
    special: bool = False  # `start` is a control token in the family's real vocabularies: keep its text

    def split(self, text: str) -> tuple[str, list[ToolCall]] | None:
        """(content, calls) of a whole text; None when it holds no well-formed call."""
        at = text.find(self.start)
        if at < 0:
            return None
        content, rest = text[:at], text[at:]
        calls = []
        try:
            if self.array:
                value = json.loads(rest[len(self.start):])
                items = value if isinstance(value, list) else [value]
            else:
                bodies = re.findall(re.escape(self.start) + r"(.*?)" + re.escape(self.end), rest, re.DOTALL)
                leftover = re.sub(re.escape(self.start) + r".*?" + re.escape(self.end), "", rest, flags=re.DOTALL)
                if not bodies or leftover.strip():
                    return None
                items = [json.loads(b) for b in bodies]
            for item in items:
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    return None
                arguments = item.get("arguments", item.get("parameters", {}))
                calls.append(ToolCall(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                                                          ensure_ascii=False)))
        except json.JSONDecodeError:
            return None
        return content, calls


MARKERS = {"hermes": Markers("<tool_call>", "</tool_call>", array=False),
           "mistral": Markers("[TOOL_CALLS]", None, array=True, special=True)}


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole generated text: no calls (and the text as content) unless they parse. A text
    cut short (max_tokens) inside a later call keeps the calls complete before the cut, as a stream gave them."""
    found = MARKERS[parser].split(text) or _complete_calls(parser, text)
    if found is None:
        return text, []
    content, calls = found
    return (content.strip() or None), calls


def _complete_calls(parser: str, text: str) -> tuple[str, list[ToolCall]] | None:
    """The calls whose objects are complete, in a text whose last call was cut; None if there are none."""
    stream = ToolCallStream(parser)
    stream.feed(text, final=True)
    if stream.calls_at is None:
        return None
    calls = []
    for obj, complete in stream._objects(final=True):
        if not complete:
            break
        try:
            item = json.loads(obj)
        except json.JSONDecodeError:
            return None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        calls.append(ToolCall(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                                                  ensure_ascii=False)))
    return (text[:stream.calls_at], calls) if calls else None


class ToolCallStream:
    """Feeds generated text deltas; gives OpenAI chat deltas: content, and tool_calls entries."""

    def __init__(self, parser: str) -> None:
        self.markers = MARKERS[parser]
        self.text = ""  # everything generated so far
        self.sent_content = 0  # chars of the content streamed
        self.calls_at: int | None = None  # where the calls region starts in text
        self.calls: list[dict] = []  # per call: id, name, args_sent (chars of raw arguments streamed)

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def feed(self, delta: str, final: bool = False) -> dict:
        """The delta object for this text (may be empty: {}); `final` at the end of the stream."""
        self.text += delta
        out: dict = {}
        if self.calls_at is None:
            at = self.text.find(self.markers.start)
            if at >= 0:
                self.calls_at = at
                safe = at
            else:  # hold back a tail that could be the start of the marker
                safe = len(self.text) if final else self._safe_content_end()
            content = self.text[self.sent_content:safe]
            if self.calls_at is not None:
                content = content.rstrip() if self.sent_content < safe else content
            if content:
                out["content"] = content
            self.sent_content = max(self.sent_content, safe)
        if self.calls_at is not None:
            pieces = self._call_deltas(final)
            if pieces:
                out["tool_calls"] = pieces
        return out

    def _safe_content_end(self) -> int:
        marker = self.markers.start
        for keep in range(min(len(marker) - 1, len(self.text)), 0, -1):
            if marker.startswith(self.text[-keep:]):
                return len(self.text) - keep
        return len(self.text)

    def _call_deltas(self, final: bool) -> list[dict]:
        deltas = []
        for index, (obj, complete) in enumerate(self._objects(final)):
            head = _CALL_HEAD.match(obj)
            if head is None:
                continue
            if index >= len(self.calls):
                name = json.loads(f'"{head.group(1)}"')
                self.calls.append({"id": call_id(), "name": name, "args_sent": 0})
                deltas.append({"index": index, "id": self.calls[index]["id"], "type": "function",
                               "function": {"name": name, "arguments": ""}})
            args = _arguments_text(obj[head.end():], complete)
            call = self.calls[index]
            if len(args) > call["args_sent"]:
                deltas.append({"index": index, "function": {"arguments": args[call["args_sent"]:]}})
                call["args_sent"] = len(args)
        return deltas

    def _objects(self, final: bool) -> list[tuple[str, bool]]:
        """The call objects in the calls region so far: (text, complete)."""
        region = self.text[self.calls_at:]
        out = []
        start = None
        base = 1 if self.markers.array else 0  # mistral's objects sit inside the array
        for i, ch, depth in _brackets(region):
            if ch == "{" and depth == base + 1:
                start = i
            elif ch == "}" and depth == base and start is not None:
                out.append((region[start:i + 1], True))
                start = None
        if start is not None:
            out.append((region[start:], False))
        return out


def _brackets(text: str):
    """(index, bracket, depth after it) of every bracket of `text` outside JSON strings."""
    depth, in_string, escape = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            yield i, ch, depth
        elif ch in "}]":
            depth -= 1
            yield i, ch, depth


def _arguments_text(rest: str, complete: bool) -> str:
    """The raw arguments JSON within the text after `"arguments":` of one call object: all of it once the
    object is complete (less its closing brace), and while it is not, what cannot be the object's end."""
    if complete:
        return rest[:rest.rfind("}")].rstrip()
    for i, ch, depth in _brackets(rest):  # the arguments value ends where its brackets close
        if ch in "}]" and depth == 0:
            return rest[:i + 1]
    return rest.rstrip()
