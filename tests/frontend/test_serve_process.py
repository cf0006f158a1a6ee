"""`faasmoe serve` / `faasmoe frontend` as processes: what survives a restart, secrets, start-up failures.

Real processes on free loopback ports (`--experts in-process`: no workers needed), always stopped.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

from ..processes import faasmoe, free_port

KEY_A = "fm-alpha-0123456789abcdefghijklmnopqrstu"
KEY_B = "fm-bravo-0123456789abcdefghijklmnopqrstu"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("serve-process") / "tiny", "qwen2_moe", seed=3, progress=False)


def status_of(port: int, key: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            json.loads(response.read())
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def serve_once(config: Path, check) -> None:
    proc = faasmoe("serve", "--config", str(config), "--experts", "in-process")
    try:
        proc.wait_for("faasmoe serving", timeout=60)
        check(proc)
    finally:
        assert proc.stop() == 0, proc.output


def write_config(path: Path, model: Path, port: int, state: Path, tenants: dict[str, str]) -> None:
    text = f'[server]\nport = {port}\ndevice = "cpu"\nstate = "{state}"\n\n[[models]]\nname = "tiny"\npath = "{model}"\n'
    for name, key in tenants.items():
        text += f'\n[[tenants]]\nname = "{name}"\napi_keys = ["{key}"]\n'
    path.write_text(text)


def test_a_tenant_removed_from_the_config_loses_its_keys_on_restart(model: Path, tmp_path: Path) -> None:
    port, state, config = free_port(), tmp_path / "state.db", tmp_path / "faasmoe.toml"
    added = faasmoe("tenant", "add", "handmade", "--state", str(state))
    assert added.proc.wait(30) == 0
    handmade_key = added.wait_for(r"(fm-handmade-\S+)").group(1)
    write_config(config, model, port, state, {"alpha": KEY_A, "bravo": KEY_B})
    serve_once(config, lambda proc: [status_of(port, k) for k in (KEY_A, KEY_B)] == [200, 200] or
               pytest.fail("the config's keys did not work"))
    write_config(config, model, port, state, {"alpha": KEY_A})  # bravo is gone from the config

    def check(proc) -> None:
        assert status_of(port, KEY_B) == 401, "a tenant removed from the config still authenticates"
        assert status_of(port, KEY_A) == 200
        assert status_of(port, handmade_key) == 200  # made by `faasmoe tenant add`: the config does not own it
        assert "removed tenant bravo" in proc.output

    serve_once(config, check)


# --- D14: secrets from files or the environment, not argv ---------------------------------------------


def test_the_api_key_comes_from_a_file_and_argv_gets_a_warning(model: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("sk-from-a-file\n")
    key_file.chmod(0o600)
    for flags, env in ((["--api-key-file", str(key_file)], {}), ([], {"FAASMOE_API_KEY": "sk-from-a-file"}),
                       (["--api-key", "sk-from-a-file"], {})):
        port = free_port()
        proc = faasmoe("serve", str(model), "--experts", "in-process", "--port", str(port),
                       "--state", str(tmp_path / "state.db"), *flags, env=env)
        try:
            proc.wait_for("faasmoe serving", timeout=60)
            assert status_of(port, "sk-from-a-file") == 200 and status_of(port, "sk-other") == 401
            warnings = proc.output.count("puts a secret on the command line")
            assert warnings == (1 if "--api-key" in flags else 0), proc.output
        finally:
            assert proc.stop() == 0, proc.output


# --- D15: a frontend whose scheduler is not there says so, and exits ---------------------------------


def test_a_frontend_without_its_scheduler_exits_with_a_clear_message(model: Path, tmp_path: Path) -> None:
    silent = socket.socket()  # listens (the kernel completes handshakes) but never speaks
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        for address, why in ((f"127.0.0.1:{free_port()}", "connecting fails"),
                             (f"127.0.0.1:{silent.getsockname()[1]}", "--token")):
            started = time.monotonic()
            proc = faasmoe("frontend", str(model), "--scheduler", address, "--scheduler-timeout", "2",
                           "--port", "0", "--state", str(tmp_path / "state.db"))
            try:
                code = proc.proc.wait(30)
            finally:
                proc.stop()
            assert code != 0 and time.monotonic() - started < 25
            assert f"faasmoe: error: cannot reach the scheduler at {address}" in proc.output, proc.output
            assert why in proc.output, proc.output
    finally:
        silent.close()


def test_an_exception_without_a_message_is_still_described() -> None:
    from faasmoe.cli import describe

    assert describe(TimeoutError()) == "TimeoutError (no details)"
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as exc:
            raise TimeoutError() from exc
    except TimeoutError as exc:
        assert "Connection refused" in describe(exc)


# --- D13: --kv-cache-memory bounds the KV caches; a request that could never fit is a 400 -------------


def test_kv_cache_memory_refuses_what_can_never_fit(model: Path, tmp_path: Path) -> None:
    port = free_port()
    per_token = 2 * 3 * 2 * 16 * 4  # k and v x 3 layers x 2 kv heads x head_dim 16 x fp32 (the tiny qwen2_moe)
    proc = faasmoe("serve", str(model), "--experts", "in-process", "--port", str(port), "--state",
                   str(tmp_path / "state.db"), "--kv-cache-memory", str(per_token * 64))
    try:
        proc.wait_for("faasmoe serving", timeout=60)

        def complete(max_tokens: int) -> tuple[int, dict]:
            body = json.dumps({"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": max_tokens,
                               "ignore_eos": True}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        status, reply = complete(8)
        assert status == 200 and reply["usage"]["completion_tokens"] == 8
        status, reply = complete(200)  # 204 tokens of cache against a budget of 64
        assert status == 400 and "KV cache budget" in reply["error"]["message"], reply
    finally:
        assert proc.stop() == 0, proc.output


# --- tokens delivered before a crash are billed --------------------------------------------------------


def test_tokens_streamed_before_a_crash_are_in_the_ledger(model: Path, tmp_path: Path) -> None:
    import http.client
    import os
    import signal

    from faasmoe.tenancy.ledger import UsageLedger

    port, state = free_port(), tmp_path / "state.db"
    proc = faasmoe("serve", str(model), "--experts", "in-process", "--port", str(port), "--state", str(state))
    try:
        proc.wait_for("faasmoe serving", timeout=60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4000,
                                                            "stream": True, "ignore_eos": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        received, started = 0, time.monotonic()
        # Stream past a checkpoint or two (1 s apart): tokens after the first second trigger one.
        while time.monotonic() - started < 2.5 or received < 5:
            assert time.monotonic() - started < 60, "the stream stalled"
            if response.fp.readline().startswith(b"data: {"):
                received += 1
        rate = received / (time.monotonic() - started)  # tokens per second, as this client read them
        time.sleep(0.3)  # the checkpoint commits off the loop
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
    finally:
        proc.kill()
    with UsageLedger(state) as ledger:
        rows = ledger.query()
    assert len(rows) == 1 and rows[0].status == "running", rows
    # The last checkpoint is at most ~1 s old; the server went on generating while this client slept
    # (into the socket's buffers), so it may have counted a little more than was read, never the budget.
    assert received - 1.5 * rate <= rows[0].completion_tokens <= received + 0.6 * rate + 50, (rows[0], received, rate)
    assert rows[0].prompt_tokens == 3


# --- issue 11: the host tier counts as resident; --host-cache / --host-ttl reach the local workers ------


def test_host_tier_counts_until_its_ttl_drops_it(model: Path, tmp_path: Path) -> None:
    port, key = free_port(), KEY_A
    proc = faasmoe("serve", str(model), "--port", str(port), "--state", str(tmp_path / "state.db"), "--device", "cpu",
                   "--keep-alive", "0.5", "--host-cache", "64MiB", "--host-ttl", "3", "--api-key", key)
    try:
        proc.wait_for("faasmoe serving", timeout=120)
        body = json.dumps({"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 2}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200

        def view() -> dict:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/cluster",
                                             headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        seen_host = None
        deadline = time.monotonic() + 30
        while True:
            state = view()
            m, (w,) = state["models"]["tiny"], state["workers"]
            assert m["resident_bytes"] == m["device_bytes"] + m["host_bytes"], m
            assert w["resident_bytes"] == w["device_bytes"] + w["host_cache_bytes"], w
            if m["device_bytes"] == 0 and m["host_bytes"] > 0:
                seen_host = m  # scaled off the device, still held in host RAM: not zero yet
            if seen_host and m["resident_bytes"] == 0:
                break
            assert time.monotonic() < deadline, (seen_host, state)
            time.sleep(0.1)
        assert seen_host["resident_bytes"] == seen_host["host_bytes"] and w["resident_bytes"] == 0
    finally:
        assert proc.stop() == 0, proc.output
