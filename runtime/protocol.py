"""The FaaSMoE wire protocol: every message type, its encoding and the join handshake.

Frame: `u32 length | u32 meta_length | msgpack meta | raw tensor bytes`, big-endian lengths.
The meta is a msgpack map of the message's fields plus its type code; a tensor field is a
msgpack ext value naming its dtype, shape and byte range in the raw part, so tensors travel
beside the message, never re-encoded, and decode as zero-copy views. Nested structs are maps
with their own type code. After the join handshake, TCP frames end in a 16-byte HMAC of the
frame and a per-direction sequence number (`seal` / `unseal`), keyed from the handshake.
A connection whose two ends share a memory region (a frontend and a worker on one host,
`runtime.shm`) sends a tensor that lies in that region as a second extension type: the same
descriptor, its offset counted from the region's start, and no bytes in the frame.
Nothing outside this module defines messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import struct
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import torch

PROTOCOL_VERSION = 3  # 2: shared-memory tensors (ShmOffer, Invoke.out_offset); 3: content-named functions
DEFAULT_MAX_FRAME_BYTES = 512 * 1024 * 1024
# Until a peer has proven the token it may send only handshake-sized frames: a stranger must not
# be able to make a server buffer hundreds of MiB by announcing a big frame.
PRE_AUTH_MAX_FRAME_BYTES = 64 * 1024
FRAME_MAC_BYTES = 16
_LENGTHS = struct.Struct(">II")
_TENSOR_HEAD = struct.Struct("<BBQQ")  # dtype code, ndim, offset, nbytes; then ndim x u64 shape
_EXT_TENSOR = 1
_EXT_SHARED_TENSOR = 2  # a tensor in the connection's shared region: descriptor only
SHARED_ALIGN = 64  # where a peer asks for output in the shared region, the offset is a multiple of this

# Decoded tensors are read-only views of the received frame; torch warns once about that.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class ProtocolError(Exception):
    """A frame we refuse: malformed, oversized, unknown type, wrong version or bad auth."""


class TensorRegion(typing.Protocol):
    """Memory both ends of a connection have mapped (`runtime.shm`): tensors in it travel by reference."""

    nbytes: int

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Where a contiguous CPU tensor's bytes start in the region; None unless they lie wholly inside."""

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over bytes offset..offset+nbytes (in bounds); may refuse with ProtocolError."""


_DTYPES: list[torch.dtype] = [
    torch.float32, torch.bfloat16, torch.float16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]
_DTYPE_CODE = {dtype: i for i, dtype in enumerate(_DTYPES)}

_REGISTRY: dict[int, type[Message]] = {}


@dataclass
class Message:
    """Base of every wire struct; subclasses set a unique TYPE code."""

    TYPE: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE in _REGISTRY:
            raise TypeError(f"message type code {cls.TYPE} used twice ({_REGISTRY[cls.TYPE].__name__}, {cls.__name__})")
        _REGISTRY[cls.TYPE] = cls


# --- structs nested inside messages ---------------------------------------------------


@dataclass
class FunctionSpec(Message):
    """An expert function: experts first..first+count-1 of one layer of one checkpoint.

    The id is the block's content digest (`content`), or that digest bound to one model when the model
    opts out of sharing: the same bytes in two checkpoints are one function, loaded once. `model_path`,
    `layer` and `first` say where a copy of those bytes lies; a worker proves every load against `content`.
    `name` (`model/layer/block`, `tenant:` for private) is for people."""

    TYPE: ClassVar[int] = 1
    function_id: str
    model_path: str
    layer: int
    first: int
    count: int
    dtype: str = "float32"
    nbytes: int = 0
    owner: str = ""  # tenant of a private function; "" = shared
    keep_alive_s: float = 60.0
    owner_quota_bytes: int = 0  # private: the most the owner's functions may hold together (0 = no limit)
    content: str = ""  # the block's content digest (faasmoe.model.content.block_digest); "" = not verified
    name: str = ""


@dataclass
class WorkerInfo(Message):
    TYPE: ClassVar[int] = 2
    worker_id: str
    address: str
    device: str
    pid: int
    budget_bytes: int
    host_budget_bytes: int
    node: str = ""


@dataclass
class ResidentFunction(Message):
    """A function a worker holds, in which tier, with its use so far."""

    TYPE: ClassVar[int] = 3
    function: FunctionSpec
    tier: str  # "device" | "host" | "loading"
    nbytes: int
    idle_s: float = 0.0
    hits: int = 0


# --- handshake -----------------------------------------------------------------------


@dataclass
class Challenge(Message):
    TYPE: ClassVar[int] = 10
    version: int
    nonce: bytes
    server_id: str


@dataclass
class Auth(Message):
    TYPE: ClassVar[int] = 11
    version: int
    role: str  # "worker" | "frontend" | "admin"
    node_id: str
    client_nonce: bytes
    digest: bytes


@dataclass
class Welcome(Message):
    """The server's proof that it knows the token too (mutual authentication)."""

    TYPE: ClassVar[int] = 12
    server_id: str
    digest: bytes


# --- requests and replies ----------------------------------------------------------------


@dataclass
class Load(Message):
    TYPE: ClassVar[int] = 20
    req_id: int
    function: FunctionSpec


@dataclass
class Evict(Message):
    TYPE: ClassVar[int] = 21
    req_id: int
    function_id: str
    reason: str = "scheduler"


@dataclass
class Invoke(Message):
    """All of one layer's calls for one worker: one message per worker per layer.

    Call i is `rows[i]` consecutive rows of `x` [sum(rows), H] for function `function_ids[i]`,
    each row with its expert index inside that block in `experts` [sum(rows)]. Packing the
    calls into two tensors keeps the per-message cost flat however many functions it holds.
    `specs` describes functions this worker has not been told about yet; the per-token path
    sends only ids (a worker that lacks a spec answers `unknown_function`).
    `out_offset` >= 0 (a multiple of SHARED_ALIGN): write the output into the connection's shared
    region there, if it fits in `out_nbytes`, and send it as a reference; -1: in the reply frame.
    """

    TYPE: ClassVar[int] = 22
    req_id: int
    function_ids: list[str]
    rows: list[int]
    x: torch.Tensor
    experts: torch.Tensor
    specs: list[FunctionSpec] = field(default_factory=list)
    out_offset: int = -1
    out_nbytes: int = 0


@dataclass
class Result(Message):
    """The unweighted expert outputs [sum(rows), H], in the order of the invoke's rows."""

    TYPE: ClassVar[int] = 23
    req_id: int
    output: torch.Tensor
    cold_starts: int = 0
    load_s: float = 0.0
    compute_s: float = 0.0


@dataclass
class Error(Message):
    TYPE: ClassVar[int] = 24
    req_id: int
    code: str  # "no_memory" | "bad_request" | "load_failed" | "unavailable" | ...
    message: str


@dataclass
class Ok(Message):
    TYPE: ClassVar[int] = 25
    req_id: int


@dataclass
class ShmOffer(Message):
    """A frontend offers this connection its shared-memory region for tensors (`runtime.shm`).

    A worker on the same host (`boot_id` and `host` are its own) maps `/dev/shm/<name>` if it can
    open it and finds `cookie` at its start (the same memory, not a namesake), unlinks it and answers
    Ok; otherwise Error `shm_unavailable`, and the connection stays on the socket alone."""

    TYPE: ClassVar[int] = 28
    req_id: int
    name: str
    nbytes: int
    boot_id: str
    host: str
    cookie: bytes
    ring_slots: int = 0  # > 0: the frontend asks for the call ring (`runtime.ring`) over this many slots
    ring_slot_bytes: int = 0  # ... each of two areas of this many bytes


@dataclass
class GetStats(Message):
    TYPE: ClassVar[int] = 26
    req_id: int


@dataclass
class Stats(Message):
    TYPE: ClassVar[int] = 27
    req_id: int
    worker: WorkerInfo
    resident: list[ResidentFunction]
    counters: dict[str, float] = field(default_factory=dict)
    metrics_text: str = ""  # the worker's own Prometheus exposition


# --- control plane -------------------------------------------------------------------------


@dataclass
class Heartbeat(Message):
    TYPE: ClassVar[int] = 30
    seq: int
    sent_at: float
    queue_depth: int = 0
    hot: list[str] = field(default_factory=list)  # functions with calls queued behind others


@dataclass
class Register(Message):
    """A worker joins the scheduler, declaring what it already holds (soft state)."""

    TYPE: ClassVar[int] = 31
    req_id: int
    worker: WorkerInfo
    resident: list[ResidentFunction]


@dataclass
class Residency(Message):
    """A worker's change of holdings, pushed to the scheduler as it happens."""

    TYPE: ClassVar[int] = 32
    worker_id: str
    loaded: list[ResidentFunction]
    evicted: list[str]
    reason: str = ""


@dataclass
class Subscribe(Message):
    TYPE: ClassVar[int] = 33
    req_id: int


@dataclass
class RoutingUpdate(Message):
    """Versioned routing table pushed to frontends: function id -> worker ids, and workers."""

    TYPE: ClassVar[int] = 34
    version: int
    functions: dict[str, list[str]]
    workers: list[WorkerInfo]


@dataclass
class Place(Message):
    """A frontend asks where a function without a placement should run."""

    TYPE: ClassVar[int] = 35
    req_id: int
    function: FunctionSpec
    exclude: list[str] = field(default_factory=list)  # workers that just failed


@dataclass
class Placement(Message):
    TYPE: ClassVar[int] = 36
    req_id: int
    function_id: str
    worker_ids: list[str]


@dataclass
class ClusterState(Message):
    """Every live worker's stats, collected by the scheduler for the admin view."""

    TYPE: ClassVar[int] = 37
    req_id: int
    workers: list[Stats]


@dataclass
class WorkerReport(Message):
    """A frontend's outcomes of its invokes on one worker since its last report (unsolicited).

    The scheduler keeps each worker's last outcomes: a worker that heartbeats but fails or times
    out too often is unhealthy (a gray failure), not alive."""

    TYPE: ClassVar[int] = 38
    worker_id: str
    ok: int
    failed: int
    reason: str = ""


# --- encoding ------------------------------------------------------------------------------


def encode(message: Message, region: TensorRegion | None = None) -> list[bytes | memoryview]:
    """A message as frame pieces for `writer.writelines` (tensor bytes are not copied).

    Tensors that lie in `region` (the connection's shared memory) are sent as references to it."""
    buffers: list[memoryview] = []
    offset = 0

    def default(obj: Any) -> Any:
        nonlocal offset
        if isinstance(obj, torch.Tensor):
            t = obj
            if t.requires_grad:
                t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if not t.is_contiguous():
                t = t.contiguous()
            code = _DTYPE_CODE.get(t.dtype)
            if code is None:
                raise ProtocolError(f"cannot send tensors of dtype {t.dtype}")
            shared = region.offset_of(t) if region is not None and t.numel() else None
            if shared is not None:
                desc = _TENSOR_HEAD.pack(code, t.dim(), shared, t.nbytes) + struct.pack(f"<{t.dim()}Q", *t.shape)
                return msgpack.ExtType(_EXT_SHARED_TENSOR, desc)
            raw = _raw_bytes(t)
            buffers.append(raw)
            shape = t.shape
            desc = _TENSOR_HEAD.pack(code, len(shape), offset, raw.nbytes) + struct.pack(f"<{len(shape)}Q", *shape)
            offset += raw.nbytes
            return msgpack.ExtType(_EXT_TENSOR, desc)
        if isinstance(obj, Message):
            return _struct(obj)  # a plain map that msgpack keeps walking (no nested packb)
        raise ProtocolError(f"cannot encode {type(obj).__name__}")

    meta = msgpack.packb(_struct(message), default=default, use_bin_type=True)
    total = 4 + len(meta) + offset
    return [_LENGTHS.pack(total, len(meta)), meta, *buffers]


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_TYPE_KEY = "\x00t"  # marks a map as a message struct; not a valid field name


def _struct(message: Message) -> dict[str, Any]:
    names = _FIELD_NAMES.get(type(message))
    if names is None:
        names = _FIELD_NAMES[type(message)] = tuple(f.name for f in dataclasses.fields(message))
    fields = {name: getattr(message, name) for name in names}
    fields[_TYPE_KEY] = message.TYPE
    return fields


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (numpy has no bfloat16: view it as int16 first)."""
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


def frame_length(prefix: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> int:
    """Bytes that follow the 4-byte length prefix; refuses oversized or empty frames."""
    (length,) = struct.unpack(">I", prefix)
    if length > max_frame_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_frame_bytes}")
    if length < 4:
        raise ProtocolError(f"frame of {length} bytes is too short")
    return length


def decode(body: bytes | bytearray | memoryview, region: TensorRegion | None = None) -> Message:
    """A frame body (everything after the length prefix) -> its message; tensors are views (of the
    frame, or of `region` for shared ones; a reference outside it is a ProtocolError)."""
    view = memoryview(body)
    if len(view) < 4:
        raise ProtocolError("frame too short")
    (meta_length,) = struct.unpack(">I", view[:4])
    if meta_length > len(view) - 4:
        raise ProtocolError("meta length exceeds the frame")
    data = view[4 + meta_length:]

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == _EXT_TENSOR:
            return _decode_tensor(payload, data)
        if code == _EXT_SHARED_TENSOR:
            return _decode_shared_tensor(payload, region)
        raise ProtocolError(f"unknown msgpack extension {code}")

    try:
        message = msgpack.unpackb(view[4:4 + meta_length], ext_hook=ext_hook, object_hook=_build, raw=False,
                                  strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(f"malformed frame: {exc}") from exc
    if not isinstance(message, Message):
        raise ProtocolError("malformed message envelope")
    if isinstance(message, Invoke) and message.out_offset != -1:
        _check_output_span(message, region)
    return message


def _check_output_span(message: Invoke, region: TensorRegion | None) -> None:
    if region is None:
        raise ProtocolError("Invoke.out_offset on a connection without shared memory")
    offset, nbytes = message.out_offset, message.out_nbytes
    if offset < 0 or nbytes < 0 or offset % SHARED_ALIGN or offset + nbytes > region.nbytes:
        raise ProtocolError(f"Invoke output span {offset}+{nbytes} is not in the {region.nbytes}-byte shared region")


def _build(fields: dict[str, Any]) -> Any:
    code = fields.pop(_TYPE_KEY, None)
    if code is None:
        return fields  # an ordinary map field (e.g. counters)
    cls = _REGISTRY.get(code)
    if cls is None:
        raise ProtocolError(f"unknown message type {code}")
    checks = _FIELD_CHECKS.get(cls)
    if checks is None:
        checks = _field_checks(cls)
    for name, value in fields.items():
        check = checks.get(name)
        if check is not None and not check[0](value):
            raise ProtocolError(f"bad field {cls.__name__}.{name}: expected {check[1]}, got {type(value).__name__}")
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ProtocolError(f"bad fields for {cls.__name__}: {exc}") from exc


# --- field types, checked at decode ------------------------------------------------------------
# A well-authenticated peer can still send a string where a list belongs; refusing it here, by
# the dataclass's own annotations, means handlers only ever see the types they were written for.

_Check = Callable[[Any], bool]
_FIELD_CHECKS: dict[type, dict[str, tuple[_Check, str]]] = {}


def _field_checks(cls: type[Message]) -> dict[str, tuple[_Check, str]]:
    """Per field of `cls`: a predicate for a decoded value and the type it names; built once per type."""
    hints = typing.get_type_hints(cls)
    checks = {f.name: (_check_for(hints[f.name]), _type_name(hints[f.name])) for f in dataclasses.fields(cls)}
    _FIELD_CHECKS[cls] = checks
    return checks


def _check_for(annotation: Any) -> _Check:
    """A predicate for values msgpack decodes into `annotation` (exact types: a bool is no int)."""
    if annotation is float:  # msgpack keeps 60 an int even where the field says 60.0
        return lambda v: type(v) is float or type(v) is int
    if annotation in (int, str, bytes, bool):
        return lambda v: type(v) is annotation
    if annotation is Any:
        return lambda v: True
    if annotation is torch.Tensor or (isinstance(annotation, type) and issubclass(annotation, Message)):
        return lambda v: isinstance(v, annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        item = _check_for(args[0])
        return lambda v: type(v) is list and all(map(item, v))
    if origin is dict:
        key, value = _check_for(args[0]), _check_for(args[1])
        return lambda v: type(v) is dict and all(key(k) and value(x) for k, x in v.items())
    if origin in (typing.Union, types.UnionType):
        options = [(lambda v: v is None) if a is type(None) else _check_for(a) for a in args]
        return lambda v: any(option(v) for option in options)
    raise TypeError(f"no wire check for field type {annotation!r}: add one to protocol._check_for")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is None:
        return getattr(annotation, "__name__", str(annotation))
    return str(annotation).replace(f"{__name__}.", "")


for _cls in list(_REGISTRY.values()):  # at import: a field type without a check fails here, not on a peer's frame
    _field_checks(_cls)


def _tensor_descriptor(payload: bytes, what: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, offset, nbytes) of a tensor reference, its shape and length checked to agree."""
    try:
        code, ndim, offset, nbytes = _TENSOR_HEAD.unpack_from(payload)
        shape = struct.unpack_from(f"<{ndim}Q", payload, _TENSOR_HEAD.size)
        if len(payload) != _TENSOR_HEAD.size + 8 * ndim:
            raise ValueError("trailing bytes")
        dtype = _DTYPES[code]
    except Exception as exc:
        raise ProtocolError(f"malformed {what} descriptor: {exc}") from exc
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != nbytes:
        raise ProtocolError(f"{what} descriptor: shape and length disagree")
    return dtype, shape, offset, nbytes


def _decode_tensor(payload: bytes, data: memoryview) -> torch.Tensor:
    dtype, shape, offset, nbytes = _tensor_descriptor(payload, "tensor")
    if offset + nbytes > len(data):
        raise ProtocolError("tensor descriptor does not match the frame")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=offset)
    return raw.view(dtype).view(shape)


def _decode_shared_tensor(payload: bytes, region: TensorRegion | None) -> torch.Tensor:
    dtype, shape, offset, nbytes = _tensor_descriptor(payload, "shared tensor")
    if region is None:
        raise ProtocolError("a shared-memory tensor on a connection without shared memory")
    if nbytes == 0:
        raise ProtocolError("shared tensor descriptor: an empty tensor is never shared")
    if offset % dtype.itemsize or offset + nbytes > region.nbytes:
        raise ProtocolError(f"shared tensor at {offset}+{nbytes} is not in the {region.nbytes}-byte region")
    return region.view(offset, nbytes).view(dtype).view(shape)


# --- join handshake --------------------------------------------------------------------------


def _digest(token: str, *parts: bytes | str) -> bytes:
    mac = hmac.new(token.encode(), digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        mac.update(len(data).to_bytes(4, "big") + data)
    return mac.digest()


def new_nonce() -> bytes:
    return os.urandom(32)


def client_digest(token: str, challenge: Challenge, role: str, node_id: str, client_nonce: bytes) -> bytes:
    """Proof of the token bound to this challenge; the token itself never crosses the wire."""
    return _digest(token, b"client", challenge.nonce, client_nonce, role, node_id)


def server_digest(token: str, challenge: Challenge, auth: Auth) -> bytes:
    return _digest(token, b"server", challenge.nonce, auth.client_nonce, challenge.server_id)


def check_auth(token: str, challenge: Challenge, auth: Auth) -> None:
    """Raise ProtocolError unless `auth` answers `challenge` with the same token and version."""
    if auth.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {auth.version} != {PROTOCOL_VERSION}")
    expected = client_digest(token, challenge, auth.role, auth.node_id, auth.client_nonce)
    if not hmac.compare_digest(expected, auth.digest):
        raise ProtocolError(f"authentication failed for {auth.role} {auth.node_id!r} (wrong cluster token)")


# --- frame integrity after the handshake ----------------------------------------------------------
# The handshake proves the token but not that later frames come from the same peer: an on-path
# relay could inject a Load. So both sides derive per-direction keys from the token and both
# nonces, and every later frame carries an HMAC over its direction's sequence number and bytes.


def session_keys(token: str, challenge: Challenge, auth: Auth) -> tuple[bytes, bytes]:
    """Frame keys (client to server, server to client) of the session this handshake opened."""
    session = _digest(token, b"session", challenge.nonce, auth.client_nonce, challenge.server_id, auth.node_id)
    return hmac.digest(session, b"client->server", "sha256"), hmac.digest(session, b"server->client", "sha256")


class FrameMac:
    """The MAC of one direction: HMAC-SHA256, truncated, over a sequence number and the frame.

    The sequence number is implicit (both ends count), so a replayed, dropped or reordered frame
    fails like a forged one.
    """

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.seq = 0

    def tag(self, pieces: list[bytes | memoryview]) -> bytes:
        mac = hmac.new(self.key, self.seq.to_bytes(8, "big"), hashlib.sha256)
        for piece in pieces:
            mac.update(piece)
        self.seq += 1
        return mac.digest()[:FRAME_MAC_BYTES]


def seal(pieces: list[bytes | memoryview], mac: FrameMac) -> list[bytes | memoryview]:
    """Frame pieces from `encode` with the MAC appended (the length prefix counts it)."""
    total, meta_length = _LENGTHS.unpack(pieces[0])
    framed = [_LENGTHS.pack(total + FRAME_MAC_BYTES, meta_length), *pieces[1:]]
    framed.append(mac.tag(framed))
    return framed


def unseal(prefix: bytes, body: bytes | bytearray | memoryview, mac: FrameMac) -> memoryview:
    """The body of a sealed frame without its MAC; raises ProtocolError unless the MAC verifies."""
    view = memoryview(body)
    if len(view) < 4 + FRAME_MAC_BYTES:
        raise ProtocolError("frame too short for its MAC")
    content, tag = view[:-FRAME_MAC_BYTES], view[-FRAME_MAC_BYTES:]
    if not hmac.compare_digest(mac.tag([prefix, content]), tag):
        raise ProtocolError(f"frame {mac.seq - 1} failed its MAC (tampered, injected, replayed or reordered)")
    return content
