"""`GET /metrics` of a real `faasmoe serve` (one worker process), read with prometheus_client's parser:
the HTTP counter by status and route, the request histograms, finished reasons, process metrics per
process and the KV cache gauge, as vLLM users' dashboards read them."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from faasmoe.model.config import MoEConfig
from faasmoe.model.kv_cache import KVCache
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

from ..processes import free_port, serving

ADMIN = "fm-ops-0123456789abcdefghijklmnopqrstuvwx"
KEYS = {"acme": "fm-acme-0123456789abcdefghijklmnopqrstuv", "tight": "fm-tight-0123456789abcdefghijklmnopqrstuvw"}
KV_BUDGET = 4 * 2**20  # small, so that one request's reservation is a visible fraction of it
MODEL = "tiny"

Series = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("metrics-model") / MODEL, "qwen2_moe", seed=5, progress=False)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-serve")
    port = free_port()
    config = root / "faasmoe.toml"
    config.write_text(
        f'[server]\nport = {port}\nworkers = 1\ndevice = "cpu"\nstate = "{root / "state.db"}"\nadmin_key = "{ADMIN}"\n'
        f'[[models]]\nname = "{MODEL}"\npath = "{model_dir}"\nexpert_block_size = 4\n'
        f'[[tenants]]\nname = "acme"\nmodels = ["*"]\napi_keys = ["{KEYS["acme"]}"]\n'
        f'[[tenants]]\nname = "tight"\nmodels = ["*"]\ntokens_per_minute = 40\napi_keys = ["{KEYS["tight"]}"]\n')
    proc = serving(port, "--config", str(config), "--kv-cache-memory", str(KV_BUDGET))
    proc.port = port
    yield proc
    proc.stop()


def call(server, method: str, path: str, key: str | None = None, body: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode())
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def scrape(server, key: str | None = ADMIN) -> Series:
    status, text = call(server, "GET", "/metrics", key)
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(series: Series, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, got), v in series.items() if n == name and want <= got)


def http_count(series: Series, method: str, handler: str, status: int) -> float:
    return value(series, "faasmoe_http_requests_total", method=method, handler=handler, status=str(status))


def test_http_requests_are_counted_by_route_template_and_status(server):
    before = scrape(server)
    assert call(server, "POST", "/v1/completions", "fm-not-a-key", {"model": MODEL, "prompt": "x"})[0] == 401
    assert call(server, "GET", "/no/such/page", KEYS["acme"])[0] == 404
    assert call(server, "GET", "/v1/models/no-such-model", KEYS["acme"])[0] == 404
    assert call(server, "GET", "/v1/models", KEYS["acme"])[0] == 200
    assert call(server, "POST", "/v1/completions", KEYS["acme"], {"model": MODEL, "prompt": "x", "top_p": 7})[0] == 400
    tight = {"model": MODEL, "prompt": [5, 6], "max_tokens": 30, "ignore_eos": True}
    assert call(server, "POST", "/v1/completions", KEYS["tight"], tight)[0] == 200  # 32 of its 40 tokens a minute
    assert call(server, "POST", "/v1/completions", KEYS["tight"], tight)[0] == 429
    after = scrape(server)
    for method, handler, status, n in (("POST", "/v1/completions", 401, 1), ("GET", "none", 404, 1),
                                       ("GET", "/v1/models/{model}", 404, 1), ("GET", "/v1/models", 200, 1),
                                       ("POST", "/v1/completions", 400, 1), ("POST", "/v1/completions", 200, 1),
                                       ("POST", "/v1/completions", 429, 1), ("GET", "/metrics", 200, 1)):
        assert http_count(after, method, handler, status) - http_count(before, method, handler, status) == n, \
            (method, handler, status)
    handlers = {dict(labels)["handler"] for name, labels in after if name == "faasmoe_http_requests_total"}
    assert not [h for h in handlers if "no-such" in h or "/no/" in h]  # templates, never the raw URL


def test_a_completion_moves_every_request_histogram(server):
    names = ("faasmoe_time_to_first_token_seconds", "faasmoe_e2e_request_latency_seconds",
             "faasmoe_request_queue_time_seconds", "faasmoe_request_prefill_time_seconds",
             "faasmoe_request_decode_time_seconds", "faasmoe_inter_token_latency_seconds",
             "faasmoe_request_prompt_tokens", "faasmoe_request_generation_tokens")
    labels = {"model_name": MODEL, "tenant": "acme"}
    before = scrape(server)
    status, body = call(server, "POST", "/v1/completions", KEYS["acme"],
                        {"model": MODEL, "prompt": [3, 1, 4, 1, 5, 9, 2], "max_tokens": 6, "ignore_eos": True})
    assert status == 200
    usage = json.loads(body)["usage"]
    after = scrape(server)
    for name in names:
        grew = value(after, f"{name}_count", **labels) - value(before, f"{name}_count", **labels)
        assert grew == (usage["completion_tokens"] - 1 if "inter_token" in name else 1), name
        assert value(after, f"{name}_bucket", **labels, le="+Inf") == value(after, f"{name}_count", **labels)
    delta = {name: value(after, f"{name}_sum", **labels) - value(before, f"{name}_sum", **labels) for name in names}
    assert delta["faasmoe_request_prompt_tokens"] == usage["prompt_tokens"] == 7
    assert delta["faasmoe_request_generation_tokens"] == usage["completion_tokens"] == 6
    phases = sum(delta[f"faasmoe_request_{p}_time_seconds"] for p in ("queue", "prefill", "decode"))
    assert 0 < phases <= delta["faasmoe_e2e_request_latency_seconds"] + 1e-6  # the phases sit inside e2e
    success = value(after, "faasmoe_request_success_total", **labels, finished_reason="length")
    assert success - value(before, "faasmoe_request_success_total", **labels, finished_reason="length") == 1
    assert value(after, "faasmoe_request_prompt_tokens_count", **labels) == \
        value(after, "faasmoe_request_success_total", **labels)  # one observation per finished request


def test_process_metrics_of_the_frontend_and_the_worker(server):
    for key in (ADMIN, None):  # the anonymous scrape keeps them too
        series = scrape(server, key)
        rss = {(dict(labels)["component"], dict(labels)["worker"]): v
               for (name, labels), v in series.items() if name == "process_resident_memory_bytes"}
        assert set(rss) == {("frontend", ""), ("worker", "local-0")}, rss  # one per process, told apart
        assert all(v > 10 * 2**20 for v in rss.values())
        assert value(series, "process_cpu_seconds_total", component="worker") > 0
        assert value(series, "process_start_time_seconds", component="frontend") > 1e9


def test_kv_cache_usage_rises_while_a_request_runs_and_a_cancel_is_an_abort(server, model_dir):
    cfg = MoEConfig.from_pretrained(model_dir)
    per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)  # serve's default
    prompt, max_tokens = [7, 8, 9, 10, 11], 3000
    labels = {"model_name": MODEL, "tenant": "acme"}
    idle = scrape(server)
    assert value(idle, "faasmoe_kv_cache_usage_perc", model_name=MODEL) == 0
    aborted = value(idle, "faasmoe_request_success_total", **labels, finished_reason="abort")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                        "stream": True, "ignore_eos": True}),
                 {"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event: the sequence is running
    running = scrape(server)
    usage = value(running, "faasmoe_kv_cache_usage_perc", model_name=MODEL)
    assert usage == pytest.approx(per_token * (len(prompt) + max_tokens) / KV_BUDGET)  # its worst case, reserved
    assert 0 < usage <= 1
    assert 0 < value(running, "faasmoe_kv_cache_allocated_bytes", model_name=MODEL) <= per_token * (len(prompt) + max_tokens)
    conn.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while True:
        after = scrape(server)
        if value(after, "faasmoe_request_success_total", **labels, finished_reason="abort") == aborted + 1:
            break
        assert time.monotonic() < deadline, "the cancelled request was not counted as an abort"
        time.sleep(0.2)
    assert value(after, "faasmoe_request_success_total", **labels, finished_reason="cancelled") == 0
    while value(after, "faasmoe_kv_cache_usage_perc", model_name=MODEL) > 0:  # freed with the sequence
        assert time.monotonic() < deadline, "the cancelled request's KV cache stayed reserved"
        time.sleep(0.2)
        after = scrape(server)
