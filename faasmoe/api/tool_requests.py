"""Tools in a request: validated, handed to the chat template, and for `required` or a named function
enforced by a grammar, so that even a random model answers with a call whose arguments match the schema.

    tools                 [{"type": "function", "function": {"name", "description", "parameters", "strict"}}]
                          (the Responses API's flat {"type": "function", "name", ...} is read the same)
    tool_choice           "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
                          (Responses: {"type": "function", "name"})
    parallel_tool_calls   false: at most one call
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from faasmoe.api.tool_parsers import MARKERS
from faasmoe.engine.structured import StructuredOutput, StructuredOutputError, strict_objects

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CHOICES = ("none", "auto", "required")
# Calls one forced answer may hold with parallel_tool_calls: a bound, so that a model that would repeat a call
# forever (a small or random one does) ends where a client can still read every call.
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[dict, ...]  # chat-format tool objects, as the template takes them
    choice: str  # none | auto | required | function
    function: str | None  # the name, when choice is "function"
    parallel: bool

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")


def _tool(item: Any, where: str, flat: bool) -> dict:
    if not isinstance(item, dict) or item.get("type") != "function":
        raise StructuredOutputError(f"{where} must be {{\"type\": \"function\", ...}}: only function tools are supported.", where)
    fn = item if flat else item.get("function")
    if not isinstance(fn, dict):
        raise StructuredOutputError(f"{where}.function must be an object with a name.", f"{where}.function")
    prefix = where if flat else f"{where}.function"
    name = fn.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise StructuredOutputError(f"{prefix}.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}.",
                                    f"{prefix}.name")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise StructuredOutputError(f"{prefix}.parameters must be a JSON schema of an object (type \"object\").",
                                    f"{prefix}.parameters")
    strict_objects(params, f"{prefix}.parameters")  # its depth checked here: the forced grammar closes it later
    out = {"name": name, "parameters": params}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    return {"type": "function", "function": out}


def parse_tools(body: dict, flat: bool = False) -> ToolRequest | None:
    """The request's tools and tool choice (None: no tools); `flat` for the Responses API's shapes."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise StructuredOutputError("tool_choice needs tools: send the functions the model may call.", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise StructuredOutputError("tools must be a list of function tools.", "tools")
    parsed = tuple(_tool(t, f"tools[{i}]", flat) for i, t in enumerate(tools))
    names = [t["function"]["name"] for t in parsed]
    if len(set(names)) != len(names):
        raise StructuredOutputError("tools name a function twice.", "tools")
    function = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice if flat else choice.get("function")
        function = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or function not in names:
            raise StructuredOutputError(f"tool_choice names a function that is not in tools: {function!r}.", "tool_choice")
        choice = "function"
    elif choice not in CHOICES:
        raise StructuredOutputError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}.",
                                    "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise StructuredOutputError("parallel_tool_calls must be a boolean.", "parallel_tool_calls")
    return ToolRequest(parsed, choice, function, parallel)


def call_schema(tool: dict) -> dict:
    """The JSON schema of one call of `tool`: its name, then arguments of its parameters' schema."""
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": strict_objects(fn["parameters"])},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_grammar(request: ToolRequest, parser: str, marker_id: int | None = None) -> StructuredOutput:
    """A grammar that admits only well-formed calls in `parser`'s format: of the named function, or (required)
    of any tool; one call, or with parallel_tool_calls several. `marker_id`: the id of the format's start
    marker where the vocabulary holds it as a special token (the grammar names it by id, not by text)."""
    tools = [t for t in request.tools if request.choice != "function" or t["function"]["name"] == request.function]
    schemas = [call_schema(t) for t in tools]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    options = {"x-guidance": {"whitespace_flexible": False}}
    markers = MARKERS[parser]
    if markers.array:
        array = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if request.parallel else 1,
                 **options}
        start = f"<[{marker_id}]>" if marker_id is not None else json.dumps(markers.start)
        lark = f"start: {start} %json {json.dumps(array)}"
    else:
        head, tail = json.dumps(markers.start + "\n"), json.dumps("\n" + markers.end)
        calls = MAX_PARALLEL_CALLS if request.parallel else 1
        # calls_1: call ("\n" calls_2)?, ..., calls_N: call -- at most N calls
        rules = [f'calls_{i}: call ("\\n" calls_{i + 1})?' for i in range(1, calls)] + [f"calls_{calls}: call"]
        lark = "\n".join(["start: calls_1", *rules, f"call: {head} %json {json.dumps({**one, **options})} {tail}"])
    return StructuredOutput("grammar", lark, "tools")


def template_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls as chat templates read them (arguments as objects where they parse)."""
    if not isinstance(calls, list) or not calls:
        raise StructuredOutputError(f"{where} must be a non-empty list of tool calls.", where)
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise StructuredOutputError(f"{where}[{i}] must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                        "\"arguments\"}}}}.", f"{where}[{i}]")
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # the template shows the text as it was sent
        out.append({"id": call.get("id", ""), "type": "function", "function": {"name": fn["name"],
                                                                               "arguments": arguments}})
    return out
