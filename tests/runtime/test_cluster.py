"""The runtime end to end: a scheduler, worker processes and a client on loopback.

No mocks: real `faasmoe scheduler` / `faasmoe worker join` processes, real sockets, the real
tiny checkpoint. Every test stops what it starts.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from faasmoe.engine.functions import block_content_at
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig
from faasmoe.model.experts import ExpertBlock
from runtime import protocol as p
from runtime.client import FunctionCall, RuntimeClient

from ..processes import faasmoe, free_port

TOKEN = "test-cluster-token"
BLOCK = 4  # experts per function; the tiny qwen2_moe has 16 per layer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("models") / "tiny", "qwen2_moe", seed=5, progress=False)


def spec(model_dir, layer: int, block: int, keep_alive_s: float = 60.0) -> p.FunctionSpec:
    config = MoEConfig.from_pretrained(model_dir)
    return p.FunctionSpec(f"tiny/{layer}/{block}", str(model_dir), layer, block * BLOCK, BLOCK, "float32",
                          BLOCK * config.expert_bytes(torch.float32), "", keep_alive_s,
                          content=block_content_at(model_dir, layer, block * BLOCK, BLOCK, "float32"))


def call(fn: p.FunctionSpec, rows: int = 6, seed: int = 0) -> FunctionCall:
    g = torch.Generator().manual_seed(seed)
    return FunctionCall(fn, torch.randn(rows, 64, generator=g), torch.randint(0, BLOCK, (rows,), generator=g))


def expected(model_dir, c: FunctionCall) -> torch.Tensor:
    config = MoEConfig.from_pretrained(model_dir)
    weights = ExpertLayout(CheckpointReader(model_dir), config).load_block(
        c.function.layer, c.function.first, c.function.count, torch.float32)
    return ExpertBlock(c.function.layer, c.function.first, weights).forward(c.x, c.experts)


def start_scheduler(*extra: str, port: int | None = None, env: dict[str, str] | None = None):
    """A scheduler with no local workers unless `extra` asks for some."""
    port = port or free_port()
    proc = faasmoe("scheduler", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--device", "cpu",
                   "--heartbeat-timeout", "2", *(extra or ("--workers", "0")), env=env)
    proc.wait_for("scheduler listening at")
    return proc, f"127.0.0.1:{port}"


def join_worker(scheduler: str, worker_id: str, memory: str = "64MiB", token: str = TOKEN, *extra: str):
    proc = faasmoe("worker", "join", scheduler, "--token", token, "--id", worker_id, "--device", "cpu",
                   "--memory", memory, "--host-cache", "64MiB", "--listen", "127.0.0.1:0", *extra)
    return proc


async def connect(scheduler: str, workers: int) -> RuntimeClient:
    client = await RuntimeClient(scheduler, TOKEN).start()
    async with asyncio.timeout(60):
        while len(client.workers) < workers:
            await asyncio.sleep(0.05)
    return client


async def resident(client: RuntimeClient) -> dict[str, set[str]]:
    return {s.worker.worker_id: {r.function.function_id for r in s.resident if r.tier == "device"}
            for s in await client.cluster_state()}


async def counters(client: RuntimeClient) -> dict[str, dict[str, float]]:
    return {s.worker.worker_id: s.counters for s in await client.cluster_state()}


async def test_cold_then_warm_invoke_over_a_local_pool(model_dir):
    http_port = free_port()
    sched, address = start_scheduler("--workers", "2", "--worker-memory", "64MiB", "--http", f"127.0.0.1:{http_port}")
    client = None
    try:
        client = await connect(address, 2)
        calls = [call(spec(model_dir, 0, b), seed=b) for b in range(4)]
        outputs = await client.invoke(calls)
        for c, out in zip(calls, outputs):
            assert torch.equal(out, expected(model_dir, c))
        assert client.stats.cold_starts == 4
        assert len(client.stats.per_worker) == 2  # placement spread the functions
        assert client.stats.messages == 2  # one message per worker for the layer
        again = await client.invoke(calls)
        assert client.stats.cold_starts == 4  # warm: nothing loaded again
        assert all(torch.equal(a, b) for a, b in zip(outputs, again))
        held = await resident(client)
        assert set().union(*held.values()) == {c.function.function_id for c in calls}
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{http_port}/metrics")
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert sum(float(line.split()[-1]) for line in samples
                   if line.startswith("faasmoe_expert_cold_starts_total{")) == 4
        assert sum(float(line.split()[-1]) for line in samples
                   if line.startswith("faasmoe_expert_invocations_total{")) == 8
        for name in ("faasmoe_resident_expert_bytes", "faasmoe_worker_invoke_seconds", "faasmoe_expert_load_seconds",
                     "faasmoe_worker_queue_depth", "faasmoe_expert_evictions_total", "faasmoe_scheduler_workers"):
            assert text.count(f"# TYPE {name} ") == 1, name  # one family, both workers' samples inside
        series = {(s.name, frozenset(s.labels.items())): s.value
                  for family in text_string_to_metric_families(text) for s in family.samples}
        assert ("faasmoe_resident_expert_bytes", frozenset({("worker", "local-0"), ("tier", "device")})) in series
        processes = {dict(labels)["component"] + "/" + dict(labels)["worker"]
                     for name, labels in series if name == "process_resident_memory_bytes"}
        assert processes == {"scheduler/", "worker/local-0", "worker/local-1"}  # each process told apart
        cluster = json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{http_port}/cluster"))
        assert sorted(w["id"] for w in cluster["workers"]) == ["local-0", "local-1"]
        assert sum(len(w["resident_functions"]) for w in cluster["workers"]) == 4
        # A tenant's private function: its id (tenant and model) only for who holds the cluster token.
        secret = p.FunctionSpec("beta:secret/0/0", str(model_dir), 0, 0, BLOCK, "float32", spec(model_dir, 0, 0).nbytes,
                                "beta", 60.0, content=spec(model_dir, 0, 0).content)
        await client.invoke([call(secret)])
        url = f"http://127.0.0.1:{http_port}/cluster"
        anonymous = json.loads(await asyncio.to_thread(_get, url))
        operator = json.loads(await asyncio.to_thread(_get, url, TOKEN))
        assert "beta:secret/0/0" in {f for w in operator["workers"] for f in w["resident_functions"]}
        assert "secret" not in json.dumps(anonymous) and "beta" not in json.dumps(anonymous)
        assert sum(w["resident_bytes"] for w in anonymous["workers"]) == \
            sum(w["resident_bytes"] for w in operator["workers"])
    finally:
        if client:
            await client.close()
        assert sched.stop() == 0


async def test_lru_eviction_keep_alive_and_host_tier(model_dir):
    sched, address = start_scheduler()
    fn_bytes = spec(model_dir, 0, 0).nbytes
    worker = join_worker(address, "w-small", memory=str(2 * fn_bytes))  # room for two blocks
    client = None
    try:
        client = await connect(address, 1)
        a, b, c = (spec(model_dir, 1, i) for i in range(3))
        for fn in (a, b, a, c):  # b is least recently used when c needs room
            await client.invoke([call(fn)])
        assert (await resident(client))["w-small"] == {a.function_id, c.function_id}
        assert (await counters(client))["w-small"]["evictions_memory"] == 1

        short = spec(model_dir, 2, 0, keep_alive_s=0.5)
        before = client.stats.cold_starts
        first = await client.invoke([call(short, seed=3)])
        assert client.stats.cold_starts == before + 1
        deadline = time.monotonic() + 10
        while short.function_id in (await resident(client))["w-small"]:
            assert time.monotonic() < deadline, "keep-alive never expired"
            await asyncio.sleep(0.2)
        stats = (await counters(client))["w-small"]
        assert stats["evictions_keep_alive"] >= 1
        again = await client.invoke([call(short, seed=3)])  # scaled to zero: a cold start, from the host tier
        assert torch.equal(first[0], again[0])
        assert client.stats.cold_starts == before + 2
        stats = (await counters(client))["w-small"]
        assert stats["cold_starts_host"] >= 1
        disk_each = stats["load_seconds_disk"] / stats["cold_starts_disk"]
        host_each = stats["load_seconds_host"] / stats["cold_starts_host"]
        assert host_each < disk_each
    finally:
        if client:
            await client.close()
        worker.stop()
        sched.stop()


async def test_everything_idle_scales_to_zero(model_dir):
    sched, address = start_scheduler()
    worker = join_worker(address, "w-zero")
    client = None
    try:
        client = await connect(address, 1)
        await client.invoke([call(spec(model_dir, 0, b, keep_alive_s=0.3)) for b in range(4)])
        deadline = time.monotonic() + 10
        while (await counters(client))["w-zero"]["device_bytes"] > 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert (await resident(client))["w-zero"] == set()
    finally:
        if client:
            await client.close()
        worker.stop()
        sched.stop()


async def test_wrong_token_is_refused(model_dir):
    sched, address = start_scheduler()
    try:
        intruder = join_worker(address, "intruder", token="not-the-token")
        intruder.wait_for("refused this worker", timeout=60)
        assert intruder.proc.wait(30) == 2
        client = await RuntimeClient(address, TOKEN).start()
        await asyncio.sleep(0.5)
        assert client.workers == {}
        await client.close()
        with pytest.raises(p.ProtocolError, match="wrong cluster token"):
            await _handshake(address, "bad-token")
    finally:
        sched.stop()


async def _handshake(address: str, token: str) -> None:
    from runtime.transport import client_handshake, open_connection

    conn = await open_connection(address)
    try:
        await client_handshake(conn, token, "frontend", "probe")
    finally:
        await conn.close()


async def test_worker_killed_mid_invoke_is_retried_and_restarted(model_dir):
    sched, address = start_scheduler("--workers", "2", "--worker-memory", "64MiB")
    client = None
    try:
        client = await connect(address, 2)
        fn = spec(model_dir, 0, 1)
        warm = await client.invoke([call(fn)])  # place it somewhere
        holder = next(w for w, fns in (await resident(client)).items() if fn.function_id in fns)
        old_pid = client.workers[holder].pid
        big = call(fn, rows=400_000, seed=9)  # ~100 MB of activations: the call is in flight for a while
        task = asyncio.create_task(client.invoke([big]))
        await asyncio.sleep(0.15)
        import os
        import signal

        os.kill(old_pid, signal.SIGKILL)
        out = await asyncio.wait_for(task, 120)
        assert torch.equal(out[0], expected(model_dir, big))
        assert client.stats.retries >= 1
        assert warm[0].shape == (6, 64)
        deadline = time.monotonic() + 60  # the pool restarts the worker under the same id
        while not (holder in client.workers and client.workers[holder].pid != old_pid):
            assert time.monotonic() < deadline, "the local pool did not restart the worker"
            await asyncio.sleep(0.1)
    finally:
        if client:
            await client.close()
        assert sched.stop() == 0


async def test_scheduler_restart_workers_reregister_without_reloading(model_dir):
    port = free_port()
    sched, address = start_scheduler(port=port)
    worker = join_worker(address, "w-soft")
    client = None
    try:
        client = await connect(address, 1)
        fn = spec(model_dir, 1, 3)
        await client.invoke([call(fn)])
        assert client.stats.cold_starts == 1
        sched.kill()
        sched, _ = start_scheduler(port=port)
        deadline = time.monotonic() + 30
        while await resident(client) != {"w-soft": {fn.function_id}}:  # re-declared by the worker
            assert time.monotonic() < deadline, "the worker did not re-register its functions"
            await asyncio.sleep(0.2)
        await client.invoke([call(fn)])
        assert client.stats.cold_starts == 1
    finally:
        if client:
            await client.close()
        worker.stop()
        sched.stop()


def _get(url: str, token: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def _send_raw(address: str, data: bytes) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.recv(4096)  # the challenge
        s.sendall(data)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass


async def test_garbage_frames_do_not_crash_anything(model_dir):
    sched, address = start_scheduler()
    worker = join_worker(address, "w-tough")
    client = None
    try:
        client = await connect(address, 1)
        worker_address = client.workers["w-tough"].address
        for target in (address, worker_address):
            for junk in (b"\xff" * 64, struct.pack(">I", 2**31) + b"x", struct.pack(">I", 1000) + b"short",
                         struct.pack(">II", 12, 8) + b"\xc1" * 8):
                _send_raw(target, junk)
        assert sched.alive() and worker.alive()
        fn = spec(model_dir, 0, 2)
        out = await client.invoke([call(fn)])
        assert torch.equal(out[0], expected(model_dir, call(fn)))
        bad = FunctionCall(fn, torch.randn(3, 17), torch.zeros(3, dtype=torch.long))  # wrong hidden size
        with pytest.raises(RuntimeError, match="bad_request"):
            await client.invoke([bad])
        # Expert indices outside the block, in a decode-sized call and in one past the small-call path.
        for experts in (torch.tensor([0, BLOCK, 1]), torch.tensor([-1, 0, 0]), torch.full((80,), BLOCK)):
            wrong = FunctionCall(fn, torch.randn(experts.numel(), 64), experts)
            with pytest.raises(RuntimeError, match="expert indices must be in"):
                await client.invoke([wrong])
        out = await client.invoke([call(fn, rows=80)])  # a big call with good indices still runs
        assert torch.equal(out[0], expected(model_dir, call(fn, rows=80)))
        assert worker.alive()
    finally:
        if client:
            await client.close()
        worker.stop()
        sched.stop()


async def test_hot_function_gets_a_replica(model_dir):
    sched, address = start_scheduler()
    workers = [join_worker(address, f"w-rep{i}") for i in range(2)]
    client = None
    try:
        client = await connect(address, 2)
        fn = spec(model_dir, 0, 3)
        await client.invoke([call(fn)])
        assert len(client.routes[fn.function_id]) == 1
        heavy = call(fn, rows=60_000, seed=4)
        deadline = time.monotonic() + 30
        while len(client.routes.get(fn.function_id, [])) < 2:  # keep calls queued up until it replicates
            assert time.monotonic() < deadline, "a hot function was never replicated"
            await asyncio.gather(*(client.invoke([heavy]) for _ in range(6)))
        deadline = time.monotonic() + 30
        while set((await resident(client)).keys()) != {"w-rep0", "w-rep1"} or not all(
                fn.function_id in fns for fns in (await resident(client)).values()):
            assert time.monotonic() < deadline, "the replica was never loaded"
            await asyncio.sleep(0.2)
        before = dict(client.stats.per_worker)
        await asyncio.gather(*(client.invoke([call(fn, seed=i)]) for i in range(40)))
        served = {w: client.stats.per_worker.get(w, 0) - before.get(w, 0) for w in ("w-rep0", "w-rep1")}
        assert all(n > 0 for n in served.values()), served  # both replicas take calls
    finally:
        if client:
            await client.close()
        for w in workers:
            w.stop()
        sched.stop()


async def test_workers_do_not_spin_openmp_threads_unless_told_to(monkeypatch):
    """A pool worker's OpenMP threads sleep between regions (their spin would take the frontend's cores
    on a shared node); a scheduler started with its own OMP_WAIT_POLICY hands that one to its workers."""
    import psutil

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # the children inherit this environment

    async def pool_policy(env: dict[str, str] | None) -> str | None:
        sched, address = start_scheduler("--workers", "1", "--worker-memory", "64MiB", env=env)
        client = None
        try:
            client = await connect(address, 1)
            (worker,) = client.workers.values()
            return psutil.Process(worker.pid).environ().get("OMP_WAIT_POLICY")
        finally:
            if client:
                await client.close()
            sched.stop()

    assert await pool_policy(None) == "PASSIVE"
    assert await pool_policy({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
