"""The wire protocol: tensor round-trips, typed messages, the handshake, and bad frames."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
import torch

from runtime import protocol as p
from runtime.transport import Address, client_handshake, open_connection, server_handshake, start_server

T = p._TYPE_KEY


def roundtrip(message: p.Message) -> p.Message:
    pieces = p.encode(message)
    frame = b"".join(bytes(piece) for piece in pieces)
    length = p.frame_length(frame[:4])
    assert length == len(frame) - 4
    return p.decode(frame[4:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
def test_tensor_roundtrip_every_dtype(dtype):
    source = (torch.randn(5, 7) * 50).to(dtype)
    spec = p.FunctionSpec("m/1/0", "/models/m", 1, 0, 4)
    message = p.Invoke(7, ["m/1/0"], [5], source, torch.arange(5), [spec])
    decoded = roundtrip(message)
    assert isinstance(decoded, p.Invoke) and decoded.req_id == 7
    assert decoded.x.dtype == dtype and torch.equal(decoded.x, source)
    assert decoded.specs == [spec] and decoded.function_ids == ["m/1/0"] and decoded.rows == [5]
    empty = roundtrip(p.Result(1, source[:0]))
    assert empty.output.shape == (0, 7) and empty.output.dtype == dtype


def test_decoded_tensors_are_views_of_the_frame():
    x = torch.randn(16, 2048).to(torch.bfloat16)
    frame = bytearray(b"".join(bytes(piece) for piece in p.encode(p.Result(1, x))))
    out = p.decode(memoryview(frame)[4:]).output
    assert torch.equal(out, x)
    frame[-2:] = b"\x00\x00"  # change the frame: the decoded tensor sees it, so no copy was made
    assert out.view(-1)[-1].item() == 0


def test_non_contiguous_and_scalar_tensors():
    x = torch.randn(4, 6).t()
    assert torch.equal(roundtrip(p.Result(1, x)).output, x)
    assert roundtrip(p.Result(1, torch.tensor(3.5))).output.item() == 3.5


def test_every_message_type_roundtrips():
    spec = p.FunctionSpec("t:m/0/1", "/m", 0, 4, 4, "bfloat16", 1234, "t", 30.0)
    info = p.WorkerInfo("w0", "unix:/tmp/w0.sock", "cpu", 99, 1 << 30, 1 << 31, "node")
    resident = p.ResidentFunction(spec, "device", 1234, 0.5, 3)
    stats = p.Stats(2, info, [resident], {"cold_starts_disk": 1.0}, "# metrics")
    messages = [
        p.Challenge(1, b"n" * 32, "s"), p.Auth(1, "worker", "w0", b"c" * 32, b"d" * 32), p.Welcome("s", b"x"),
        p.Load(1, spec), p.Evict(1, "m/0/1", "memory"), p.Error(3, "no_memory", "full"), p.Ok(4), p.GetStats(5),
        stats, p.Heartbeat(1, 2.5, 3), p.Register(1, info, [resident]), p.Residency("w0", [resident], ["a"], "load"),
        p.Subscribe(1), p.RoutingUpdate(3, {"m/0/1": ["w0"]}, [info]), p.Place(1, spec, ["w1"]),
        p.Placement(1, "m/0/1", ["w0"]), p.ClusterState(9, [stats]),
    ]
    for message in messages:
        assert roundtrip(message) == message


@pytest.mark.parametrize("body", [
    b"\x00\x00",  # shorter than the meta length field
    struct.pack(">I", 100) + b"abc",  # meta length beyond the frame
    struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # msgpack garbage
    struct.pack(">I", len(m := msgpack.packb({T: 999}))) + m,  # unknown type
    struct.pack(">I", len(m := msgpack.packb({T: p.Ok.TYPE, "nope": 1}))) + m,  # unknown field
    struct.pack(">I", len(m := msgpack.packb("hello"))) + m,  # not a message
    struct.pack(">I", len(m := msgpack.packb({"req_id": 1}))) + m,  # a map without a type
    struct.pack(">I", len(m := msgpack.packb({T: p.Result.TYPE, "req_id": 1, "output":
        msgpack.ExtType(1, struct.pack("<BBQQQ", 0, 1, 0, 4000, 1000))}))) + m,  # tensor beyond the frame
    struct.pack(">I", len(m := msgpack.packb({T: p.Result.TYPE, "req_id": 1, "output":
        msgpack.ExtType(1, struct.pack("<BBQQQ", 77, 1, 0, 4, 1))}))) + m + b"xxxx",  # unknown dtype
    struct.pack(">I", len(m := msgpack.packb({T: p.Result.TYPE, "req_id": 1, "output":
        msgpack.ExtType(1, struct.pack("<BBQQQ", 0, 1, 0, 4, 2))}))) + m + b"xxxx",  # shape != bytes
    struct.pack(">I", len(m := msgpack.packb({T: p.Result.TYPE, "req_id": 1, "output":
        msgpack.ExtType(1, b"\x00\x01")}))) + m,  # truncated descriptor
    struct.pack(">I", len(m := msgpack.packb({T: p.Result.TYPE, "req_id": 1, "output":
        msgpack.ExtType(9, b"")}))) + m,  # unknown extension
])
def test_malformed_frames_raise_protocol_error(body):
    with pytest.raises(p.ProtocolError):
        p.decode(body)


def test_oversized_frames_are_refused_before_reading():
    with pytest.raises(p.ProtocolError, match="exceeds the limit"):
        p.frame_length(struct.pack(">I", 2**31), max_frame_bytes=1 << 20)


def test_digests_bind_token_nonce_role_and_node():
    v = p.PROTOCOL_VERSION
    challenge = p.Challenge(v, b"a" * 32, "s")
    digest = p.client_digest("tok", challenge, "worker", "w0", b"c" * 32)
    p.check_auth("tok", challenge, p.Auth(v, "worker", "w0", b"c" * 32, digest))
    for bad in (p.Auth(v, "worker", "w0", b"c" * 32, p.client_digest("other", challenge, "worker", "w0", b"c" * 32)),
                p.Auth(v, "frontend", "w0", b"c" * 32, digest), p.Auth(v, "worker", "w1", b"c" * 32, digest),
                p.Auth(v + 1, "worker", "w0", b"c" * 32, digest)):
        with pytest.raises(p.ProtocolError):
            p.check_auth("tok", challenge, bad)


def test_address_parsing():
    assert Address.parse("unix:/tmp/x.sock") == Address("unix", path="/tmp/x.sock")
    assert Address.parse("10.0.0.2:7070") == Address("tcp", host="10.0.0.2", port=7070)
    assert str(Address.parse(":0")) == "127.0.0.1:0"
    for bad in ("nohost", "h:port", "unix:", "h:70000"):
        with pytest.raises(ValueError):
            Address.parse(bad)


async def test_server_survives_garbage_and_refuses_wrong_tokens():
    served = []

    async def on_connection(conn):
        await server_handshake(conn, "secret", "srv")
        while True:
            message = await conn.recv()
            served.append(message)
            await conn.send_drain(p.Ok(message.req_id))

    server, address = await start_server("127.0.0.1:0", on_connection, max_frame_bytes=1 << 16)
    try:
        # Garbage, an oversized length prefix, and a frame cut short: each connection dropped.
        for junk in (b"GET / HTTP/1.1\r\n\r\n", struct.pack(">I", 1 << 30), struct.pack(">I", 100) + b"xx"):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(junk)
            await writer.drain()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) is not None
            writer.close()
        # A wrong token is refused with a reason.
        conn = await open_connection(address)
        with pytest.raises(p.ProtocolError, match="wrong cluster token"):
            await client_handshake(conn, "guess", "worker", "intruder")
        await conn.close()
        # The right token still works after all that.
        conn = await open_connection(address)
        await client_handshake(conn, "secret", "worker", "w0")
        await conn.send_drain(p.GetStats(41))
        assert await conn.recv() == p.Ok(41)
        await conn.close()
        assert served == [p.GetStats(41)]
    finally:
        server.close()


def frame_of(message: p.Message) -> bytes:
    return b"".join(bytes(piece) for piece in p.encode(message))


X, E = torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
SPEC = p.FunctionSpec("m/0/0", "/m", 0, 0, 4)


@pytest.mark.parametrize("message, field", [
    (p.Invoke(1, 5, [2], X, E), "Invoke.function_ids"),  # an int for a list
    (p.Invoke(1, ["m/0/0"], "ab", X, E), "Invoke.rows"),  # a string for a list of ints
    (p.Invoke(1, ["m/0/0"], [2.0], X, E), "Invoke.rows"),  # floats in a list of ints
    (p.Invoke(1, ["m/0/0"], [2], [1.0, 2.0], E), "Invoke.x"),  # a list for a tensor
    (p.Invoke(1, ["m/0/0"], [2], X, E, [{"function_id": "m"}]), "Invoke.specs"),  # a map for a spec
    (p.Invoke("1", ["m/0/0"], [2], X, E), "Invoke.req_id"),
    (p.Load(1, p.FunctionSpec("m/0/0", "/m", "0", 0, 4)), "FunctionSpec.layer"),  # nested structs too
    (p.Load(1, p.GetStats(3)), "Load.function"),  # the wrong message type
    (p.Heartbeat(1, True), "Heartbeat.sent_at"),  # a bool is no number
    (p.Stats(1, p.WorkerInfo("w", "a", "cpu", 1, 1, 1), [], {"x": "y"}), "Stats.counters"),
    (p.RoutingUpdate(1, {"f": "w0"}, []), "RoutingUpdate.functions"),
    (p.Challenge(1, "nonce", "s"), "Challenge.nonce"),  # a string for bytes
])
def test_fields_of_the_wrong_type_are_refused_at_decode(message, field):
    with pytest.raises(p.ProtocolError, match=rf"bad field {field}: expected"):
        p.decode(frame_of(message)[4:])


def test_ints_are_numbers_where_floats_are_declared():
    spec = p.FunctionSpec("m/0/0", "/m", 0, 0, 4, keep_alive_s=60)
    assert roundtrip(p.Load(1, spec)).function.keep_alive_s == 60
    assert roundtrip(p.Stats(1, p.WorkerInfo("w", "a", "cpu", 1, 1, 1), [], {"bytes": 3})).counters == {"bytes": 3}


def sealed(message: p.Message, mac: p.FrameMac) -> bytes:
    return b"".join(bytes(piece) for piece in p.seal(p.encode(message), mac))


def test_sealed_frames_verify_once_in_order_and_not_after_a_change():
    key = b"k" * 32
    sender = p.FrameMac(key)
    first, second = sealed(p.Ok(1), sender), sealed(p.Invoke(2, ["m/0/0"], [2], X, E, [SPEC]), sender)
    assert p.frame_length(first[:4]) == len(first) - 4
    with pytest.raises(p.ProtocolError, match="failed its MAC"):  # out of order
        p.unseal(second[:4], second[4:], mac_at(key, 0))
    for i in (5, len(second) // 2, len(second) - 1):  # meta, tensor bytes, the MAC itself
        flipped = bytearray(second)
        flipped[i] ^= 1
        with pytest.raises(p.ProtocolError, match="failed its MAC"):
            p.unseal(bytes(flipped[:4]), flipped[4:], mac_at(key, 1))
    with pytest.raises(p.ProtocolError, match="failed its MAC"):  # another key
        p.unseal(first[:4], first[4:], p.FrameMac(b"other"))
    receiver = p.FrameMac(key)
    assert p.decode(p.unseal(first[:4], first[4:], receiver)) == p.Ok(1)
    with pytest.raises(p.ProtocolError, match="failed its MAC"):  # replayed
        p.unseal(first[:4], first[4:], mac_at(key, 1))
    decoded = p.decode(p.unseal(second[:4], second[4:], receiver))
    assert decoded.req_id == 2 and torch.equal(decoded.x, X)


def mac_at(key: bytes, seq: int) -> p.FrameMac:
    """The receiving MAC of a direction that has already verified `seq` frames."""
    mac = p.FrameMac(key)
    mac.seq = seq
    return mac


def test_session_keys_are_per_direction_and_per_session():
    challenge = p.Challenge(1, b"a" * 32, "s")
    auth = p.Auth(1, "worker", "w0", b"c" * 32, b"")
    to_server, to_client = p.session_keys("tok", challenge, auth)
    assert to_server != to_client
    assert p.session_keys("tok", challenge, auth) == (to_server, to_client)
    assert to_server not in p.session_keys("other", challenge, auth)
    assert to_server not in p.session_keys("tok", challenge, p.Auth(1, "worker", "w0", b"d" * 32, b""))
