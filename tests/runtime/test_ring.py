"""The call ring (runtime.ring): warm invokes to a worker on this host posted into shared memory, a pipe
as doorbell, served on the worker's ring thread without its event loop.

Real scheduler and worker processes, this process the frontend: warm calls go through the ring and equal
the socket's outputs bit for bit; a cold block comes back to the socket, which loads it; a worker killed
with a call in the ring fails it at once (not at the deadline); a record that points outside its slot is
refused with the reason while the worker serves on; FAASMOE_RING=0 keeps the socket as doorbell.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from runtime import ring
from runtime.client import InvokeError, RuntimeClient

from ..processes import faasmoe
from .test_cluster import TOKEN, call, connect, expected, spec, start_scheduler
from .test_shm_hop import our_shm_files


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("models") / "tiny", "qwen2_moe", seed=7, progress=False)


def join(scheduler: str, worker_id: str, memory: str = "64MiB", env: dict[str, str] | None = None):
    proc = faasmoe("-v", "worker", "join", scheduler, "--token", TOKEN, "--id", worker_id, "--device", "cpu",
                   "--memory", memory, "--host-cache", "0", "--listen", "127.0.0.1:0", env=env)
    proc.wait_for("listening at")
    return proc


@pytest.fixture(scope="module")
def cluster():
    sched, address = start_scheduler()
    worker = None
    try:
        worker = join(address, "w-ring")
        yield address, worker
    finally:
        if worker is not None:
            worker.stop()
        sched.stop()


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
    sched, address = start_scheduler()
    config_bytes = spec(model_dir, 0, 0).nbytes
    worker = None
    try:  # room for one block: every other call evicts the one before
        worker = join(address, "w-small", memory=str(config_bytes + config_bytes // 2))
        client = await connect(address, 1)
        try:
            a, b = call(spec(model_dir, 0, 0), seed=1), call(spec(model_dir, 0, 1), seed=2)
            for c in (a, b, b, a):  # a cold, b cold, b warm (ring), a known but evicted: cold again
                (out,) = await client.invoke([c])
                assert torch.equal(out, expected(model_dir, c))
            assert client.stats.ring_messages == 1 and client.stats.cold_starts == 3
        finally:
            await client.close()
    finally:
        if worker is not None:
            worker.stop()
        sched.stop()


async def test_a_worker_killed_with_a_call_in_the_ring_fails_it_at_once(model_dir):
    sched, address = start_scheduler()
    worker = None
    try:
        worker = join(address, "w-doomed")
        client = await connect(address, 1)
        try:
            c = call(spec(model_dir, 0, 0), seed=3)
            await client.invoke([c])
            await client.invoke([c])
            assert client.stats.ring_messages == 1
            os.kill(worker.proc.pid, signal.SIGSTOP)  # the call waits in the ring
            pending = asyncio.create_task(client.invoke([c]))
            await asyncio.sleep(0.3)
            assert not pending.done()
            worker.kill()
            started = time.monotonic()
            with pytest.raises(InvokeError):  # its only worker is gone: no retry can succeed
                await pending
            assert time.monotonic() - started < 1.5  # the socket's close, not the 2 s deadline
            assert our_shm_files() == []
        finally:
            await client.close()
    finally:
        if worker is not None:
            worker.kill()
        sched.stop()


async def test_a_record_pointing_outside_its_slot_is_refused_and_the_worker_serves_on(cluster, model_dir):
    address, worker = cluster
    client = await connect(address, 1)
    try:
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
        state = await caller.post(slot, 1, 1 << 20, 64, 0, 0, 64, 64)
        assert state == ring.FAILED and "does not fit its slot" in caller.failure(slot, 4096)
        region.release(slot)
        worker.wait_for("ring call in slot .* failed")
        (out,) = await client.invoke([c])
        assert torch.equal(out, expected(model_dir, c)) and client.stats.ring_messages == 1
        assert worker.alive()
    finally:
        await client.close()


async def test_with_the_ring_off_the_socket_is_the_doorbell(cluster, model_dir, monkeypatch):
    address, _ = cluster
    monkeypatch.setenv(ring.RING_ENV, "0")
    client = await connect(address, 1)
    try:
        c = call(spec(model_dir, 1, 0), seed=5)
        for _ in range(3):
            (out,) = await client.invoke([c])
            assert torch.equal(out, expected(model_dir, c))
        assert client.stats.ring_messages == 0 and client.stats.shm_messages == 3
        assert client._channels["w-ring"].conn.ring is None
    finally:
        await client.close()
