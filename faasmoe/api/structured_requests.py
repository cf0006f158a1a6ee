"""The request fields that constrain output, in every spelling clients send them, to one `StructuredOutput`.

    response_format        OpenAI chat (and vLLM completions): {"type": "text" | "json_object" | "json_schema",
                           "json_schema": {"name", "schema", "strict"}}
    text.format            the Responses API: {"type": "text" | "json_object" | "json_schema", "name", "schema",
                           "strict"}
    structured_outputs     vLLM's: {"json": schema, "regex": str, "choice": [str], "grammar": str,
                           "json_object": true}, one of them
    guided_json, guided_regex, guided_choice, guided_grammar       vLLM's older names for the same

At most one constraint per request: two are a 400 naming the second.
"""

from __future__ import annotations

from typing import Any

from faasmoe.engine.structured import StructuredOutput, StructuredOutputError

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
VLLM_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
              "json_object": "json_object"}
# vLLM options that steer its own backends; accepted and ignored (llguidance serves every request here).
IGNORED = ("guided_decoding_backend", "guided_whitespace_pattern")
FIELDS = ("response_format", "structured_outputs", *GUIDED, *IGNORED)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


def _format(fmt: Any, param: str, schema_of) -> StructuredOutput | None:
    """An OpenAI format object ({"type": ...}); `schema_of(fmt)` finds its (schema, where) for json_schema."""
    if not isinstance(fmt, dict):
        raise StructuredOutputError(f"{param} must be an object, got {_type_name(fmt)}.", param)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":  # with a "schema" beside it (Together's, instructor's JSON_SCHEMA mode): that schema
        if fmt.get("schema") is not None:
            return StructuredOutput.json_schema(fmt["schema"], f"{param}.schema")
        return StructuredOutput("json_object", "", param)
    if kind == "json_schema":
        schema, where = schema_of(fmt)
        if schema is None:  # OpenAI requires a schema with strict; without one any JSON object is valid
            return StructuredOutput("json_object", "", param)
        return StructuredOutput.json_schema(schema, where)
    raise StructuredOutputError(f"{param}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
                                f"{param}.type" if kind is not None else param)


def _chat_schema(fmt: dict) -> tuple[Any, str]:
    inner = fmt.get("json_schema")
    if not isinstance(inner, dict):
        raise StructuredOutputError("response_format.json_schema must be an object with name and schema.",
                                    "response_format.json_schema")
    return inner.get("schema"), "response_format.json_schema.schema"


def _responses_schema(fmt: dict) -> tuple[Any, str]:
    return fmt.get("schema"), "text.format.schema"


def _vllm(value: Any) -> StructuredOutput:
    if not isinstance(value, dict):
        raise StructuredOutputError(f"structured_outputs must be an object, got {_type_name(value)}.",
                                    "structured_outputs")
    given = [k for k in VLLM_KINDS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise StructuredOutputError(f"structured_outputs must hold exactly one of {', '.join(VLLM_KINDS)}"
                                    f"{'' if not given else ', got ' + ', '.join(given)}.", "structured_outputs")
    key = given[0]
    return _one(VLLM_KINDS[key], value[key], f"structured_outputs.{key}")


def _one(kind: str, value: Any, param: str) -> StructuredOutput:
    if kind == "json_schema":
        return StructuredOutput.json_schema(value, param)
    if kind == "choice":
        return StructuredOutput.choice(value, param)
    if kind == "json_object":
        return StructuredOutput("json_object", "", param)
    if not isinstance(value, str) or not value:
        raise StructuredOutputError(f"{param} must be a non-empty string.", param)
    return StructuredOutput(kind, value, param)


def parse_structured(body: dict) -> StructuredOutput | None:
    """The constraint of a chat or completions body, if any."""
    found: list[StructuredOutput] = []
    if body.get("response_format") is not None:
        fmt = _format(body["response_format"], "response_format", _chat_schema)
        if fmt is not None:
            found.append(fmt)
    if body.get("structured_outputs") is not None:
        found.append(_vllm(body["structured_outputs"]))
    for name in GUIDED:
        if body.get(name) is not None:
            found.append(_one({"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                               "guided_grammar": "grammar"}[name], body[name], name))
    if len(found) > 1:
        raise StructuredOutputError(f"{found[1].param} and {found[0].param} both constrain the output; send one.",
                                    found[1].param)
    return found[0] if found else None


def parse_text_format(text: Any) -> StructuredOutput | None:
    """The Responses API's `text` object: its format's constraint, if any."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise StructuredOutputError(f"text must be an object, got {_type_name(text)}.", "text")
    fmt = text.get("format")
    return None if fmt is None else _format(fmt, "text.format", _responses_schema)
