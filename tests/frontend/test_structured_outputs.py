"""Structured outputs (issue 24): every way clients ask for them, enforced by the grammar engine in sampling,
so that even the tiny random model's output always matches (greedy and sampled, whole and streamed); and the
errors a schema or grammar the engine cannot compile gets. An in-process server on a loopback port."""

from __future__ import annotations

import json
import re

import pydantic
import pytest

from .test_api_compat import open_server_fixtures, sse
from .test_server import Server, assert_error, raw

pytestmark = pytest.mark.asyncio(loop_scope="module")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "active": {"type": "boolean"},
}, "required": ["name", "age", "role", "tags", "active"], "additionalProperties": False}


def check_person(value: object) -> None:
    """`value` is an instance of PERSON (written out: the test must not trust the engine's own validator)."""
    assert isinstance(value, dict) and set(value) == {"name", "age", "role", "tags", "active"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 150
    assert value["role"] in ("admin", "user", "guest")
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 6 for t in value["tags"])
    assert isinstance(value["active"], bool)


checkpoint, server = open_server_fixtures("structured", seed=3)


def chat(**extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Describe a user as JSON."}],
            "max_tokens": 200, **extra}


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 1},
                                      {"temperature": 1.5, "seed": 2, "top_p": 0.95}])
async def test_a_json_schema_holds_for_a_random_model_greedy_and_sampled(server: Server, sampling: dict) -> None:
    status, _, out = await raw(server, "POST", "/v1/chat/completions", chat(response_format=SCHEMA_FORMAT, **sampling))
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"  # ended where the grammar accepts, not by running out of tokens
    check_person(json.loads(choice["message"]["content"]))


async def test_without_the_grammar_the_random_model_writes_no_json(server: Server) -> None:
    status, _, out = await raw(server, "POST", "/v1/chat/completions", chat(temperature=0, max_tokens=40))
    assert status == 200
    with pytest.raises((ValueError, AssertionError)):
        check_person(json.loads(out["choices"][0]["message"]["content"]))


async def test_json_object_streamed_and_on_completions(server: Server) -> None:
    _, _, events = await sse(server, "/v1/chat/completions", chat(response_format={"type": "json_object"},
                                                                   temperature=1.0, seed=5, stream=True))
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert isinstance(json.loads(text), dict)
    status, _, out = await raw(server, "POST", "/v1/completions", {
        "model": "tiny", "prompt": "A user:", "max_tokens": 200, "temperature": 0.8, "seed": 3,
        "structured_outputs": {"json": PERSON}})
    assert status == 200, out
    check_person(json.loads(out["choices"][0]["text"]))
    # Together's spelling, which instructor's JSON_SCHEMA mode sends: json_object with the schema beside it
    status, _, out = await raw(server, "POST", "/v1/chat/completions", chat(
        temperature=1.0, seed=4, response_format={"type": "json_object", "schema": PERSON}))
    assert status == 200, out
    check_person(json.loads(out["choices"][0]["message"]["content"]))


@pytest.mark.parametrize("field,value,check", [
    ("structured_outputs", {"regex": r"[A-Z]{2}-\d{3}"}, lambda t: re.fullmatch(r"[A-Z]{2}-\d{3}", t)),
    ("guided_regex", r"(yes|no), because [a-z]{1,8}\.", lambda t: re.fullmatch(r"(yes|no), because [a-z]{1,8}\.", t)),
    ("structured_outputs", {"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ("guided_choice", ["positive", "negative"], lambda t: t in ("positive", "negative")),
    ("guided_json", json.dumps(PERSON), lambda t: check_person(json.loads(t)) is None),
    ("structured_outputs", {"grammar": 'start: "SELECT " COL " FROM t"\nCOL: "a" | "b" | "c"'},
     lambda t: t in ("SELECT a FROM t", "SELECT b FROM t", "SELECT c FROM t")),
])
async def test_vllm_constraints(server: Server, field: str, value, check) -> None:
    status, _, out = await raw(server, "POST", "/v1/chat/completions", chat(temperature=1.0, seed=7, **{field: value}))
    assert status == 200, out
    text = out["choices"][0]["message"]["content"]
    assert check(text), text


async def test_the_responses_api_text_format(server: Server) -> None:
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    status, _, out = await raw(server, "POST", "/v1/responses", {"model": "tiny", "input": "A user as JSON.",
                                                                 "max_output_tokens": 200, "text": {"format": fmt}})
    assert status == 200, out
    assert out["text"]["format"] == fmt
    check_person(json.loads(out["output"][0]["content"][0]["text"]))


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=150)
    admin: bool


async def test_the_openai_sdks_parse_with_a_pydantic_model(server: Server) -> None:
    completion = await server.client().chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": "Who?"}], response_format=Person, max_tokens=120,
        temperature=0)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 150


@pytest.mark.parametrize("body,param", [
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}), "response_format.json_schema.schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}),
     "response_format.json_schema.schema"),
    (chat(response_format={"type": "xml"}), "response_format.type"),
    (chat(structured_outputs={"regex": "(unclosed"}), "structured_outputs.regex"),
    (chat(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
    (chat(guided_choice=[]), "guided_choice"),
    (chat(structured_outputs={"grammar": "start: undefined_rule"}), "structured_outputs.grammar"),
    (chat(response_format={"type": "json_object"}, guided_regex="a+"), "guided_regex"),
    (chat(guided_json="{not json"), "guided_json"),
])
async def test_what_the_engine_cannot_compile_is_a_400_naming_the_field(server: Server, body: dict, param: str) -> None:
    status, _, out = await raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400, out
    assert_error(out, "invalid_request_error", param)


async def test_a_bad_text_format_on_the_responses_api(server: Server) -> None:
    status, _, out = await raw(server, "POST", "/v1/responses", {
        "model": "tiny", "input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": "nope"}}})
    assert status == 400
    assert_error(out, "invalid_request_error", "text.format.schema")


async def test_fields_come_in_the_schemas_order(server: Server) -> None:
    # Order matters to models: a "reasoning" field before the "answer" is chain of thought; after it, not.
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    status, _, out = await raw(server, "POST", "/v1/chat/completions", chat(
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}))
    assert status == 200, out
    assert list(json.loads(out["choices"][0]["message"]["content"])) == ["zeta", "alpha"]


async def test_objects_are_closed_to_undeclared_fields_unless_the_schema_opens_them() -> None:
    from faasmoe.engine.structured import strict_objects

    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"a": {"type": "string"}}},  # a field named "properties"
        "open": {"type": "object", "properties": {"b": {}}, "additionalProperties": True},
        "c": {"const": {"properties": 1}}},
        "$defs": {"T": {"type": "object", "properties": {"d": {}}}},
        "anyOf": [{"properties": {"e": {}}}]}
    closed = strict_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["properties"]["properties"]  # names, not a schema
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["properties"]["c"] == {"const": {"properties": 1}}
    assert closed["$defs"]["T"]["additionalProperties"] is False and closed["anyOf"][0]["additionalProperties"] is False
    both = {"allOf": [{"properties": {"f": {}}}, {"properties": {"g": {}}}], "properties": {"h": {}}}
    assert strict_objects(both) == both  # closing a conjunction's parts would make it unsatisfiable


async def test_a_model_writes_only_the_declared_fields(server: Server) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}  # open by the spec
    for seed in range(4):
        status, _, out = await raw(server, "POST", "/v1/chat/completions", chat(
            temperature=1.0, seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "o",
                                                                                                   "schema": schema}}))
        assert status == 200, out
        assert list(json.loads(out["choices"][0]["message"]["content"])) == ["ok"]


async def test_a_schema_nested_too_deep_is_a_400_not_a_crash(server: Server) -> None:
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}}
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}
    status, _, out = await raw(server, "POST", "/v1/chat/completions", chat(response_format=fmt))
    assert status == 400, out
    assert_error(out, "invalid_request_error", "response_format.json_schema.schema")
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    status, _, out = await raw(server, "POST", "/v1/chat/completions", chat(tools=[tool], tool_choice="required"))
    assert status == 400, out
    assert_error(out, "invalid_request_error", "tools[0].function.parameters")
    status, _, out = await raw(server, "POST", "/v1/chat/completions", chat(response_format=SCHEMA_FORMAT))
    assert status == 200  # the server lives on
