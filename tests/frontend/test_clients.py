"""A real `faasmoe serve` (one worker process) driven the way the heavy clients drive it, with the light ones.

The requests are those lm-evaluation-harness, `vllm bench serve` and guidellm send (bench/compat.py runs
the clients themselves), made here with the openai SDK; the answers are read as those clients read
them and checked against the in-process model. prometheus_client's parser then reads `/metrics`.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from faasmoe.model.moe_model import MoEModel
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.model.tokenizer import Tokenizer

from ..processes import free_port, serving

KEY = "fm-clients-0123456789abcdefghijklmnopqrs"
MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("clients-model") / MODEL, "qwen2_moe", seed=7, progress=False)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    state = tmp_path_factory.mktemp("clients-serve") / "state.db"
    proc = serving(port, str(model_dir), "--port", str(port), "--workers", "1", "--expert-block-size", "4",
                   "--state", str(state), env={"FAASMOE_API_KEY": KEY})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(model_dir) -> MoEModel:
    return MoEModel.from_pretrained(model_dir)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def lm_eval_payload(ids: list[int]) -> dict:
    """lm-eval's `local-completions` loglikelihood request (LocalCompletionsAPI._create_payload, batch size 1)."""
    return {"model": MODEL, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}


def lm_eval_score(choice, ctxlen: int) -> tuple[float, bool]:
    """lm-eval's parse_logprobs: the continuation's summed logprob and whether each token was the top one."""
    logprobs = choice.logprobs.token_logprobs[ctxlen:-1]
    tops = choice.logprobs.top_logprobs[ctxlen:-1]
    return sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops))


def test_lm_eval_multiple_choice_scores_equal_the_in_process_model(server, model_dir, reference) -> None:
    tokenizer = Tokenizer.from_pretrained(model_dir)
    context = tokenizer.encode("Question: What is the capital of France?\nAnswer:")
    choices = [" Paris", " Berlin", " Madrid", " Rome"]
    scores, wanted = [], []
    for text in choices:
        ids = context + tokenizer.encode(text)
        out = client(server).completions.create(**lm_eval_payload(ids))
        choice = out.choices[0]
        assert len(choice.logprobs.token_logprobs) == len(ids) + 1  # the prompt's tokens, then the one generated
        assert choice.logprobs.token_logprobs[0] is None and out.usage.prompt_tokens == len(ids)
        scores.append(lm_eval_score(choice, len(context)))
        with torch.no_grad():
            lsm = torch.log_softmax(reference(torch.tensor([ids]))[0].float(), -1)
        positions = range(len(context), len(ids))
        wanted.append((sum(float(lsm[i - 1, ids[i]]) for i in positions),
                       all(int(lsm[i - 1].argmax()) == ids[i] for i in positions)))
    for (got, greedy), (want, want_greedy) in zip(scores, wanted):
        assert abs(got - want) < 1e-4 and greedy == want_greedy
    assert max(range(4), key=lambda i: scores[i][0]) == max(range(4), key=lambda i: wanted[i][0])


def test_a_chat_stream_as_benchmarks_time_it(server) -> None:
    """vllm bench's openai-chat and guidellm take TTFT at the first chunk with content: the role comes with the
    first token (its logprob says a token is there), not before prefill."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "extra_body": {"ignore_eos": True}}
    chunks = list(client(server).chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content is not None and len(first.logprobs.content) >= 1
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 6  # usage last, only when asked
    assert text == client(server).chat.completions.create(**body).choices[0].message.content


def test_a_completion_stream_counts_its_tokens(server) -> None:
    """vllm bench's openai backend and guidellm count output tokens from a stream with usage."""
    chunks = list(client(server).completions.create(model=MODEL, prompt=list(range(40, 104)), max_tokens=8,
                                                    temperature=0, stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == 64
    assert all(c.usage is None for c in chunks[:-1])


def test_models_are_listed_and_retrieved(server, model_dir) -> None:
    c = client(server)
    listed = {m.id: m for m in c.models.list()}
    assert list(listed) == [MODEL] and c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("not-" + MODEL)


def test_prometheus_parser_reads_metrics_after_the_clients(server) -> None:
    test_a_completion_stream_counts_its_tokens(server)  # at least one finished request to count
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    success = [s for s in families["faasmoe_request_success"].samples if s.name.endswith("_total")]
    assert sum(s.value for s in success if s.labels.get("model_name") == MODEL) >= 1
    assert families["faasmoe_time_to_first_token_seconds"].type == "histogram"
