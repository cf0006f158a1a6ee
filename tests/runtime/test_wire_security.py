"""The wire against hostile peers, on real worker processes and real sockets.

A malformed message from an authenticated peer is refused or dropped, logged, and the worker
goes on serving. Every test stops what it starts.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch

from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig
from faasmoe.model.experts import ExpertBlock
from runtime import protocol as p
from runtime.transport import Connection, client_handshake, open_connection

from ..processes import Process

TOKEN = "wire-security-token"
BLOCK = 4


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
                          BLOCK * config.expert_bytes(torch.float32))


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
