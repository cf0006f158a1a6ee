"""Batched prompts on `/v1/completions` against a real `faasmoe serve` (one worker process): `prompt` as a list
of token-id lists (what lm-eval's `local-completions --batch_size 4` sends) or of strings, one choice per prompt
and choice (index = prompt x n + choice), usage summed, each prompt its own engine request and ledger row.

Tenants from a TOML config: acme (no limits) and tight (two requests in flight at most).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from faasmoe.api.openai_requests import GenerationBody, parse_completion
from faasmoe.model.tokenizer import Tokenizer

from ..processes import free_port, serving
from .test_clients import MODEL, lm_eval_payload, model_dir  # noqa: F401  (model_dir: the fixture)

KEYS = {"acme": "fm-acme-batch-0123456789abcdefghijklmnopq", "tight": "fm-tight-batch-0123456789abcdefghijklmno"}
QUESTIONS = ["Question: What is the capital of France?\nAnswer:", "Question: Which planet is largest?\nAnswer:"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):  # noqa: F811  (the imported fixture)
    root = tmp_path_factory.mktemp("batched-serve")
    port = free_port()
    config = root / "faasmoe.toml"
    config.write_text(
        f'[server]\nport = {port}\nworkers = 1\nstate = "{root / "state.db"}"\n\n'
        f'[[models]]\nname = "{MODEL}"\npath = "{model_dir}"\nexpert_block_size = 4\n\n'
        f'[[tenants]]\nname = "acme"\nmodels = ["*"]\napi_keys = ["{KEYS["acme"]}"]\n\n'
        f'[[tenants]]\nname = "tight"\nmodels = ["*"]\nmax_concurrent = 2\napi_keys = ["{KEYS["tight"]}"]\n')
    proc = serving(port, "--config", str(config))
    yield proc
    assert proc.stop() == 0, proc.output


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:  # noqa: F811
    return Tokenizer.from_pretrained(model_dir)


def client(server, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def post(server, body: dict, tenant: str = "acme") -> tuple[int, dict]:
    request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {KEYS[tenant]}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def ledger(server, tenant: str = "acme") -> dict:
    """The tenant's usage totals for the model: requests and tokens."""
    request = urllib.request.Request(server.url + "/v1/usage", headers={"Authorization": f"Bearer {KEYS[tenant]}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        rows = [r for r in json.loads(response.read())["data"] if r["model"] == MODEL]
    return {k: sum(r[k] for r in rows) for k in ("requests", "prompt_tokens", "completion_tokens")}


def test_an_lm_eval_batch_of_four_equals_four_single_requests(server, tokenizer) -> None:
    context = tokenizer.encode(QUESTIONS[0])
    batch = [context + tokenizer.encode(text) for text in (" Paris", " Berlin", " Madrid", " Rome")]
    singles = [client(server).completions.create(**lm_eval_payload(ids)) for ids in batch]
    before = ledger(server)
    status, out = post(server, {**lm_eval_payload(batch[0]), "prompt": batch})  # exactly as lm-eval sends it
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for choice, single, ids in zip(out["choices"], singles, batch):
        want = single.choices[0]
        assert choice["text"] == want.text and choice["logprobs"]["tokens"] == want.logprobs.tokens
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1 and choice["logprobs"]["token_logprobs"][0] is None
        # the same tokens and top alternatives; the numbers to float32 rounding (the four prompts' prefill runs
        # as one batch, whose matmul shapes round differently from one prompt's: ~5e-7 apart)
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(want.logprobs.token_logprobs[1:], abs=1e-5)
        for got, top in zip(choice["logprobs"]["top_logprobs"][1:], want.logprobs.top_logprobs[1:]):
            assert got.keys() == top.keys() and list(got.values()) == pytest.approx(list(top.values()), abs=1e-5)
    assert out["usage"] == {"prompt_tokens": sum(map(len, batch)), "completion_tokens": 4,
                            "total_tokens": sum(map(len, batch)) + 4}
    after = ledger(server)  # metered per prompt: one row each
    assert {k: after[k] - before[k] for k in after} == {"requests": 4, "prompt_tokens": sum(map(len, batch)),
                                                        "completion_tokens": 4}


def test_a_list_of_strings_with_n_2_gives_a_choice_per_prompt_and_choice(server, tokenizer) -> None:
    common = {"model": MODEL, "max_tokens": 4, "temperature": 0, "extra_body": {"ignore_eos": True}}
    out = client(server).completions.create(prompt=QUESTIONS, n=2, **common)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for p, question in enumerate(QUESTIONS):
        alone = client(server).completions.create(prompt=question, **common).choices[0].text
        assert out.choices[2 * p].text == out.choices[2 * p + 1].text == alone  # greedy: every choice the same
    prompt_tokens = sum(len(tokenizer.encode(q)) for q in QUESTIONS)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 4 * 4)  # each prompt once


def test_a_stream_of_two_prompts_carries_both_indices_and_summed_usage(server, tokenizer) -> None:
    common = {"model": MODEL, "prompt": QUESTIONS, "max_tokens": 5, "temperature": 0, "echo": True,
              "extra_body": {"ignore_eos": True}}
    chunks = list(client(server).completions.create(**common, stream=True, stream_options={"include_usage": True}))
    text = {0: "", 1: ""}
    finish = {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        text[choice.index] += choice.text
        if choice.finish_reason is not None:
            finish[choice.index] = choice.finish_reason
    whole = client(server).completions.create(**common)
    assert text == {c.index: c.text for c in whole.choices} and finish == {0: "length", 1: "length"}
    assert all(text[i].startswith(q) for i, q in enumerate(QUESTIONS))  # echo, per prompt
    usage = chunks[-1].usage
    assert not chunks[-1].choices and all(c.usage is None for c in chunks[:-1])
    assert (usage.prompt_tokens, usage.completion_tokens) == (sum(len(tokenizer.encode(q)) for q in QUESTIONS), 10)


def test_one_prompt_over_the_context_fails_the_batch_before_any_runs(server, tokenizer) -> None:
    before = ledger(server)
    too_long = [7] * 100_000
    for stream in (False, True):
        status, out = post(server, {**lm_eval_payload([5, 6, 7]), "prompt": [[5, 6, 7], too_long, [8, 9]],
                                    "stream": stream})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
        assert out["error"]["param"] == "prompt" and "prompt 1 of the batch" in out["error"]["message"]
    assert ledger(server) == before  # nothing ran, nothing metered


def test_batch_limits_are_400s(server) -> None:
    status, out = post(server, {"model": MODEL, "prompt": ["a"] * 65, "max_tokens": 1})
    assert status == 400 and out["error"]["param"] == "prompt" and "at most 64" in out["error"]["message"]
    status, out = post(server, {"model": MODEL, "prompt": ["a"] * 8, "n": 16, "max_tokens": 1})
    assert status == 400 and out["error"]["param"] == "n"
    status, out = post(server, {"model": MODEL, "prompt": [[1, 2], [3, "x"]], "max_tokens": 1})
    assert status == 400 and "prompt[1]" in out["error"]["message"]


def test_each_prompt_counts_against_max_concurrent(server) -> None:
    """tight may have 2 requests in flight: a batch of 2 runs; one of 3 could never be admitted, so it is a
    400 (a 429 would have clients retry forever), and nothing is metered for it."""
    before = ledger(server, "tight")
    status, out = post(server, {"model": MODEL, "prompt": ["Hi", "Ho"], "max_tokens": 2}, tenant="tight")
    assert status == 200 and len(out["choices"]) == 2
    status, out = post(server, {"model": MODEL, "prompt": ["Hi", "Ho", "Ha"], "max_tokens": 2}, tenant="tight")
    assert status == 400 and out["error"]["code"] == "request_too_large" and "max_concurrent" in out["error"]["message"]
    status, out = post(server, {"model": MODEL, "prompt": "Hi", "n": 3, "max_tokens": 2}, tenant="tight")
    assert status == 400 and out["error"]["code"] == "request_too_large"
    # with one slot held by a stream, a batch of 2 gets its first sequence admitted and its second refused:
    # a 429, and the first is given back unrun, with no usage row
    stream = urllib.request.Request(server.url + "/v1/completions", method="POST", headers={
        "Authorization": f"Bearer {KEYS['tight']}", "Content-Type": "application/json"},
        data=json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 256, "ignore_eos": True,
                         "stream": True}).encode())
    with urllib.request.urlopen(stream, timeout=120) as response:
        assert response.readline().startswith(b"data: ")  # generating: its slot is held
        status, out = post(server, {"model": MODEL, "prompt": ["Hi", "Ho"], "max_tokens": 2}, tenant="tight")
        assert response.read().rstrip().endswith(b"data: [DONE]")
    assert status == 429 and out["error"]["code"] == "concurrency_limit_exceeded"
    after = ledger(server, "tight")
    assert after["requests"] - before["requests"] == 3  # the batch of 2 and the stream


@pytest.mark.parametrize("prompt,expected", [
    ("a", ["a"]), ([1, 2], [[1, 2]]), (["a"], ["a"]), ([[1, 2]], [[1, 2]]), (["a", "b"], ["a", "b"]),
    ([[1], [2, 3]], [[1], [2, 3]]), (["a", [4]], ["a", [4]]),
])
def test_prompt_forms(prompt, expected) -> None:
    body: GenerationBody = parse_completion({"model": MODEL, "prompt": prompt})
    assert body.prompts == expected and body.prompt == expected[0]
