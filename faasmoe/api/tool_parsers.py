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
    """Where a family's calls start in its output, and how they sit there."""

    start: str  # before the calls (hermes: before each)
    end: str | None  # after each call (hermes; the forced-call grammar writes it), or None (mistral)
    array: bool  # the calls are a JSON array after `start` (mistral), not objects one after another
    special: bool = False  # `start` is a control token in the family's real vocabularies: keep its text


MARKERS = {"hermes": Markers("<tool_call>", "</tool_call>", array=False),
           "mistral": Markers("[TOOL_CALLS]", None, array=True, special=True)}


def _parse_call(text: str) -> ToolCall | None:
    try:
        return _call_of(json.loads(text))
    except json.JSONDecodeError:
        return None


def _call_of(item: object) -> ToolCall | None:
    """A parsed {"name", "arguments"} object as a call (arguments as JSON text); None if it is not one."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    return ToolCall(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))




def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole generated text, read as a stream reads it: the complete call objects after
    the first marker (a text cut short by max_tokens keeps those before the cut; an object that is no call is
    skipped); with none, no calls and the text as content."""
    markers = MARKERS[parser]
    at = text.find(markers.start)
    if at < 0:
        return text, []
    scanner = _ObjectScanner(base=1 if markers.array else 0)
    scanner.feed(text, at)
    calls = [call for obj in scanner.objects if obj.end is not None
             and (call := _parse_call(text[obj.start:obj.end])) is not None]
    return ((text[:at].strip() or None), calls) if calls else (text, [])


@dataclass
class _Object:
    """One top-level object of the calls region: where it starts, ends (None: not yet) and where its first
    container value closes (the arguments', after a string name)."""

    start: int
    end: int | None = None
    first_value_end: int | None = None


class _ObjectScanner:
    """Finds the call objects of a growing text, reading each character once: brackets outside JSON strings.
    `base` is the depth the objects sit at (1 inside mistral's array)."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.objects: list[_Object] = []
        self._pos = 0
        self._depth = 0
        self._in_string = self._escape = False

    def feed(self, text: str, begin: int) -> None:
        """Scan what `text` gained since the last call (from `begin` at the first)."""
        depth, in_string, escape = self._depth, self._in_string, self._escape
        current = self.objects[-1] if self.objects and self.objects[-1].end is None else None
        for i in range(max(self._pos, begin), len(text)):
            ch = text[i]
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
                if ch == "{" and depth == self.base:
                    current = _Object(i)
                    self.objects.append(current)
                depth += 1
            elif ch in "}]":
                depth -= 1
                if current is not None and depth == self.base + 1 and current.first_value_end is None:
                    current.first_value_end = i + 1
                elif current is not None and depth == self.base and ch == "}":
                    current.end = i + 1
                    current = None
        self._pos, self._depth, self._in_string, self._escape = len(text), depth, in_string, escape


@dataclass
class _Streamed:
    """A call being streamed: its OpenAI index, id and where its arguments start; what of them went out."""

    index: int
    id: str
    args_start: int
    sent: int = 0
    done: bool = False


class ToolCallStream:
    """Feeds generated text deltas; gives OpenAI chat deltas: content, and tool_calls entries. Each character is
    scanned once (the marker search and the object scan go on where they stopped)."""

    def __init__(self, parser: str) -> None:
        self.markers = MARKERS[parser]
        self.text = ""  # everything generated so far
        self.sent_content = 0  # chars of the content streamed
        self.calls_at: int | None = None  # where the calls region starts in text
        self._searched = 0  # no marker starts before this
        self._scanner = _ObjectScanner(base=1 if self.markers.array else 0)
        self._slots: list[_Streamed | None] = []  # per object of the region: its call, None if it is none
        self.calls = 0  # calls announced

    @property
    def called(self) -> bool:
        return self.calls > 0

    def feed(self, delta: str, final: bool = False) -> dict:
        """The delta object for this text (may be empty: {}); `final` at the end of the stream."""
        self.text += delta
        out: dict = {}
        if self.calls_at is None:
            at = self.text.find(self.markers.start, self._searched)
            if at >= 0:
                self.calls_at = at
                safe = at
            else:  # hold back a tail that could be the start of the marker
                self._searched = max(0, len(self.text) - len(self.markers.start) + 1)
                safe = len(self.text) if final else self._safe_content_end()
            content = self.text[self.sent_content:safe]
            if self.calls_at is not None:
                content = content.rstrip() if self.sent_content < safe else content
            if content:
                out["content"] = content
            self.sent_content = max(self.sent_content, safe)
        if self.calls_at is not None:
            self._scanner.feed(self.text, self.calls_at)
            pieces = self._call_deltas()
            if pieces:
                out["tool_calls"] = pieces
        return out

    def _safe_content_end(self) -> int:
        marker = self.markers.start
        for keep in range(min(len(marker) - 1, len(self.text)), 0, -1):
            if marker.startswith(self.text[-keep:]):
                return len(self.text) - keep
        return len(self.text)

    def _call_deltas(self) -> list[dict]:
        deltas = []
        for k, obj in enumerate(self._scanner.objects):
            if k == len(self._slots):
                self._slots.append(None)
            slot = self._slots[k] or self._announce(k, obj, deltas)
            if slot is None or slot.done:
                continue
            if obj.end is not None:  # complete: its arguments end before the object's closing brace
                args = self.text[slot.args_start:obj.end - 1].rstrip()
                slot.done = True
            elif obj.first_value_end is not None:
                args = self.text[slot.args_start:obj.first_value_end]
            else:  # still open: trailing blanks may be what precedes the object's end
                args = self.text[slot.args_start:].rstrip()
            if len(args) > slot.sent:
                deltas.append({"index": slot.index, "function": {"arguments": args[slot.sent:]}})
                slot.sent = len(args)
        return deltas

    def _announce(self, k: int, obj: _Object, deltas: list[dict]) -> _Streamed | None:
        """A call's id, type and name as soon as its head ("name", then "arguments") is there. An object that
        completes without that head is sent whole if it is a call (its keys in another order), else skipped."""
        head = _CALL_HEAD.match(self.text, obj.start)
        if head is not None:
            slot = self._slots[k] = _Streamed(self.calls, call_id(), head.end())
            self._open(slot, json.loads(f'"{head.group(1)}"'), deltas)
            return slot
        if obj.end is None:
            return None  # not yet
        self._slots[k] = _SEEN
        call = _parse_call(self.text[obj.start:obj.end])
        if call is not None:
            index = self._open(_Streamed(self.calls, call.id, 0), call.name, deltas)
            deltas.append({"index": index, "function": {"arguments": call.arguments}})
        return None

    def _open(self, slot: _Streamed, name: str, deltas: list[dict]) -> int:
        self.calls += 1
        deltas.append({"index": slot.index, "id": slot.id, "type": "function",
                       "function": {"name": name, "arguments": ""}})
        return slot.index


_SEEN = _Streamed(-1, "", 0, done=True)  # an object of the calls region that is no call
