"""`faasmoe serve` end to end: a real server process, its worker processes, real HTTP clients.

One server serves the tiny checkpoint of every family (shared) plus a private model of tenant
acme, for tenants acme and globex declared in a TOML config. The distributed path is checked
against the in-process MoEModel, token for token.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from faasmoe.engine.offline import generate
from faasmoe.model.moe_model import MoEModel
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

from ..processes import free_port, serving

FAMILIES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe")
KEYS = {"acme": "fm-acme-0123456789abcdefghijklmnopqrstuv", "globex": "fm-globex-0123456789abcdefghijklmnopqrstu",
        "tight": "fm-tight-0123456789abcdefghijklmnopqrstuvw"}
KEEP_ALIVE_S = 2.0


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e-models")
    return {family: init_checkpoint(root / family, family, seed=11, progress=False) for family in FAMILIES}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    port = free_port()
    entries = [f'[[models]]\nname = "{f}"\npath = "{p}"\nexpert_block_size = 4\nkeep_alive = {KEEP_ALIVE_S}\n'
               for f, p in models.items()]
    entries.append(f'[[models]]\nname = "acme-private"\npath = "{models["qwen2_moe"]}"\nsharing = "private"\n'
                   f'owner = "acme"\nexpert_block_size = 8\n')
    tenants = (
        f'[[tenants]]\nname = "acme"\nmodels = ["*"]\napi_keys = ["{KEYS["acme"]}"]\nadmin = true\n'
        f'memory_quota = "1KiB"\n'
        f'[[tenants]]\nname = "globex"\nmodels = ["*"]\napi_keys = ["{KEYS["globex"]}"]\n'
        f'[[tenants]]\nname = "tight"\nmodels = ["qwen2_moe"]\ntokens_per_minute = 40\nmax_concurrent = 1\n'
        f'api_keys = ["{KEYS["tight"]}"]\n'
    )
    config = root / "faasmoe.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = 2\ndevice = "cpu"\nstate = "{root / "state.db"}"\n\n'
                      + "\n".join(entries) + "\n" + tenants)
    proc = serving(port, "--config", str(config))
    proc.state = root / "state.db"
    yield proc
    proc.stop()


def client(server, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def get(server, path: str, tenant: str | None = "acme") -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(server.url + path)
    if tenant:
        request.add_header("Authorization", f"Bearer {KEYS[tenant]}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def metric(server, name: str) -> float:
    _, _, text = get(server, "/metrics", None)
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.mark.parametrize("family", FAMILIES)
def test_distributed_tokens_and_logprobs_equal_the_in_process_model(server, models, family):
    prompt = [12, 250, 7, 99, 31, 5]
    reply = client(server).completions.create(model=family, prompt=prompt, max_tokens=10, temperature=0,
                                              logprobs=1, extra_body={"ignore_eos": True})
    reference = generate(MoEModel.from_pretrained(models[family], expert_block_size=4),
        [prompt], max_tokens=10, ignore_eos=True)[0]
    choice = reply.choices[0]
    assert choice.text == reference.text
    assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs), torch.tensor(reference.logprobs), atol=1e-5)
    assert reply.usage.prompt_tokens == 6 and reply.usage.completion_tokens == 10


def test_chat_and_streaming_with_the_openai_client(server, models):
    c = client(server)
    chat = c.chat.completions.create(model="qwen2_moe", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                     temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    whole = c.completions.create(model="mixtral", prompt="Once upon", max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    chunks = list(c.completions.create(model="mixtral", prompt="Once upon", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_errors_and_private_models(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    acme = {m.id for m in client(server, "acme").models.list()}
    globex = {m.id for m in client(server, "globex").models.list()}
    assert "acme-private" in acme and "acme-private" not in globex
    with pytest.raises(openai.NotFoundError):
        client(server, "globex").completions.create(model="acme-private", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client(server, "globex").completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).completions.create(model="qwen2_moe", prompt="x", max_tokens=-3)
    assert client(server, "acme").completions.create(model="acme-private", prompt="x", max_tokens=2).usage


def test_private_memory_quota(server):
    # acme's quota (1 KiB) is below one expert block: once its private model holds experts, it waits.
    with pytest.raises(openai.RateLimitError, match="memory quota") as err:
        client(server, "acme").completions.create(model="acme-private", prompt="again", max_tokens=2)
    assert int(err.value.response.headers["Retry-After"]) >= 1
    assert client(server, "acme").completions.create(model="qwen2_moe", prompt="shared", max_tokens=2).usage


def test_tenant_limits_answer_429_with_retry_after(server):
    status = None
    headers: dict[str, str] = {}
    for _ in range(5):
        body = json.dumps({"model": "qwen2_moe", "prompt": "count to ten", "max_tokens": 16}).encode()
        request = urllib.request.Request(server.url + "/v1/completions", body, method="POST", headers={
            "Authorization": f"Bearer {KEYS['tight']}", "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=60).read()
        except urllib.error.HTTPError as err:
            status, headers = err.code, dict(err.headers)
            break
    assert status == 429
    assert int(headers["Retry-After"]) >= 1


async def _generate(server, tenant: str, prompt: str, tokens: int) -> None:
    c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)
    await c.completions.create(model="olmoe", prompt=prompt, max_tokens=tokens, temperature=0,
                               extra_body={"ignore_eos": True})
    await c.close()


def test_two_tenants_on_a_shared_model_are_batched_together(server):
    calls = "faasmoe_expert_invocations_total"
    before = metric(server, calls)
    asyncio.run(_generate(server, "acme", "alpha beta", 24))
    asyncio.run(_generate(server, "globex", "gamma delta", 24))
    one_after_another = metric(server, calls) - before

    async def together() -> None:
        await asyncio.gather(_generate(server, "acme", "alpha beta", 24), _generate(server, "globex", "gamma delta", 24))

    before = metric(server, calls)
    asyncio.run(together())
    batched = metric(server, calls) - before
    assert batched < 0.8 * one_after_another, (batched, one_after_another)


def test_scale_to_zero_and_the_same_answer_after_a_cold_start(server):
    first = client(server).completions.create(model="qwen3_moe", prompt=[3, 4, 5], max_tokens=6, temperature=0)
    deadline = time.monotonic() + 30
    while True:
        cluster = json.loads(get(server, "/admin/cluster")[2])
        if cluster["models"]["qwen3_moe"]["resident_bytes"] == 0:
            break
        assert time.monotonic() < deadline, cluster["models"]["qwen3_moe"]
        time.sleep(0.3)
    cold_before = metric(server, "faasmoe_expert_cold_starts_total")
    again = client(server).completions.create(model="qwen3_moe", prompt=[3, 4, 5], max_tokens=6, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    assert metric(server, "faasmoe_expert_cold_starts_total") > cold_before


def test_client_disconnect_frees_the_sequence(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "qwen2_moe", "prompt": "go", "max_tokens": 4000,
                                                        "stream": True, "ignore_eos": True}),
                 {"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json"})
    response = conn.getresponse()
    response.fp.readline()  # the first event: the sequence is running
    assert metric(server, "faasmoe_num_requests_running") >= 1
    conn.close()
    deadline = time.monotonic() + 20
    while metric(server, "faasmoe_num_requests_running") > 0:
        assert time.monotonic() < deadline, "the abandoned sequence kept running"
        time.sleep(0.2)


def test_ledger_rows_survive_a_sigkill(server):
    c = client(server, "globex")
    done = [c.completions.create(model="qwen2_moe", prompt="ledger", max_tokens=n, temperature=0,
                                 extra_body={"ignore_eos": True}) for n in (3, 5)]
    os.kill(server.proc.pid, signal.SIGKILL)  # its workers notice their parent is gone and exit
    server.proc.wait(30)
    from faasmoe.tenancy.ledger import UsageLedger

    rows = {r.request_id: r for r in UsageLedger(server.state).query(tenant="globex")}
    for reply in done:
        row = rows[reply.id]
        assert (row.prompt_tokens, row.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
        assert row.status == "ok" and row.expert_invocations > 0
