"""The call ring (runtime.ring): warm invokes to a worker on this host posted into shared memory, a pipe
as doorbell, served on the worker's ring thread without its event loop.

Real scheduler and worker processes, this process the frontend: warm calls go through the ring and equal
the socket's outputs bit for bit; a cold block comes back to the socket, which loads it; a worker killed
with a call in the ring fails it at once (not at the deadline); a record that points outside its slot is
refused with the reason while the worker serves on; FAASMOE_RING=0 keeps the socket as doorbell.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from runtime import ring
from runtime.client import InvokeError, RuntimeClient

from .test_cluster import TOKEN, call, connect, expected, spec, start_scheduler
from .test_shm_hop import join, our_shm_files


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("models") / "tiny", "qwen2_moe", seed=7, progress=False)


@contextlib.contextmanager
def pool(worker_id: str, memory: str = "64MiB"):
    """A scheduler and one worker on loopback: (scheduler address, worker process); both gone afterwards."""
    sched, address = start_scheduler()
    worker = None
    try:
        worker = join(address, worker_id, memory=memory)
        yield address, worker
    finally:
        if worker is not None:
            worker.kill()
        sched.stop()


@contextlib.asynccontextmanager
async def client_of(address: str):
    """A RuntimeClient of the scheduler at `address` waiting for its one worker; closed afterwards."""
    client = await connect(address, 1)
    try:
        yield client
    finally:
        await client.close()


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of `pid` is in the stopped state: SIGSTOP takes each thread when it next leaves the
    kernel, which on a loaded machine can be after kill() returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, IndexError):
                pass
        if states and all(state in "tT" for state in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


async def killed_with_a_call_pending(worker, start_call) -> tuple[asyncio.Future, float]:
    """Stop the worker, start a call (it waits in the ring), check it waits, kill the worker: the call and
    when the kill happened."""
    os.kill(worker.proc.pid, signal.SIGSTOP)
    wait_stopped(worker.proc.pid)
    pending = start_call()
    await asyncio.sleep(0.3)
    assert not pending.done()
    worker.kill()
    return pending, time.monotonic()


@pytest.fixture(scope="module")
def cluster():
    with pool("w-ring") as running:
        yield running


async def test_warm_calls_go_through_the_ring_and_equal_the_socket(cluster, model_dir):
    address, worker = cluster
    over_ring = await connect(address, 1)
    over_socket = await RuntimeClient(address, TOKEN, call_ring=False).start()
    try:
        layers = [[call(spec(model_dir, layer, b), rows=3 + b, seed=10 * layer + b) for b in range(3)]
                  for layer in (0, 1)]
        for _ in range(3):  # the first round loads (the socket), the next ones are warm
            for calls in layers:
                a, b = await over_ring.invoke(calls), await over_socket.invoke(calls)
                for c, x, y in zip(calls, a, b):
                    assert torch.equal(x, y) and torch.equal(x, expected(model_dir, c))
        assert over_ring.stats.ring_messages == 4 and over_ring.stats.messages == 6
        assert over_socket.stats.ring_messages == 0 and over_socket.stats.shm_messages == 6
        assert over_ring._channels["w-ring"].conn.ring is not None
        assert our_shm_files() == []  # the region's and the doorbells' names are gone once set up
        worker.wait_for("invokes through shared memory .*a call ring")
    finally:
        await over_ring.close()
        await over_socket.close()


async def test_a_cold_block_goes_through_the_socket_which_loads_it(model_dir):
    block_bytes = spec(model_dir, 0, 0).nbytes
    with pool("w-small", memory=str(block_bytes + block_bytes // 2)) as (address, _):  # one block: each evicts the last
        async with client_of(address) as client:
            a, b = call(spec(model_dir, 0, 0), seed=1), call(spec(model_dir, 0, 1), seed=2)
            for c in (a, b, b, a):  # a cold, b cold, b warm (ring), a known but evicted: cold again
                (out,) = await client.invoke([c])
                assert torch.equal(out, expected(model_dir, c))
            assert client.stats.ring_messages == 1 and client.stats.cold_starts == 3


async def test_a_worker_killed_with_a_call_in_the_ring_fails_it_at_once(model_dir):
    with pool("w-doomed") as (address, worker):
        async with client_of(address) as client:
            c = call(spec(model_dir, 0, 0), seed=3)
            await client.invoke([c])
            await client.invoke([c])
            assert client.stats.ring_messages == 1
            pending, started = await killed_with_a_call_pending(worker, lambda: asyncio.create_task(client.invoke([c])))
            with pytest.raises(InvokeError):  # its only worker is gone: no retry can succeed
                await pending
            assert time.monotonic() - started < 1.5  # the socket's close, not the 2 s deadline
            assert our_shm_files() == []


async def test_a_record_pointing_outside_its_slot_is_refused_and_the_worker_serves_on(cluster, model_dir):
    address, worker = cluster
    async with client_of(address) as client:
        c = call(spec(model_dir, 0, 0), seed=4)
        await client.invoke([c])
        channel = client._channels["w-ring"]
        region, caller = channel.conn.region, channel.conn.ring

        x, e, out_offset = region.place([c.x], [c.experts], c.x.nbytes)
        slot = region.slot_of(out_offset)

        async def refused(*call_list) -> str:
            state, _, _, nbytes = await caller.call(slot, *call_list, 5.0)
            assert state == ring.FAILED
            return caller.failure(slot, nbytes)

        # A call list that does not add up to the record's rows, and a record bigger than its slot.
        assert "calls of 1048576 rows in a record of 6" in await refused([c.function.function_id], [1 << 20], x, e, 64)
        state = await caller.post(slot, 1, 1 << 20, 64, 0, 0, 0, 64, 64)
        assert state == ring.FAILED and "does not fit its slot" in caller.failure(slot, 4096)
        region.release(slot)
        worker.wait_for("ring call in slot .* failed")
        (out,) = await client.invoke([c])
        assert torch.equal(out, expected(model_dir, c)) and client.stats.ring_messages == 1
        assert worker.alive()


async def test_with_the_ring_off_the_socket_is_the_doorbell(cluster, model_dir, monkeypatch):
    address, _ = cluster
    monkeypatch.setenv(ring.RING_ENV, "0")
    async with client_of(address) as client:
        c = call(spec(model_dir, 1, 0), seed=5)
        for _ in range(3):
            (out,) = await client.invoke([c])
            assert torch.equal(out, expected(model_dir, c))
        assert client.stats.ring_messages == 0 and client.stats.shm_messages == 3
        assert client._channels["w-ring"].conn.ring is None


async def test_rows_of_any_width_reach_the_ring_thread_with_their_expert_indices():
    """In process, both ends: 3 rows of hidden 5 (60 bytes, so the expert indices start at the next 64-byte
    boundary, not right after the rows) are read back by the worker's side exactly as placed."""
    from runtime import shm

    seen = []

    def serve(call: ring.RingCall):
        seen.append((call.function_ids, call.rows, call.x.clone(), call.experts.clone()))
        return call.x + call.experts.to(call.x.dtype)[:, None], 0.001

    ours = shm.OfferedRegion.create(slots=2, slot_bytes=4096)
    caller = ring.RingCaller.create(ours)
    try:
        theirs = shm.SharedRegion.accept(ours.offer(ring=True))
        server = ring.RingServer(theirs, serve, "test-ring")
    finally:
        ours.unlink()
        ring.RingCaller.unlink_paths(ours.path)
    assert caller.accepted() and our_shm_files() == []
    caller.start()
    try:
        xs, es = [torch.randn(2, 5), torch.randn(1, 5)], [torch.tensor([3, 1]), torch.tensor([2])]
        x, e, out_at = ours.place(xs, es, 3 * 5 * 4)
        slot = ours.slot_of(out_at)
        state, compute_s, dtype, nbytes = await caller.call(slot, ["fn-a", "fn-b"], [2, 1], x, e, 3 * 5 * 4, 5.0)
        assert state == ring.DONE and dtype == torch.float32 and nbytes == 60 and compute_s == 0.001
        (ids, rows, got_x, got_e), = seen
        assert ids == ["fn-a", "fn-b"] and rows == [2, 1]
        assert torch.equal(got_x, torch.cat(xs)) and torch.equal(got_e, torch.tensor([3, 1, 2]))
        out = ours.view(ours.output_at(slot), nbytes).view(torch.float32).view(3, 5)
        assert torch.equal(out, torch.cat(xs) + torch.tensor([3.0, 1.0, 2.0])[:, None])
    finally:
        caller.close()
        server.close()


async def test_warm_calls_from_a_thread_need_no_event_loop_and_equal_the_model(cluster, model_dir):
    """`invoke_warm` is called here on the event loop's own thread, blocking it: the answer can only come
    through the futex on the slot's state word, never through the loop."""
    address, _ = cluster
    async with client_of(address) as client:
        calls = [call(spec(model_dir, 0, b), rows=2 + b, seed=20 + b) for b in range(2)]
        assert client.invoke_warm(calls) is None  # the worker does not know them yet: `invoke` must
        await client.invoke(calls)  # loads them
        channel = client._channels["w-ring"]
        assert channel.conn.ring.synchronous
        for _ in range(3):
            outputs = client.invoke_warm(calls)
            assert outputs is not None
            for c, out in zip(calls, outputs):
                assert torch.equal(out, expected(model_dir, c))
        assert client.stats.sync_messages == 3 and client.stats.ring_messages == 3
        assert channel.conn.ring._pending == {}  # nothing went through the loop's "done" doorbell
        del outputs, out
        assert channel.conn.region._take() is not None  # the slots came back


async def test_a_warm_call_from_a_thread_to_an_evicted_block_is_left_to_invoke(model_dir):
    block_bytes = spec(model_dir, 0, 0).nbytes
    with pool("w-small-sync", memory=str(block_bytes + block_bytes // 2)) as (address, _):
        async with client_of(address) as client:
            a, b = call(spec(model_dir, 0, 0), seed=1), call(spec(model_dir, 0, 1), seed=2)
            await client.invoke([a])
            await client.invoke([b])  # evicts a
            assert await asyncio.to_thread(client.invoke_warm, [a]) is None  # the worker answered COLD
            region = client._channels["w-small-sync"].conn.region
            assert not any(region._in_flight)  # its slot came back
            (out,) = await client.invoke([a])
            assert torch.equal(out, expected(model_dir, a)) and client.stats.sync_messages == 0


async def test_a_worker_killed_with_a_call_from_a_thread_fails_it_at_once(model_dir):
    with pool("w-doomed-sync") as (address, worker):
        async with client_of(address) as client:
            c = call(spec(model_dir, 0, 0), seed=3)
            await client.invoke([c])
            assert await asyncio.to_thread(client.invoke_warm, [c]) is not None
            pending, started = await killed_with_a_call_pending(
                worker, lambda: asyncio.ensure_future(asyncio.to_thread(client.invoke_warm, [c])))
            assert await pending is None  # left to `invoke`, which finds the worker gone
            assert time.monotonic() - started < 1.5  # the socket's close woke it, not the 2 s deadline
