"""What agent clients do, through the OpenAI SDK (issue 24's done-when), against the tiny random model: 100 of 100
`parse` calls give objects that validate, 100 of 100 `tool_choice="required"` calls give calls whose arguments
validate against their tool's schema, a tool round trip (call -> result -> answer) works, and the SDK's own stream
helper reassembles streamed calls into what the non-streamed answer holds."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import pydantic
import pytest

from .test_api_compat import open_server_fixtures
from .test_server import Server
from .test_tool_calls import ADD_USER, CHECKS, WEATHER

pytestmark = pytest.mark.asyncio(loop_scope="module")
CALLS = 100
AT_ONCE = 20  # in flight together: they batch in the engine


class Ticket(pydantic.BaseModel):
    title: str = pydantic.Field(max_length=16)
    priority: int = pydantic.Field(ge=1, le=5)
    labels: list[Annotated[str, pydantic.StringConstraints(max_length=8)]] = pydantic.Field(max_length=3)
    urgent: bool


checkpoint, server = open_server_fixtures("agents", seed=6)


async def in_waves(make, count: int) -> list:
    out = []
    for first in range(0, count, AT_ONCE):
        out += await asyncio.gather(*(make(i) for i in range(first, min(count, first + AT_ONCE))))
    return out


async def test_100_of_100_parse_calls_validate(server: Server) -> None:
    client = server.client()

    async def parse(i: int):
        return await client.chat.completions.parse(
            model="tiny", messages=[{"role": "user", "content": f"File ticket {i}."}], response_format=Ticket,
            max_tokens=400, temperature=1.0, seed=i)

    completions = await in_waves(parse, CALLS)
    parsed = [c.choices[0].message.parsed for c in completions]
    assert sum(isinstance(p, Ticket) for p in parsed) == CALLS
    assert len({p.model_dump_json() for p in parsed}) > CALLS // 2  # sampled: really 100 different answers


async def test_100_of_100_required_calls_validate_and_streams_agree(server: Server) -> None:
    client = server.client()
    tools = [WEATHER, ADD_USER]

    async def call(i: int):
        return await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Task {i}."}], tools=tools, tool_choice="required",
            parallel_tool_calls=False, max_tokens=400, temperature=1.0, seed=i)

    completions = await in_waves(call, CALLS)
    valid = 0
    for c in completions:
        [tool_call] = c.choices[0].message.tool_calls
        CHECKS[tool_call.function.name](json.loads(tool_call.function.arguments))
        valid += 1
    assert valid == CALLS
    for i in range(0, CALLS, 10):  # the SDK's stream helper reassembles the same calls
        async with client.chat.completions.stream(
                model="tiny", messages=[{"role": "user", "content": f"Task {i}."}], tools=tools,
                tool_choice="required", parallel_tool_calls=False, max_tokens=400, temperature=1.0, seed=i) as stream:
            final = await stream.get_final_completion()
        [streamed] = final.choices[0].message.tool_calls
        [whole] = completions[i].choices[0].message.tool_calls
        assert (streamed.function.name, json.loads(streamed.function.arguments)) == \
            (whole.function.name, json.loads(whole.function.arguments))
        assert final.choices[0].finish_reason == "tool_calls"


async def test_a_tool_round_trip(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    first = await client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER],
                                                 tool_choice="required", parallel_tool_calls=False, max_tokens=200,
                                                 temperature=0)
    [call] = first.choices[0].message.tool_calls
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 3})}]
    answer = await client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                                  max_tokens=8, temperature=0)  # the tools stay in the prompt
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were in the prompt
