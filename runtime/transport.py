"""Asyncio plumbing for the wire protocol: addresses, framed connections, handshake, RPC.

Addresses are `unix:/path/to.sock` (the local pool) or `host:port` (nodes). Every connection
starts with the HMAC challenge of `runtime.protocol`; a peer that sends anything malformed,
oversized or unauthenticated is logged and dropped, and the process lives on. Before the
handshake a peer may send only small frames and must finish within the handshake timeout, and a
server holds at most `max_connections` at once. After it, every TCP frame carries a MAC.

Unix-socket links skip the MAC: only this machine's user (or root) can connect to or relay them
(connecting needs write permission on the socket file; the local pool's live in a private 0700
directory), and that user can read the token anyway; an HMAC of each frame costs 4 x ~150 us per
256 KiB layer round trip on the per-token path (measured: bench/dispatch.py, the "unix + frame
HMAC" row). Set FAASMOE_MAC_UNIX_SOCKETS=1 on both ends to MAC them too.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime import protocol as p

if TYPE_CHECKING:
    from runtime.shm import SharedRegion

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 256
MAC_UNIX_SOCKETS_ENV = "FAASMOE_MAC_UNIX_SOCKETS"  # "1" on both ends: MAC Unix-socket links too


@dataclass
class ServerLimits:
    """What a peer that has not proven the token may cost a server: a slot and a few seconds."""

    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S  # for the whole exchange, server side
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # per listening server; more are closed at once


# Process-wide defaults for `start_server` and `server_handshake`, set once by a CLI from its flags.
server_limits = ServerLimits()


def configure_server_limits(limits: ServerLimits) -> None:
    if limits.handshake_timeout_s <= 0 or limits.max_connections < 1:
        raise ValueError(f"bad server limits {limits}: a positive timeout and at least one connection")
    global server_limits
    server_limits = limits


@dataclass(frozen=True)
class Address:
    kind: str  # "unix" | "tcp"
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        if text.startswith("unix:"):
            if not text[5:]:
                raise ValueError(f"bad address {text!r}: unix: needs a path")
            return cls("unix", path=text[5:])
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"bad address {text!r}: use HOST:PORT or unix:/path")
        return cls("tcp", host=host.strip("[]") or "127.0.0.1", port=int(port))

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"{self.host}:{self.port}"


class Connection:
    """One framed, authenticated stream. `recv` raises ProtocolError on a bad frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame_bytes: int = p.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.reader = reader
        self.writer = writer
        self.max_frame_bytes = min(max_frame_bytes, p.PRE_AUTH_MAX_FRAME_BYTES)  # until `authenticated`
        self._max_frame_bytes_after_auth = max_frame_bytes
        self._send_mac: p.FrameMac | None = None
        self._recv_mac: p.FrameMac | None = None
        peer = writer.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix-peer"
        self.peer_id = ""  # set by the handshake
        # Memory both ends mapped (runtime.shm): tensors in it are sent by reference, and it sees every message.
        self.region: SharedRegion | None = None
        self.ring = None  # the call ring on that memory (runtime.ring): ends with the connection

    @property
    def is_unix(self) -> bool:
        sock = self.writer.get_extra_info("socket")
        return sock is not None and sock.family == socket.AF_UNIX

    def authenticated(self, send_key: bytes, recv_key: bytes) -> None:
        """The handshake succeeded: full-size frames from now on, each with a MAC (see the module doc)."""
        self.max_frame_bytes = self._max_frame_bytes_after_auth
        if not self.is_unix or os.environ.get(MAC_UNIX_SOCKETS_ENV) == "1":
            self._send_mac, self._recv_mac = p.FrameMac(send_key), p.FrameMac(recv_key)

    async def recv(self) -> p.Message:
        prefix = await self.reader.readexactly(4)
        body = await self.reader.readexactly(p.frame_length(prefix, self.max_frame_bytes))
        if self._recv_mac is not None:
            body = p.unseal(prefix, body, self._recv_mac)
        region = self.region
        message = p.decode(body, region)
        if region is not None:
            region.received(message)
        return message

    def send(self, message: p.Message) -> None:
        region = self.region
        pieces = p.encode(message, region)
        if region is not None:
            region.sending(message)
        if self._send_mac is not None:
            pieces = p.seal(pieces, self._send_mac)
        self.writer.writelines(pieces)

    async def send_drain(self, message: p.Message) -> None:
        self.send(message)
        await self.writer.drain()

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    async def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        if not self.writer.is_closing():
            self.writer.close()
        try:
            # Shielded: the close waiter is one future shared by every caller, and cancelling one
            # waiting task (a channel's reader) would cancel it for all of them.
            await asyncio.shield(self.writer.wait_closed())
        except (ConnectionError, OSError):
            pass


async def open_connection(address: str | Address, max_frame_bytes: int = p.DEFAULT_MAX_FRAME_BYTES) -> Connection:
    addr = Address.parse(address) if isinstance(address, str) else address
    if addr.kind == "unix":
        reader, writer = await asyncio.open_unix_connection(addr.path, limit=1 << 20)
    else:
        reader, writer = await asyncio.open_connection(addr.host, addr.port, limit=1 << 20)
    return Connection(reader, writer, max_frame_bytes)


async def start_server(
    address: str | Address,
    on_connection: Callable[[Connection], Awaitable[None]],
    max_frame_bytes: int = p.DEFAULT_MAX_FRAME_BYTES,
    max_connections: int | None = None,
) -> tuple[asyncio.AbstractServer, Address]:
    """Listen; each accepted stream becomes a Connection handed to `on_connection`.

    At most `max_connections` (default: `server_limits`) are served at once; one more is closed
    at once, before it costs a handler or a buffer. Returns the server and the bound address
    (the real port when 0 was asked for).
    """
    addr = Address.parse(address) if isinstance(address, str) else address
    slots = _ConnectionSlots(max_connections or server_limits.max_connections, str(addr))

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not slots.take(writer):
            return
        conn = Connection(reader, writer, max_frame_bytes)
        try:
            await on_connection(conn)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # peer went away; nothing to report
        except asyncio.CancelledError:
            pass  # shutting down: a cancelled handler must not end this callback's task cancelled
        except p.ProtocolError as exc:
            log.warning("dropping connection from %s: %s", conn.peer, exc)
        except Exception:
            log.exception("connection handler failed for %s", conn.peer)
        finally:
            slots.give_back()
            await conn.close()

    if addr.kind == "unix":
        if os.path.exists(addr.path):
            os.unlink(addr.path)  # a stale socket of a previous run
        server = await asyncio.start_unix_server(accept, addr.path, limit=1 << 20)
        return server, addr
    server = await asyncio.start_server(accept, addr.host, addr.port, limit=1 << 20, family=socket.AF_INET)
    bound = Address("tcp", host=addr.host, port=server.sockets[0].getsockname()[1])
    slots.where = str(bound)
    return server, bound


class _ConnectionSlots:
    """The connection cap of one server; refusals are logged at most once a second (no log flood)."""

    def __init__(self, limit: int, where: str) -> None:
        self.limit = limit
        self.where = where
        self.open = 0
        self._refused = 0
        self._logged_at = float("-inf")

    def take(self, writer: asyncio.StreamWriter) -> bool:
        if self.open < self.limit:
            self.open += 1
            return True
        writer.transport.abort()  # no handshake, no buffer: the slot is what it would have cost
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= 1.0:
            log.warning("refused %d connection(s) on %s (latest from %s): %d open, the limit", self._refused,
                        self.where, writer.get_extra_info("peername") or "unix-peer", self.open)
            self._refused, self._logged_at = 0, now
        return False

    def give_back(self) -> None:
        self.open -= 1


async def client_handshake(conn: Connection, token: str, role: str, node_id: str) -> p.Welcome:
    """Answer the server's challenge and check its proof; raises ProtocolError on failure."""
    async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
        challenge = await conn.recv()
        if not isinstance(challenge, p.Challenge):
            raise p.ProtocolError(f"expected a challenge, got {type(challenge).__name__}")
        if challenge.version != p.PROTOCOL_VERSION:
            raise p.ProtocolError(f"server speaks protocol {challenge.version}, we speak {p.PROTOCOL_VERSION}")
        nonce = p.new_nonce()
        digest = p.client_digest(token, challenge, role, node_id, nonce)
        auth = p.Auth(p.PROTOCOL_VERSION, role, node_id, nonce, digest)
        await conn.send_drain(auth)
        reply = await conn.recv()
    if isinstance(reply, p.Error):
        raise p.ProtocolError(f"refused by {challenge.server_id}: {reply.message}")
    if not isinstance(reply, p.Welcome) or not hmac.compare_digest(reply.digest,
                                                                  p.server_digest(token, challenge, auth)):
        raise p.ProtocolError("the server could not prove it knows the cluster token")
    conn.peer_id = challenge.server_id
    to_server, to_client = p.session_keys(token, challenge, auth)
    conn.authenticated(send_key=to_server, recv_key=to_client)
    return reply


async def server_handshake(conn: Connection, token: str, server_id: str, timeout_s: float | None = None) -> p.Auth:
    """Challenge a new peer; raises ProtocolError (after telling it why) unless it knows the token.

    The whole exchange must end within `timeout_s` (default: `server_limits`), so a peer that
    connects and stays silent, or trickles bytes, holds its slot only that long.
    """
    timeout_s = timeout_s or server_limits.handshake_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            auth = await _challenge(conn, token, server_id)
    except TimeoutError:
        raise p.ProtocolError(f"no handshake within {timeout_s:g}s") from None
    conn.peer_id = auth.node_id
    return auth


async def _challenge(conn: Connection, token: str, server_id: str) -> p.Auth:
    challenge = p.Challenge(p.PROTOCOL_VERSION, p.new_nonce(), server_id)
    await conn.send_drain(challenge)
    auth = await conn.recv()
    if not isinstance(auth, p.Auth):
        raise p.ProtocolError(f"expected auth, got {type(auth).__name__}")
    try:
        p.check_auth(token, challenge, auth)
    except p.ProtocolError as exc:
        await conn.send_drain(p.Error(0, "unauthenticated", str(exc)))
        raise
    await conn.send_drain(p.Welcome(server_id, p.server_digest(token, challenge, auth)))
    to_server, to_client = p.session_keys(token, challenge, auth)
    conn.authenticated(send_key=to_client, recv_key=to_server)
    return auth


class RpcChannel:
    """Requests with a `req_id` over one connection; replies are matched back by id.

    Messages that are not replies (heartbeats, routing pushes, requests from the peer) go to
    `on_message`. When the connection drops, every pending request fails with ConnectionError.
    """

    def __init__(self, conn: Connection, on_message: Callable[[p.Message], Awaitable[None] | None] | None = None) -> None:
        self.conn = conn
        self.on_message = on_message
        self._pending: dict[int, asyncio.Future[p.Message]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    def start(self) -> RpcChannel:
        self._reader = asyncio.create_task(self._read_loop())
        return self

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self.conn.recv()
                req_id = getattr(message, "req_id", None)
                future = self._pending.pop(req_id, None) if isinstance(message, _REPLIES) else None
                if future is not None:
                    if not future.done():
                        future.set_result(message)
                elif self.on_message is not None:
                    result = self.on_message(message)
                    if asyncio.iscoroutine(result):
                        await result
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except p.ProtocolError as exc:
            log.warning("dropping connection to %s: %s", self.conn.peer_id or self.conn.peer, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("message handler failed on %s", self.conn.peer_id or self.conn.peer)
        finally:
            self._fail_pending()
            await self.conn.close()
            self.closed.set()

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"connection to {self.conn.peer_id or self.conn.peer} lost"))
        self._pending.clear()

    def next_id(self) -> int:
        return next(self._ids)

    async def request(self, message: p.Message, timeout: float | None = None) -> p.Message:
        """Send a message whose `req_id` is set here, and await the reply with that id."""
        if self.closed.is_set() or self.conn.closed:
            raise ConnectionError(f"connection to {self.conn.peer_id or self.conn.peer} is closed")
        message.req_id = self.next_id()  # type: ignore[attr-defined]
        future: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        self._pending[message.req_id] = future  # type: ignore[attr-defined]
        try:
            self.conn.send(message)
            await self.conn.writer.drain()
            if timeout is None:
                return await future
            async with asyncio.timeout(timeout):  # not wait_for: its inner future costs the reply a loop turn
                return await future
        finally:  # a reply that never comes must not pin its future forever
            self._pending.pop(message.req_id, None)  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._fail_pending()
        await self.conn.close()
        self.closed.set()


# Message types that answer a request (matched by req_id); anything else is unsolicited.
_REPLIES = (p.Result, p.Error, p.Ok, p.Stats, p.Placement, p.ClusterState)


async def dial(address: str, token: str, role: str, node_id: str,
               on_message: Callable[[RpcChannel, p.Message], Awaitable[None] | None] | None = None) -> RpcChannel:
    """Connect, prove the token and start an RPC channel; `on_message(channel, message)` gets pushes."""
    conn = await open_connection(address)
    try:
        await client_handshake(conn, token, role, node_id)
    except BaseException:
        await conn.close()
        raise
    channel = RpcChannel(conn)
    if on_message is not None:
        channel.on_message = lambda message: on_message(channel, message)
    return channel.start()


async def stay_connected(connect: Callable[[], Awaitable[RpcChannel]], session: Callable[[RpcChannel], Awaitable[None]],
                         peer: str, first_delay_s: float = 0.1, max_delay_s: float = 2.0) -> None:
    """Run `session` on a fresh connection whenever the last one is gone, backing off between tries.

    Any failure of a session is logged and followed by a reconnect, so a link never dies silently.
    A refusal (ProtocolError: wrong token or version) is raised: retrying will not fix it.
    """
    delay = first_delay_s
    loop = asyncio.get_running_loop()
    failures = 0  # in a row: the first and every 30th are logged as warnings, the rest at debug
    while True:
        channel: RpcChannel | None = None
        started = loop.time()
        try:
            channel = await connect()
            failures = 0
            await session(channel)
            log.warning("lost %s; reconnecting", peer)
        except p.ProtocolError:
            raise
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
            failures += 1
            log.log(logging.WARNING if failures % 30 == 1 else logging.DEBUG, "%s unreachable (%s); retrying",
                    peer, exc or type(exc).__name__)
        except Exception:  # a bug in a session must not end the link for good
            log.exception("link to %s failed; reconnecting", peer)
        finally:
            if channel is not None:
                await channel.close()
        if loop.time() - started > 2 * max_delay_s:  # it held a while: reconnect fast, then back off
            delay = first_delay_s
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay_s)
