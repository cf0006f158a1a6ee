"""The tool-call parsers on text (issue 24): each family's format read whole, and streamed however the text is
cut: the stream's content and calls (names, arguments joined from their pieces) are the whole text's."""

from __future__ import annotations

import json

import pytest

from faasmoe.api.tool_parsers import ToolCallStream, parse_tool_calls

HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "add_user", "arguments": {"name": "a}b\\"{", "tags": ["x"]}}\n</tool_call>')
MISTRAL = ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}, '
           '{"name": "add_user", "arguments": {"nested": {"deep": [1, {"k": "}"}]}}}]')


@pytest.mark.parametrize("parser,text", [("hermes", HERMES), ("mistral", MISTRAL)])
@pytest.mark.parametrize("cut", [1, 2, 3, 7, 1000])
def test_a_stream_cut_anywhere_gives_the_whole_texts_calls(parser: str, text: str, cut: int) -> None:
    content, calls = parse_tool_calls(parser, text)
    assert [c.name for c in calls] == ["get_weather", "add_user"]
    stream, streamed_content, names, arguments = ToolCallStream(parser), "", {}, {}
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
    for i, piece in enumerate(pieces):
        delta = stream.feed(piece, final=i == len(pieces) - 1)
        streamed_content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                names[call["index"]] = call["function"]["name"]
            arguments[call["index"]] = arguments.get(call["index"], "") + call["function"]["arguments"]
    assert streamed_content.strip() == (content or "")
    assert [names[i] for i in sorted(names)] == [c.name for c in calls]
    assert [json.loads(arguments[i]) for i in sorted(arguments)] == [json.loads(c.arguments) for c in calls]


def test_text_without_a_well_formed_call_is_content() -> None:
    for text in ("plain words", "<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{\"name\": \"f\""):
        assert parse_tool_calls("hermes", text) == (text, [])


@pytest.mark.parametrize("parser,text", [("hermes", HERMES), ("mistral", MISTRAL)])
def test_a_text_cut_inside_its_second_call_keeps_the_first(parser: str, text: str) -> None:
    cut = text[:text.index('"add_user"') + 12]  # max_tokens ran out inside the second call
    content, calls = parse_tool_calls(parser, cut)
    assert [c.name for c in calls] == ["get_weather"] and json.loads(calls[0].arguments)["city"] in ("Paris", "Oslo")
    assert content == ("Let me check." if parser == "hermes" else None)


@pytest.mark.parametrize("cut", [1, 5, 1000])
def test_objects_that_are_no_call_or_name_their_keys_otherwise_keep_the_calls_apart(cut: int) -> None:
    # auto mode is not held by a grammar: a model may write arguments before the name, or junk in the tags
    text = ('<tool_call>\n{"note": {"x": 1}}\n</tool_call>\n<tool_call>\n{"arguments": {"city": "Rome"}, '
            '"name": "get_weather"}\n</tool_call>\n<tool_call>\n{"name": "add_user", "arguments": {"a": [1]}}\n'
            '</tool_call>')
    stream, calls = ToolCallStream("hermes"), {}
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
    for i, piece in enumerate(pieces):
        for call in stream.feed(piece, final=i == len(pieces) - 1).get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": None, "arguments": ""})
            entry["name"] = call["function"].get("name", entry["name"])
            entry["arguments"] += call["function"]["arguments"]
    want = [("get_weather", {"city": "Rome"}), ("add_user", {"a": [1]})]
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == want
    assert [(c.name, json.loads(c.arguments)) for c in parse_tool_calls("hermes", text)[1]] == want  # whole: the same
