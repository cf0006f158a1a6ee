"""The frontend's edge under hostile or careless clients: huge bodies and prompts, malformed JSON,
oversized headers, slow connections, unauthenticated scrapes.

An in-process server on a loopback port (as in test_server.py), tenants in SQLite, the tiny
checkpoint served shared (`tiny`) and private to tenant beta (`secret`).
"""

from __future__ import annotations

import asyncio
import http.client
import random
import socket
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from faasmoe.api.app import MAX_BODY_BYTES, FrontendContext
from faasmoe.api.http_server import ConnectionLimits
from faasmoe.api.openai_requests import MAX_CHARS_PER_TOKEN
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.tenancy.admission import Admission
from faasmoe.tenancy.ledger import UsageLedger
from faasmoe.tenancy.tenants import TenantStore
from runtime.compute import ComputeThread

from .test_server import ADMIN_KEY, Server, assert_error, make_deployments, raw, serve

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("edge") / "tiny", "qwen2_moe", seed=1, progress=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(checkpoint: Path, tmp_path_factory):
    compute = ComputeThread("trunk")
    state = tmp_path_factory.mktemp("edge-state") / "state.db"
    tenants, ledger = TenantStore(state), UsageLedger(state)
    keys = {name: tenants.add_tenant(name, **limits)[1] for name, limits in {
        "acme": {}, "beta": {}, "metered": {"tokens_per_minute": 40}}.items()}
    keys["admin"] = ADMIN_KEY
    deployments = make_deployments(checkpoint, compute)

    async def cluster_state() -> dict:
        return {"workers": [], "models": {}}

    async def runtime_metrics() -> str:
        return ""

    ctx = FrontendContext(deployments, tenants, None, ADMIN_KEY, Admission(), ledger, cluster_state, runtime_metrics)
    runner, port = await serve(ctx)
    yield Server(port, deployments, ledger, keys)
    await runner.cleanup()
    await deployments.stop()
    compute.shutdown()
    tenants.close()
    ledger.close()


def max_context(server: Server) -> int:
    return server.deployments.by_name["tiny"].max_context


# --- D6: nothing heavy on the event loop; oversized input refused before any work -----------------------


async def test_health_answers_while_a_long_prompt_is_tokenized(server: Server) -> None:
    # Just under the character bound: it is tokenized (~0.3 s of CPU each) and only then found too long.
    words = ("mixture", "of", "experts", "serving", "the", "token", "router", "gate")
    rng = random.Random(0)
    text = " ".join(rng.choice(words) for _ in range(max_context(server) * MAX_CHARS_PER_TOKEN // 7))
    assert len(text) <= max_context(server) * MAX_CHARS_PER_TOKEN
    body = {"model": "tiny", "prompt": text, "max_tokens": 1}

    latencies: list[float] = []
    done = threading.Event()

    def probe_health() -> None:
        # From another thread: a client on the server's own loop would be stalled with it and not see it.
        conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
        while not done.is_set():
            start = time.perf_counter()
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b'{"status": "ok"}'
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
        conn.close()

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    try:
        results = await asyncio.gather(*(raw(server, "POST", "/v1/completions", body) for _ in range(3)))
    finally:
        done.set()
        await asyncio.to_thread(prober.join, 10)
    for status, _, payload in results:
        assert status == 400 and assert_error(payload, "invalid_request_error", "prompt")["code"] == \
            "context_length_exceeded"
    print(f"/health: {len(latencies)} probes, max {max(latencies) * 1000:.1f} ms")
    assert max(latencies) < 0.1, f"/health took {max(latencies) * 1000:.0f} ms while prompts were tokenized"
    assert len(latencies) >= 3, f"the prompts were not slow enough to measure anything: {latencies}"


async def test_a_prompt_past_the_character_bound_is_refused_without_tokenizing(server: Server, monkeypatch) -> None:
    tokenizer = server.deployments.by_name["tiny"].tokenizer

    def never(*args, **kwargs):
        raise AssertionError("an oversized prompt was tokenized")

    monkeypatch.setattr(tokenizer, "encode", never)
    monkeypatch.setattr(tokenizer, "apply_chat_template", never)
    limit = max_context(server) * MAX_CHARS_PER_TOKEN
    status, _, payload = await raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "a" * (limit + 1)})
    assert status == 400 and assert_error(payload, "invalid_request_error", "prompt")["code"] == \
        "context_length_exceeded"
    messages = [{"role": "user", "content": "b" * (limit // 2 + 1)}] * 2
    status, _, payload = await raw(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": messages})
    assert status == 400 and assert_error(payload, "invalid_request_error", "messages")["code"] == \
        "context_length_exceeded"
    ids = [5] * (max_context(server) + 1)
    status, _, payload = await raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": ids})
    assert status == 400 and assert_error(payload, "invalid_request_error", "prompt")["code"] == \
        "context_length_exceeded"


async def test_a_body_over_the_limit_is_413_in_openai_shape(server: Server) -> None:
    data = b'{"model": "tiny", "prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    status, _, payload = await raw(server, "POST", "/v1/completions", data=data)
    assert status == 413
    assert assert_error(payload, "invalid_request_error")["code"] == "request_too_large"


# --- D16: malformed input is a 4xx in OpenAI's shape, never a 500 or a retry loop ------------------------


async def test_a_lone_surrogate_is_400_not_500(server: Server) -> None:
    for path, body in (("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 1}'),
                       ("/v1/chat/completions",
                        b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}')):
        status, _, payload = await raw(server, "POST", path, data=body)
        assert status == 400, payload
        assert assert_error(payload, "invalid_request_error")["code"] == "invalid_json"
    # a real pair is text
    status, _, _ = await raw(server, "POST", "/v1/completions",
                             data=b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 1}')
    assert status == 200


async def test_deeply_nested_json_is_400_not_500(server: Server) -> None:
    depth = 100_000
    data = b'{"model": "tiny", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    status, _, payload = await raw(server, "POST", "/v1/completions", data=data)
    assert status == 400, payload
    assert assert_error(payload, "invalid_request_error")["code"] == "invalid_json"


async def test_oversized_headers_are_431_in_openai_shape(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/v1/models", headers={"X-Big": "x" * 9000}) as resp:
            assert resp.status == 431 and resp.headers["Content-Type"].startswith("application/json")
            payload = await resp.json()
    assert assert_error(payload, "invalid_request_error")["code"] == "request_header_fields_too_large"


async def test_a_request_over_the_whole_minute_budget_is_400_not_429(server: Server) -> None:
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 100}  # tenant metered may use 40 tokens a minute
    status, headers, payload = await raw(server, "POST", "/v1/completions", body, tenant="metered")
    assert status == 400 and "Retry-After" not in headers
    assert assert_error(payload, "invalid_request_error")["code"] == "request_too_large"


async def test_usage_since_out_of_range_is_400(server: Server) -> None:
    status, _, payload = await raw(server, "GET", "/v1/usage?since=" + "9" * 400 + "d", tenant="acme")
    assert status == 400, payload  # was 200 with "since": -Infinity, which is not JSON
    assert assert_error(payload, "invalid_request_error", "since")


# --- D10: an unauthenticated scrape learns no tenant and no private model ------------------------------


async def test_metrics_show_tenants_and_private_models_to_admins_only(server: Server) -> None:
    for tenant, model in (("acme", "tiny"), ("beta", "tiny"), ("beta", "secret")):
        status, _, _ = await raw(server, "POST", "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2},
                                 tenant=tenant)
        assert status == 200
    status, _, full = await raw(server, "GET", "/metrics", tenant="admin")
    assert status == 200
    assert 'model_name="secret"' in full and 'tenant="beta"' in full and 'tenant="acme"' in full
    prompt_tokens = {line.split()[0]: float(line.split()[1]) for line in full.splitlines()
                     if line.startswith("faasmoe_prompt_tokens_total{")}
    for scraper in (None, "acme"):  # nobody, or a tenant that is not an admin
        status, _, public = await raw(server, "GET", "/metrics", tenant=scraper)
        assert status == 200
        assert "secret" not in public and "tenant=" not in public and "beta" not in public, public
        assert '# TYPE faasmoe_time_to_first_token_seconds histogram' in public
        # the shared model's series summed over tenants: the same totals, no names
        shared = sum(v for k, v in prompt_tokens.items() if 'model_name="tiny"' in k)
        assert f'faasmoe_prompt_tokens_total{{model_name="tiny"}} {shared!r}' in public
        counts = sum(float(line.split()[1]) for line in full.splitlines()
                     if line.startswith("faasmoe_time_to_first_token_seconds_count{") and 'model_name="tiny"' in line)
        assert f'faasmoe_time_to_first_token_seconds_count{{model_name="tiny"}} {counts!r}' in public
    server.keys["wrong"] = "fm-acme-not-a-key"
    status, _, payload = await raw(server, "GET", "/metrics", tenant="wrong")  # a misconfigured scraper finds out
    assert status == 401 and assert_error(payload, "authentication_error")


# --- D12: slow or piled-up connections are closed; normal clients are still served ---------------------


@pytest_asyncio.fixture(loop_scope="module")
async def bounded(server: Server):
    """A second frontend on the same models with small connection bounds."""
    limits = ConnectionLimits(header_timeout_s=1.0, max_connections=48)
    ctx = FrontendContext(server.deployments, None, None, None, Admission(), None, _no_cluster, _no_metrics)
    runner, port = await serve(ctx, limits)
    yield port, limits
    await runner.cleanup()


async def _no_cluster() -> dict:
    return {}


async def _no_metrics() -> str:
    return ""


def _half_sent(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
    return sock


def _closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closed `sock` (EOF or reset), None when it stayed open past `timeout`."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def _health(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


async def test_connections_that_never_finish_their_headers_are_closed(bounded) -> None:
    port, limits = bounded

    def run() -> list[float | None]:
        slow = [_half_sent(port) for _ in range(40)]
        try:
            assert _health(port) == 200  # served while forty slow clients hang on
            started = time.monotonic()
            closed = [_closed_within(s, max(0.1, started + limits.header_timeout_s + 2.0 - time.monotonic()))
                      for s in slow]
            assert _health(port) == 200
            return closed
        finally:
            for s in slow:
                s.close()

    closed = await asyncio.to_thread(run)
    assert all(t is not None for t in closed), f"{closed.count(None)} of 40 half-sent connections stayed open"


async def test_connections_past_the_cap_are_closed_at_once(bounded) -> None:
    port, limits = bounded

    def run() -> None:
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(limits.max_connections)]
        try:
            time.sleep(0.2)  # the server has accepted them all
            extra = socket.create_connection(("127.0.0.1", port), timeout=10)
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _closed_within(extra, 0.5) is not None, "a connection past the cap was kept"
            extra.close()
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert _health(port) == 200  # room again once the others left

    await asyncio.to_thread(run)


async def test_a_body_that_trickles_in_is_408(bounded, monkeypatch) -> None:
    import faasmoe.api.app as app_module

    port, _ = bounded
    monkeypatch.setattr(app_module, "BODY_READ_TIMEOUT_S", 0.5)

    def run() -> bytes:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\": ")  # and the other 90 bytes never
            answer = b""
            while not answer.endswith(b"}}") and (chunk := sock.recv(4096)):  # the end of the error object
                answer += chunk
            return answer
        finally:
            sock.close()

    answer = await asyncio.wait_for(asyncio.to_thread(run), 10)
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer, answer


async def test_a_body_announced_past_the_limit_is_413_as_soon_as_the_head_is_read(bounded) -> None:
    port, _ = bounded

    def run() -> tuple[bytes, float]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        start = time.monotonic()
        try:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000000000\r\n\r\n{\"model\": ")  # and never the rest
            answer = b""
            while not answer.endswith(b"}}") and (chunk := sock.recv(4096)):
                answer += chunk
            return answer, time.monotonic() - start
        finally:
            sock.close()

    answer, took = await asyncio.wait_for(asyncio.to_thread(run), 10)
    assert answer.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in answer and b"1000000000" in answer, answer
    assert took < 5, took  # not after the body timeout
