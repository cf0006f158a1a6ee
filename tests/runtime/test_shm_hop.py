"""The shared-memory hop between a frontend and a worker on the same host (runtime.shm).

Real scheduler and worker processes on loopback (the helpers of test_cluster), this process the
frontend: shared memory gives the socket's outputs bit for bit, leaves no name in /dev/shm once
set up nor after a SIGKILL, drops a peer that points outside its region while the worker goes
on serving others, sends an oversized batch through the socket, and is off with FAASMOE_SHM=0.
"""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import pytest
import torch

from runtime import protocol as p
from runtime import shm
from runtime.client import RuntimeClient
from runtime.transport import Connection, client_handshake, open_connection

from ..processes import faasmoe
from .test_cluster import TOKEN, call, connect, expected, spec, start_scheduler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("models") / "tiny", "qwen2_moe", seed=5, progress=False)


def join(scheduler: str, worker_id: str, env: dict[str, str] | None = None, memory: str = "64MiB"):
    """A worker that logs at INFO (which path each connection uses), on loopback TCP."""
    proc = faasmoe("-v", "worker", "join", scheduler, "--token", TOKEN, "--id", worker_id, "--device", "cpu",
                   "--memory", memory, "--host-cache", "0", "--listen", "127.0.0.1:0", env=env)
    proc.wait_for("listening at")
    return proc


def our_shm_files() -> list[str]:
    """Names this process (the frontend) created in /dev/shm and are still there."""
    return sorted(f.name for f in Path(shm.SHM_DIR).glob(f"faasmoe-{os.getpid()}-*"))


@pytest.fixture(scope="module")
def cluster():
    sched, address = start_scheduler()
    worker = None
    try:
        worker = join(address, "w-shm")
        yield address, worker
    finally:
        if worker is not None:
            worker.stop()
        sched.stop()


def region_of(client: RuntimeClient, wid: str) -> shm.OfferedRegion | None:
    return client._channels[wid].conn.region


async def test_outputs_through_shared_memory_equal_the_socket_bit_for_bit(cluster, model_dir):
    address, worker = cluster
    over_shm = await connect(address, 1)
    over_socket = RuntimeClient(address, TOKEN, shm_slots=0)
    await over_socket.start()
    try:
        layers = [[call(spec(model_dir, layer, b), rows=5 + b, seed=10 * layer + b) for b in range(3)]
                  for layer in (0, 1)]
        for calls in layers:
            a, b = await over_shm.invoke(calls), await over_socket.invoke(calls)
            for c, x, y in zip(calls, a, b):
                assert torch.equal(x, y) and torch.equal(x, expected(model_dir, c))
        region = region_of(over_shm, "w-shm")
        assert region is not None and region_of(over_socket, "w-shm") is None
        assert not Path(shm.SHM_DIR, region.name).exists()  # unlinked once both sides mapped it
        assert our_shm_files() == []
        assert over_shm.stats.shm_messages == over_shm.stats.messages > 0
        assert over_socket.stats.shm_messages == 0
        worker.wait_for(r"connection from frontend-\S+: invokes through shared memory")

        # More invokes in flight than slots: the extra ones take the socket, every output is right;
        # outputs kept by the caller keep their slots, and dropping them gives the slots back.
        concurrent = [[call(spec(model_dir, 0, b % 4), rows=4, seed=100 + i) for b in range(2)]
                      for i in range(shm.DEFAULT_SLOTS + 3)]
        before = over_shm.stats.shm_messages
        results = await asyncio.gather(*(over_shm.invoke(calls) for calls in concurrent))
        for calls, outs in zip(concurrent, results):
            for c, out in zip(calls, outs):
                assert torch.equal(out, expected(model_dir, c))
        sent = over_shm.stats.shm_messages - before
        assert 0 < sent <= shm.DEFAULT_SLOTS  # the slots hold the outputs we still keep
        del results, outs, out
        await asyncio.sleep(0)  # the loop's handle that woke us still holds gather's future, and it the outputs
        gc.collect()
        again = await over_shm.invoke(concurrent[0])
        assert over_shm.stats.shm_messages == before + sent + 1  # a slot was free again
        assert all(torch.equal(out, expected(model_dir, c)) for c, out in zip(concurrent[0], again))
    finally:
        await over_shm.close()
        await over_socket.close()


async def test_an_oversized_batch_goes_through_the_socket(cluster, model_dir):
    address, _ = cluster
    client = RuntimeClient(address, TOKEN, shm_slot_bytes=4096)  # one page: 16 rows of hidden 64 in fp32
    await client.start()
    try:
        small, big = call(spec(model_dir, 0, 1), rows=6, seed=1), call(spec(model_dir, 0, 1), rows=40, seed=2)
        for c in (small, big, small):
            (out,) = await client.invoke([c])
            # the worker's kernels may block 40 rows differently from this process's: not bit for bit
            torch.testing.assert_close(out, expected(model_dir, c), rtol=1e-5, atol=1e-6)
        assert region_of(client, "w-shm") is not None
        assert (client.stats.messages, client.stats.shm_messages) == (3, 2)
    finally:
        await client.close()


async def test_with_shm_off_the_socket_is_used(cluster, model_dir, monkeypatch):
    address, worker = cluster
    monkeypatch.setenv(shm.SHM_ENV, "0")
    client = await connect(address, 1)
    try:
        c = call(spec(model_dir, 0, 2), seed=3)
        (out,) = await client.invoke([c])
        assert torch.equal(out, expected(model_dir, c))
        assert region_of(client, "w-shm") is None and client.stats.shm_messages == 0
    finally:
        await client.close()

    # Off on the worker's side: it refuses the offer, says why, and serves the socket.
    monkeypatch.delenv(shm.SHM_ENV)
    refusing = join(address, "w-no-shm", env={shm.SHM_ENV: "0"})
    client = await connect(address, 2)
    try:
        c = call(spec(model_dir, 0, 3), seed=4)
        (out,) = await client._invoke_on("w-no-shm", [c], None)  # that worker, whatever the placement
        assert torch.equal(out, expected(model_dir, c))
        assert region_of(client, "w-no-shm") is None and client.stats.shm_messages == 0
        refusing.wait_for(r"invokes over the socket \(FAASMOE_SHM=0 on the worker\)")
        assert our_shm_files() == []  # the refused region was unlinked too
    finally:
        await client.close()
        refusing.stop()


async def test_a_sigkilled_worker_leaves_no_shared_memory(model_dir):
    sched, address = start_scheduler()
    worker = None
    try:
        worker = join(address, "w-doomed")
        client = await connect(address, 1)
        try:
            c = call(spec(model_dir, 0, 0), seed=5)
            (out,) = await client.invoke([c])
            assert client.stats.shm_messages == 1 and torch.equal(out, expected(model_dir, c))
            worker.kill()
            assert our_shm_files() == []
        finally:
            await client.close()
    finally:
        if worker is not None:
            worker.kill()
        sched.stop()
    assert our_shm_files() == []


class LyingRegion(shm.SharedRegion):
    """Sends every tensor as a reference to offset `at`, wherever it is: a peer's bad offset."""

    def __init__(self, at: int) -> None:
        self.at, self.nbytes = at, 1 << 62

    def offset_of(self, t: torch.Tensor) -> int:
        return self.at


async def shared_connection(address: str, slots: int = 1) -> tuple[Connection, shm.OfferedRegion]:
    conn = await open_connection(address)
    await client_handshake(conn, TOKEN, "frontend", "shm-attacker")
    region = shm.OfferedRegion.create(slots, 4096)
    await conn.send_drain(region.offer())
    reply = await conn.recv()
    region.unlink()
    assert isinstance(reply, p.Ok), reply
    return conn, region


async def test_a_peer_pointing_outside_its_region_is_dropped_and_the_worker_serves_others(cluster, model_dir):
    address, worker = cluster
    good = await connect(address, 1)
    worker_address = good.workers["w-shm"].address
    fn = spec(model_dir, 0, 0)
    try:
        c = call(fn, seed=6)
        await good.invoke([c])  # a connection that shares memory, open across the attacks

        def bad_offset(conn: Connection, region: shm.SharedRegion) -> None:  # x "lies" past the region's end
            conn.region = LyingRegion(region.nbytes + 4096)
            conn.send(p.Invoke(1, [fn.function_id], [6], c.x, c.experts, [fn]))
            conn.region = region

        def bad_output(conn: Connection, region: shm.SharedRegion) -> None:  # output area runs past the end
            conn.send(p.Invoke(1, [fn.function_id], [6], c.x, c.experts, [fn], region.nbytes - 64, 4096))

        for attack, logged in ((bad_offset, r"shared tensor at \d+\+1536 is not in the \d+-byte region"),
                               (bad_output, r"Invoke output span \d+\+4096 is not in the \d+-byte shared region")):
            conn, region = await shared_connection(worker_address)
            try:
                attack(conn, region)
                async with asyncio.timeout(10):
                    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                        await conn.recv()
            finally:
                await conn.close()
            worker.wait_for(f"dropping connection from .*{logged}", timeout=10)
            (out,) = await good.invoke([c])
            assert torch.equal(out, expected(model_dir, c))

        # A shared reference on a connection that never set up shared memory: dropped too.
        conn = await open_connection(worker_address)
        await client_handshake(conn, TOKEN, "frontend", "shm-stranger")
        try:
            conn.region = LyingRegion(64)
            conn.send(p.Invoke(1, [fn.function_id], [6], c.x, c.experts, [fn]))
            conn.region = None
            async with asyncio.timeout(10):
                with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                    await conn.recv()
        finally:
            await conn.close()
        worker.wait_for("dropping connection from .*a shared-memory tensor on a connection without shared memory")
        (out,) = await good.invoke([c])
        assert torch.equal(out, expected(model_dir, c)) and good.stats.shm_messages == good.stats.messages
        assert worker.alive()
    finally:
        await good.close()


def frame_body(pieces: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(piece) for piece in pieces)[4:]


def test_a_slot_is_lent_again_only_after_its_reply_and_once_its_outputs_are_gone():
    """In process, both ends: the frontend's region and the worker's mapping of it."""
    ours = shm.OfferedRegion.create(slots=1, slot_bytes=4096)
    try:
        theirs = shm.SharedRegion.accept(ours.offer())
    finally:
        ours.unlink()
    assert our_shm_files() == []
    xs, es = [torch.randn(3, 8), torch.randn(2, 8)], [torch.tensor([0, 1, 1]), torch.tensor([2, 3])]
    x, e, out_at = ours.place(xs, es, 5 * 8 * 4)
    sent = p.Invoke(1, ["a", "b"], [3, 2], x, e, [], out_at, ours.slot_bytes)
    frame = p.encode(sent, ours)
    ours.sending(sent)
    assert len(frame_body(frame)) < 200  # the doorbell: no tensor bytes in the frame
    got = p.decode(frame_body(frame), theirs)
    assert torch.equal(got.x, torch.cat(xs)) and torch.equal(got.experts, torch.cat(es))
    assert ours.place(xs, es, 160) is None  # the only slot is in flight

    # The worker writes its output in place and answers with a reference.
    out = theirs.view(got.out_offset, got.out_nbytes)[:160].view(torch.float32).view(5, 8)
    out.copy_(got.x * 2)
    reply = p.decode(frame_body(p.encode(p.Result(1, out), theirs)), ours)
    ours.received(reply)
    first, second = reply.output.split([3, 2])
    del reply
    assert torch.equal(torch.cat([first, second]), torch.cat(xs) * 2)
    assert ours.place(xs, es, 160) is None  # the outputs the caller holds pin the slot
    del first
    assert ours.place(xs, es, 160) is None  # a view of the same output still does
    del second
    gc.collect()
    assert ours.place(xs, es, 160) is not None  # now it is lent again

    # A reply nobody awaits any more (its waiter was cancelled) still gives the slot back.
    lent = ours.place(xs, es, 160)
    assert lent is None  # the slot above is in flight
    ours.sending(p.Invoke(2, ["a", "b"], [3, 2], x, e, [], out_at, ours.slot_bytes))
    ours.received(p.Error(2, "bad_request", "late"))
    x, e, out_at = ours.place(xs, es, 160)
    ours.sending(p.Invoke(3, ["a", "b"], [3, 2], x, e, [], out_at, ours.slot_bytes))

    # References the frontend did not lend are refused: its input area, an output area with no invoke in flight.
    into_input = theirs.view(ours.offset_of(x), 160).view(torch.float32)
    with pytest.raises(p.ProtocolError, match="not in an output area lent"):
        p.decode(frame_body(p.encode(p.Result(3, into_input), theirs)), ours)
    ours.received(p.Error(3, "bad_request", "done"))
    with pytest.raises(p.ProtocolError, match="not in an output area lent"):
        p.decode(frame_body(p.encode(p.Result(4, theirs.view(out_at, 160).view(torch.float32)), theirs)), ours)


def test_a_region_left_by_a_killed_frontend_is_removed_by_the_next_one():
    """A frontend SIGKILLed within its offer's round trip leaves its file; a later frontend removes it."""
    import subprocess
    import sys

    orphan = subprocess.run([sys.executable, "-c", "import os\nfrom runtime import shm\n"
                             "region = shm.OfferedRegion.create(1, 4096)\nprint(region.name, flush=True)\n"
                             "os.kill(os.getpid(), 9)"], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    name = orphan.stdout.strip()
    assert name and Path(shm.SHM_DIR, name).exists(), orphan.stderr
    shm._swept = False  # this process has made regions already: sweep again, as a new frontend would
    region = shm.OfferedRegion.create(1, 4096)
    region.unlink()
    assert not Path(shm.SHM_DIR, name).exists()
    assert our_shm_files() == []
