"""The wire against hostile peers, on real worker processes and real sockets.

A malformed message from an authenticated peer, strangers that announce huge frames, stay silent
or open too many connections, a relay that tampers with frames after the handshake, and peers
that ask for checkpoints outside the worker's model roots: each is refused or dropped, logged,
and the worker goes on serving. Every test stops what it starts.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import sys
import time
from collections.abc import Callable

import psutil
import pytest
import torch

from faasmoe.engine.functions import block_content_at
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig
from faasmoe.model.experts import ExpertBlock
from runtime import protocol as p
from runtime.transport import Connection, client_handshake, open_connection

from ..processes import Process, faasmoe, free_port

TOKEN = "wire-security-token"
BLOCK = 4
MiB = 1 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("models") / "tiny", "qwen2_moe", seed=5, progress=False)


def start_worker(*extra: str) -> tuple[Process, str]:
    """A worker with no scheduler (frontends may still connect), on loopback TCP."""
    worker = Process([sys.executable, "-m", "worker", "--token", TOKEN, "--id", "w-wire", "--device", "cpu",
                      "--memory", "64MiB", "--host-cache", "0", "--listen", "127.0.0.1:0", *extra])
    try:
        address = worker.wait_for(r"listening at (\S+)", timeout=60).group(1)
    except BaseException:
        worker.stop()
        raise
    return worker, address


def spec(model_path, layer: int = 0, block: int = 0) -> p.FunctionSpec:
    config = MoEConfig.from_pretrained(model_path)
    return p.FunctionSpec(f"tiny/{layer}/{block}", str(model_path), layer, block * BLOCK, BLOCK, "float32",
                          BLOCK * config.expert_bytes(torch.float32),
                          content=block_content_at(model_path, layer, block * BLOCK, BLOCK, "float32"))


def invoke(fn: p.FunctionSpec, req_id: int = 1) -> p.Invoke:
    g = torch.Generator().manual_seed(req_id)
    return p.Invoke(req_id, [fn.function_id], [5], torch.randn(5, 64, generator=g),
                    torch.randint(0, BLOCK, (5,), generator=g), [fn])


def expected(fn: p.FunctionSpec, message: p.Invoke) -> torch.Tensor:
    config = MoEConfig.from_pretrained(fn.model_path)
    weights = ExpertLayout(CheckpointReader(fn.model_path), config).load_block(fn.layer, fn.first, fn.count,
                                                                               torch.float32)
    return ExpertBlock(fn.layer, fn.first, weights).forward(message.x, message.experts)


async def authenticated(address: str) -> Connection:
    conn = await open_connection(address)
    await client_handshake(conn, TOKEN, "frontend", "wire-test")
    return conn


async def request(address: str, message: p.Message, timeout: float = 20.0) -> p.Message:
    """One request on a fresh authenticated connection, and its reply."""
    conn = await authenticated(address)
    try:
        await conn.send_drain(message)
        async with asyncio.timeout(timeout):
            return await conn.recv()
    finally:
        await conn.close()


async def reply_or_drop(conn: Connection, timeout: float = 10.0) -> p.Message | None:
    """The peer's answer, or None when it closed the connection instead; never silence."""
    try:
        async with asyncio.timeout(timeout):
            return await conn.recv()
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def device_functions(stats: p.Stats) -> set[str]:
    return {r.function.function_id for r in stats.resident if r.tier == "device"}


# --- D4: a malformed message from an authenticated peer ----------------------------------------


MALFORMED_INVOKES = [
    (dict(x=[1.0, 2.0]), "Invoke.x"),  # the old decoder let this reach `x.shape`: AttributeError, no reply
    (dict(rows="5"), "Invoke.rows"),
    (dict(function_ids=5), "Invoke.function_ids"),
]


async def test_a_malformed_invoke_is_answered_or_dropped_and_the_worker_keeps_serving(model_dir):
    worker, address = start_worker()
    try:
        fn = spec(model_dir)
        for i, (bad, field) in enumerate(MALFORMED_INVOKES):
            malformed = p.Invoke(**{**vars(invoke(fn, req_id=7)), **bad})  # the encoder does not check types
            conn = await authenticated(address)
            try:
                conn.send(malformed)
                reply = await reply_or_drop(conn)
            finally:
                await conn.close()
            if reply is None:
                worker.wait_for(rf"dropping connection from .*bad field {field}", timeout=10)
            else:
                assert isinstance(reply, p.Error) and reply.req_id == 7, (field, reply)
            good = invoke(fn, req_id=10 + i)
            result = await request(address, good)
            assert isinstance(result, p.Result) and torch.equal(result.output, expected(fn, good)), field
        assert worker.alive()
    finally:
        worker.stop()


# --- D7: strangers before the handshake ----------------------------------------------------------


def announce_a_huge_frame(address: str, announced: int, push: int) -> socket.socket:
    """Take the challenge, announce a frame of `announced` bytes and push up to `push` of them.

    The socket stays open (so a server that buffers still holds the bytes); the caller closes it.
    """
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.recv(4096)  # the challenge
    chunk = b"\x00" * MiB
    try:
        s.sendall(struct.pack(">I", announced))
        for _ in range(push // MiB):
            s.sendall(chunk)
    except OSError:  # reset: the server dropped us, as it should
        pass
    return s


async def test_a_huge_frame_before_the_handshake_is_refused_without_buffering_it():
    worker, address = start_worker()
    peers: list[socket.socket] = []
    try:
        await request(address, p.GetStats(1))  # everything a served request needs is in memory now
        server = psutil.Process(worker.proc.pid)
        before = server.memory_info().rss
        peers = await asyncio.gather(*(asyncio.to_thread(announce_a_huge_frame, address, 400 * MiB, 48 * MiB)
                                       for _ in range(2)))
        await asyncio.sleep(0.3)
        grown = server.memory_info().rss - before
        assert grown < 8 * MiB, f"the worker grew by {grown / MiB:.0f} MiB for two unauthenticated peers"
        worker.wait_for(r"dropping connection from .*exceeds the limit of 65536", timeout=10)
        assert isinstance(await request(address, p.GetStats(2)), p.Stats)
    finally:
        for s in peers:
            s.close()
        worker.stop()


def start_scheduler(*extra: str) -> tuple[Process, str]:
    scheduler = faasmoe("scheduler", "--listen", f"127.0.0.1:{free_port()}", "--token", TOKEN, "--workers", "0",
                        "--device", "cpu", *extra)
    try:
        address = scheduler.wait_for(r"scheduler listening at (\S+)", timeout=60).group(1)
    except BaseException:
        scheduler.stop()
        raise
    return scheduler, address


@pytest.mark.parametrize("start", [start_worker, start_scheduler], ids=["worker", "scheduler"])
async def test_a_silent_peer_is_dropped_within_the_handshake_timeout(start):
    server, address = start("--handshake-timeout", "1")
    try:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        start_at = time.monotonic()
        async with asyncio.timeout(10):
            challenge = await reader.read(4096)
            rest = await reader.read()  # say nothing: the server must hang up
        waited = time.monotonic() - start_at
        writer.close()
        assert challenge and rest == b""
        assert 0.8 < waited < 3.0, waited
        server.wait_for(r"dropping connection from .*no handshake within 1s", timeout=5)
        await (await authenticated(address)).close()  # a peer that knows the token still gets in
    finally:
        server.stop()


async def test_connections_past_the_cap_are_refused_while_clients_keep_working():
    worker, address = start_worker("--max-connections", "3", "--handshake-timeout", "20")
    host, port = address.rsplit(":", 1)
    silent: list[asyncio.StreamWriter] = []
    client = None
    try:
        client = await authenticated(address)  # slot 1
        for _ in range(2):  # slots 2 and 3: accepted (they get a challenge), then silent
            reader, writer = await asyncio.open_connection(host, int(port))
            assert await asyncio.wait_for(reader.read(4096), 10)
            silent.append(writer)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            async with asyncio.timeout(5):
                refused = await reader.read()  # closed at once, before any challenge
        except ConnectionError:
            refused = b""
        writer.close()
        assert refused == b""
        worker.wait_for(r"refused 1 connection\(s\) on 127\.0\.0\.1:\d+ .*3 open, the limit", timeout=5)
        await client.send_drain(p.GetStats(5))
        assert isinstance(await asyncio.wait_for(client.recv(), 10), p.Stats)
        silent.pop().close()  # a slot comes free: a new client gets in
        deadline = time.monotonic() + 10
        while True:
            try:
                assert isinstance(await request(address, p.GetStats(6), timeout=5), p.Stats)
                break
            except (ConnectionError, asyncio.IncompleteReadError, p.ProtocolError):
                assert time.monotonic() < deadline, "the freed slot was never reused"
                await asyncio.sleep(0.1)
    finally:
        for writer in silent:
            writer.close()
        if client is not None:
            await client.close()
        worker.stop()


def test_worker_join_listens_on_loopback_unless_told_otherwise():
    unreachable_scheduler = f"127.0.0.1:{free_port()}"  # it keeps retrying the scheduler; we only need it up
    worker = faasmoe("worker", "join", unreachable_scheduler, "--token", TOKEN, "--device", "cpu",
                     "--memory", "64MiB", "--host-cache", "0")
    try:
        address = worker.wait_for(r"listening at (\S+)", timeout=60).group(1)
        assert address.startswith("127.0.0.1:"), address
    finally:
        worker.stop()


# --- D8: a tampering relay, and model roots ---------------------------------------------------


Tamper = Callable[[int, bytes], bytes]


async def start_relay(target: str, tamper: Tamper) -> tuple[asyncio.AbstractServer, str]:
    """An on-path relay: forwards both ways, passing each client frame (index, bytes) through `tamper`."""
    host, port = target.rsplit(":", 1)

    async def client_to_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = 0
        while True:
            prefix = await reader.readexactly(4)
            body = await reader.readexactly(struct.unpack(">I", prefix)[0])
            writer.write(tamper(index, prefix + body))
            await writer.drain()
            index += 1

    async def server_to_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(host, int(port))
        pumps = [asyncio.create_task(client_to_server(client_reader, server_writer)),
                 asyncio.create_task(server_to_client(server_reader, client_writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            client_writer.close()
            server_writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def flip_a_path_byte(model_dir) -> Tamper:
    """Flip one bit of the checkpoint path inside the first frame after the handshake."""
    def tamper(index: int, frame: bytes) -> bytes:
        if index != 1:  # frame 0 is the Auth
            return frame
        path = str(model_dir).encode()
        flipped = bytearray(frame)
        flipped[frame.index(path) + len(path) - 1] ^= 1  # .../tiny -> .../tinx: a load the client never asked for
        return bytes(flipped)
    return tamper


def inject_a_load(model_dir) -> Tamper:
    """Replace the first frame after the handshake with a Load the client never sent."""
    def tamper(index: int, frame: bytes) -> bytes:
        if index != 1:
            return frame
        forged = b"".join(bytes(piece) for piece in p.encode(p.Load(1, spec(model_dir, 1, 2))))
        return struct.pack(">I", len(forged) - 4 + p.FRAME_MAC_BYTES) + forged[4:] + bytes(p.FRAME_MAC_BYTES)
    return tamper


@pytest.mark.parametrize("make_tamper", [flip_a_path_byte, inject_a_load])
async def test_a_relay_that_tampers_after_the_handshake_gets_dropped_not_obeyed(model_dir, make_tamper):
    worker, address = start_worker()
    relay = None
    try:
        relay, relayed = await start_relay(address, make_tamper(model_dir))
        conn = await authenticated(relayed)  # the handshake passes the relay untouched
        try:
            conn.send(p.Load(1, spec(model_dir, 0, 1)))
            assert await reply_or_drop(conn) is None  # no Ok, no Error: nothing was run
        finally:
            await conn.close()
        worker.wait_for(r"dropping connection from .*failed its MAC", timeout=10)
        stats = await request(address, p.GetStats(2))
        assert device_functions(stats) == set() and stats.counters["cold_starts_disk"] == 0
        assert worker.alive()
    finally:
        if relay is not None:
            relay.close()
        worker.stop()


async def test_model_roots_refuse_checkpoints_outside_and_serve_those_inside(model_dir, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(model_dir, root / "tiny")
    shutil.copytree(model_dir, outside / "tiny")
    (root / "escape").symlink_to(outside / "tiny")
    worker, address = start_worker("--model-root", str(root))
    try:
        inside = spec(root / "tiny", 0, 0)
        for path in (outside / "tiny", root / "escape", f"{root}/../outside/tiny"):
            fn = p.FunctionSpec(**{**vars(spec(outside / "tiny", 0, 1)), "model_path": str(path)})
            reply = await request(address, p.Load(3, fn))
            assert isinstance(reply, p.Error) and reply.code == "forbidden", (path, reply)
            refused = await request(address, invoke(fn, req_id=4))
            assert isinstance(refused, p.Error) and refused.code == "forbidden", (path, refused)
        worker.wait_for(r"refused checkpoint .*outside the model roots", timeout=5)
        good = invoke(inside, req_id=5)
        result = await request(address, good)
        assert isinstance(result, p.Result) and torch.equal(result.output, expected(inside, good))
        stats = await request(address, p.GetStats(6))
        assert device_functions(stats) == {inside.function_id} and stats.counters["cold_starts_disk"] == 1
    finally:
        worker.stop()
