"""Real faults against real processes: a worker whose loads hang (its filesystem stops answering), a
worker frozen by SIGSTOP past the heartbeat timeout, two workers claiming one id.

The hung filesystem is a FIFO bind-mounted over the checkpoint's weights inside the worker's own
mount namespace: its heartbeats go on, its loads never return (a gray failure, like a dead NFS
mount or a stuck kernel). Needs root and util-linux `unshare`; skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from runtime.client import InvokeError, RuntimeClient

from ..processes import Process, faasmoe, free_port
from .test_cluster import TOKEN, call, connect, expected, join_worker, resident, spec, start_scheduler

can_unshare = os.geteuid() == 0 and shutil.which("unshare") is not None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("faults") / "tiny", "qwen2_moe", seed=5, progress=False)


def hung_filesystem_worker(tmp_path, scheduler: str, model_dir, worker_id: str) -> Process:
    fifo = tmp_path / f"{worker_id}.fifo"
    os.mkfifo(fifo)
    weights = model_dir / "model.safetensors"
    script = f'mount --bind {fifo} {weights} && exec "$0" "$@"'
    return Process(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable, "-m",
                    "faasmoe.cli", "worker", "join", scheduler, "--id", worker_id, "--device", "cpu", "--memory",
                    "64MiB", "--host-cache", "0", "--listen", "127.0.0.1:0"], {"FAASMOE_TOKEN": TOKEN})


async def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


@pytest.mark.skipif(not can_unshare, reason="needs root and unshare to give a worker a hung filesystem")
async def test_a_worker_that_never_answers_costs_a_deadline_then_is_taken_out(model_dir, tmp_path):
    sched, address = start_scheduler()
    stuck = hung_filesystem_worker(tmp_path, address, model_dir, "stuck")
    healthy = None
    client = await RuntimeClient(address, TOKEN, deadline_min_s=1.0).start()
    try:
        await wait_until(lambda: "stuck" in client.workers, 60, "the stuck worker never registered")
        started = time.monotonic()
        with pytest.raises(InvokeError):  # alone, it can only fail: within a bound, never silently forever
            await asyncio.wait_for(client.invoke([call(spec(model_dir, 0, 0))]), 30)
        assert time.monotonic() - started < 10
        healthy = join_worker(address, "healthy")
        await wait_until(lambda: "healthy" in client.workers, 60, "the healthy worker never registered")
        calls = [call(spec(model_dir, 0, b), seed=b) for b in range(4)]
        deadline = time.monotonic() + 90
        while "stuck" in client.workers:  # late but correct answers, until the scheduler takes it out
            outputs = await asyncio.wait_for(client.invoke(calls), 30)
            for c, out in zip(calls, outputs):
                assert torch.equal(out, expected(model_dir, c))
            assert time.monotonic() < deadline, "the stuck worker was never declared unhealthy"
            await asyncio.sleep(0.1)
        started = time.monotonic()
        outputs = await asyncio.wait_for(client.invoke(calls), 30)
        assert all(torch.equal(out, expected(model_dir, c)) for c, out in zip(calls, outputs))
        assert time.monotonic() - started < 1.0  # no deadline is waited out any more
        assert stuck.alive()  # quarantined, not crashed: it may come back once it answers again
    finally:
        await client.close()
        for proc in (healthy, stuck, sched):
            if proc is not None:
                proc.kill()


async def test_a_worker_stopped_past_the_heartbeat_timeout_comes_back(model_dir):
    sched, address = start_scheduler()
    worker = join_worker(address, "sleepy")
    client = None
    try:
        client = await connect(address, 1)
        c = call(spec(model_dir, 0, 1))
        assert torch.equal((await client.invoke([c]))[0], expected(model_dir, c))
        os.kill(worker.proc.pid, signal.SIGSTOP)
        await wait_until(lambda: "sleepy" not in client.workers, 30, "the frozen worker was never declared dead")
        await asyncio.sleep(3)  # well past the 2 s heartbeat timeout
        os.kill(worker.proc.pid, signal.SIGCONT)
        await wait_until(lambda: "sleepy" in client.workers, 30, "the worker never registered again")
        assert torch.equal((await asyncio.wait_for(client.invoke([c]), 30))[0], expected(model_dir, c))
        assert worker.alive()
    finally:
        if client is not None:
            await client.close()
        os.kill(worker.proc.pid, signal.SIGCONT)
        worker.stop()
        sched.stop()


async def test_a_second_worker_with_a_taken_id_is_refused_clearly(model_dir):
    sched, address = start_scheduler()
    first = join_worker(address, "twin")
    second = None
    client = None
    try:
        client = await connect(address, 1)
        pid = client.workers["twin"].pid
        second = join_worker(address, "twin")
        second.wait_for("taken by the live worker", timeout=60)
        assert second.proc.wait(30) == 2
        assert client.workers["twin"].pid == pid and client.version < 20  # no flapping
        c = call(spec(model_dir, 0, 2))
        assert torch.equal((await client.invoke([c]))[0], expected(model_dir, c))
    finally:
        if client is not None:
            await client.close()
        for proc in (second, first, sched):
            if proc is not None:
                proc.stop()


@pytest.mark.skipif(not can_unshare, reason="needs root and unshare to give a worker a hung filesystem")
def test_a_request_no_worker_can_serve_is_a_503_within_a_bound(model_dir, tmp_path):
    sched, address = start_scheduler()
    stuck = hung_filesystem_worker(tmp_path, address, model_dir, "stuck")
    port = free_port()
    frontend = faasmoe("frontend", "--scheduler", address, "--port", str(port), "--expert-block-size", "4",
                       str(model_dir), env={"FAASMOE_TOKEN": TOKEN})
    try:
        frontend.wait_for("faasmoe serving", timeout=120)
        body = json.dumps({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=60)
        assert time.monotonic() - started < 20
        assert failed.value.code == 503 and failed.value.headers["Retry-After"]
        assert json.loads(failed.value.read())["error"]["code"] == "unavailable"
    finally:
        for proc in (frontend, stuck, sched):
            proc.kill()


def test_a_worker_whose_scheduler_is_not_there_says_so_and_exits():
    worker = faasmoe("worker", "join", f"127.0.0.1:{free_port()}", "--device", "cpu", "--memory", "64MiB",
                     "--join-timeout", "3", env={"FAASMOE_TOKEN": TOKEN})
    try:
        worker.wait_for("unreachable", timeout=30)  # said at once, not only at the end
        assert worker.proc.wait(30) == 2
        assert "cannot reach the scheduler at 127.0.0.1:" in worker.output
    finally:
        worker.kill()


async def test_a_stopped_worker_holds_a_call_no_longer_than_its_deadline(model_dir):
    """SIGSTOP one of two workers: the call in flight to it times out at its deadline and runs on the other;
    the next calls must not wait out a redial's handshake timeout (10 s) to the stopped one either."""
    sched, address = start_scheduler("--workers", "0", "--heartbeat-timeout", "8")  # it stays routed meanwhile
    workers = [join_worker(address, name) for name in ("a", "b")]
    client = None
    try:
        client = await connect(address, 2)
        calls = [call(spec(model_dir, 0, block), seed=block) for block in range(4)]
        await client.invoke(calls)
        held = await resident(client)
        assert held.get("a") and held.get("b"), held  # each worker holds some of them
        os.kill(workers[0].proc.pid, signal.SIGSTOP)
        worst, until = 0.0, time.monotonic() + 8
        while time.monotonic() < until:
            started = time.monotonic()
            outputs = await asyncio.wait_for(client.invoke(calls), 60)
            worst = max(worst, time.monotonic() - started)
            assert all(torch.equal(out, expected(model_dir, c)) for c, out in zip(calls, outputs))
        assert worst < 5.0, f"a call waited {worst:.1f}s (the invoke deadline is {client.deadline_min_s}s)"
    finally:
        if client is not None:
            await client.close()
        os.kill(workers[0].proc.pid, signal.SIGCONT)
        for proc in (*workers, sched):
            proc.stop()
