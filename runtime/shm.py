"""Shared memory for the per-layer hop between a frontend and a worker on the same host.

Right after the handshake the frontend creates a file in /dev/shm for the connection and offers
it (`ShmOffer`); a worker on the same host (boot id and hostname) that can open it and reads the
frontend's cookie at its start maps it and unlinks it at once, and the frontend unlinks it too
whatever the answer, so once both sides hold their mapping no name is left behind: a SIGKILL of
either leaks nothing (a frontend killed within the offer's round trip leaves its file; the next
frontend on the host removes files whose creator is gone). The region is cut into slots of two
areas each: the invoke's activations and expert indices (the frontend writes them), and its
output (the worker writes it). Tensors that lie in the region travel as (offset, length)
references (`runtime.protocol`), so the socket carries only the small message, the doorbell.

A slot is reused only when the reply to its invoke has come (the worker no longer reads it or
writes it) and every output tensor the frontend handed out of it is gone (weak references
follow them, so a caller that keeps its outputs keeps its slot). An invoke bigger than a slot,
or sent while every slot is busy, goes through the socket as before. A timed-out invoke's slot
is never freed: the connection is dropped and its region with it.

The region's contents are not MACed like TCP frames: only this machine's processes of the same
user (or root) can map it, and they can read the cluster token anyway. FAASMOE_SHM=0 (either
end) keeps every connection on the socket.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import socket
import stat
import threading
import weakref

import torch

from runtime import protocol as p

SHM_ENV = "FAASMOE_SHM"  # "0": never offer or accept shared memory
SHM_DIR = "/dev/shm"
DEFAULT_SLOTS = 4  # invokes in flight at once per connection (micro-batches, models sharing a worker)
DEFAULT_SLOT_BYTES = 2 * 1024 * 1024  # per area: 512 rows of hidden 2048 in bf16
MAX_REGION_BYTES = 1 << 30  # a worker maps no bigger offer
_HEADER_BYTES = 4096  # the cookie; slots start on a page
_COOKIE_BYTES = 16
_NAME = re.compile(r"faasmoe-(\d+)-[0-9a-f]{16}\Z")
_ORPHAN = re.compile(r"faasmoe-(\d+)-[0-9a-f]{16}(?:-calls|-done)?\Z")  # a region or its ring's doorbells
_swept = False


class ShmRefused(Exception):
    """Why a worker will not share memory with this peer (the connection stays on the socket)."""


def enabled() -> bool:
    return os.environ.get(SHM_ENV, "1") != "0"


def host_identity() -> tuple[str, str]:
    """(boot id, hostname): two processes with the same pair share a kernel; no boot id, no sharing."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    return boot_id, socket.gethostname()


class SharedRegion:
    """One mapping of a connection's region: bounds-checked uint8 views, and the offset of a tensor in it.

    The worker's side as is; never closed explicitly: a view outlives nothing it points into,
    since every view keeps the mapping alive until it goes."""

    def __init__(self, mm: mmap.mmap, name: str) -> None:
        self.name = name
        self.nbytes = len(mm)
        self._mm = mm
        self._bytes = torch.frombuffer(mm, dtype=torch.uint8)
        self._base = self._bytes.data_ptr()
        self.header_bytes = _HEADER_BYTES
        self.slots = self.slot_bytes = 0  # the worker learns them from an offer with a call ring

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    def offset_of(self, t: torch.Tensor) -> int | None:
        start = t.data_ptr() - self._base
        return start if 0 <= start and start + t.nbytes <= self.nbytes else None

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._bytes[offset:offset + nbytes]

    def sending(self, message: p.Message) -> None:
        """Every message this connection sends passes here (after its req_id is set)."""

    def received(self, message: p.Message) -> None:
        """Every message this connection receives passes here, after it was decoded."""

    @classmethod
    def accept(cls, offer: p.ShmOffer) -> SharedRegion:
        """The worker's side: map the offered file if it is on this host and ours to open, then unlink
        it. Raises ShmRefused with the reason otherwise."""
        if not enabled():
            raise ShmRefused(f"{SHM_ENV}=0 on the worker")
        boot_id, host = host_identity()
        if not boot_id or (offer.boot_id, offer.host) != (boot_id, host):
            raise ShmRefused(f"another host ({offer.host})")
        if not _NAME.match(offer.name) or not 0 < offer.nbytes <= MAX_REGION_BYTES:
            raise ShmRefused(f"bad offer {offer.name!r} of {offer.nbytes} bytes")
        path = os.path.join(SHM_DIR, offer.name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ShmRefused(f"cannot open {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != offer.nbytes:
                raise ShmRefused(f"{path} is not the {offer.nbytes}-byte file offered")
            mm = mmap.mmap(fd, offer.nbytes)
        finally:
            os.close(fd)
        if mm[:_COOKIE_BYTES] != offer.cookie:
            raise ShmRefused(f"{path} holds another process's memory")  # a namesake in another mount namespace
        _unlink(path)
        region = cls(mm, offer.name)
        if offer.ring_slots and _HEADER_BYTES + 2 * offer.ring_slots * offer.ring_slot_bytes == offer.nbytes:
            region.slots, region.slot_bytes = offer.ring_slots, offer.ring_slot_bytes
        return region


class OfferedRegion(SharedRegion):
    """The frontend's side: it creates the file and lends its slots to invokes, one slot per invoke."""

    def __init__(self, mm: mmap.mmap, name: str, slots: int, slot_bytes: int, cookie: bytes) -> None:
        super().__init__(mm, name)
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.cookie = cookie
        self._in_flight = [False] * slots  # an invoke's reply has not come: the worker may read or write
        self._outputs: list[list[weakref.ref]] = [[] for _ in range(slots)]  # output views handed out
        self._memory = memoryview(mm)
        self._pending: dict[int, int] = {}  # req_id -> slot
        self._taking = threading.Lock()  # the event loop and a compute thread's synchronous calls both take slots

    @classmethod
    def create(cls, slots: int = DEFAULT_SLOTS, slot_bytes: int = DEFAULT_SLOT_BYTES) -> OfferedRegion:
        """A new region in /dev/shm (raises OSError where there is none, or no room)."""
        global _swept
        if not _swept:
            _swept = True
            _remove_orphans()
        slot_bytes = -(-slot_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        nbytes = _HEADER_BYTES + 2 * slots * slot_bytes
        name = f"faasmoe-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # tmpfs allocates on first touch: reserve it now, or a full /dev/shm would SIGBUS both sides later
            os.posix_fallocate(fd, 0, nbytes)
            mm = mmap.mmap(fd, nbytes)
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        cookie = os.urandom(_COOKIE_BYTES)
        mm[:_COOKIE_BYTES] = cookie
        return cls(mm, name, slots, slot_bytes, cookie)

    def offer(self, ring: bool = False) -> p.ShmOffer:
        """`ring`: ask the worker to serve calls posted in the slots too (`runtime.ring`)."""
        boot_id, host = host_identity()
        return p.ShmOffer(0, self.name, self.nbytes, boot_id, host, self.cookie,
                          self.slots if ring else 0, self.slot_bytes if ring else 0)

    def unlink(self) -> None:
        """Remove the name (the mappings stay); done once the peer answered the offer, whatever it said."""
        _unlink(os.path.join(SHM_DIR, self.name))

    # -- slots -------------------------------------------------------------------------------

    def _input_at(self, slot: int) -> int:
        return _HEADER_BYTES + 2 * slot * self.slot_bytes

    def slot_of(self, out_offset: int) -> int:
        """The slot whose output area starts at `out_offset` (as `place` returned it)."""
        return (out_offset - _HEADER_BYTES) // (2 * self.slot_bytes)

    def output_at(self, slot: int) -> int:
        return self._input_at(slot) + self.slot_bytes

    def release(self, slot: int) -> None:
        """The worker is done with the slot (a call through the ring came back)."""
        self._in_flight[slot] = False

    def _take(self) -> int | None:
        with self._taking:
            for slot, in_flight in enumerate(self._in_flight):
                if not in_flight:
                    outputs = self._outputs[slot]
                    if outputs and any(ref() is not None for ref in outputs):
                        continue
                    outputs.clear()
                    self._in_flight[slot] = True
                    return slot
        return None

    def place(self, xs: list[torch.Tensor], experts: list[torch.Tensor],
              out_nbytes: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Copy one invoke's activations and expert indices into a free slot: (x, experts, output
        offset), views of the region; None when they or the output do not fit, or no slot is free."""
        dtype, etype = xs[0].dtype, experts[0].dtype
        if any(x.dtype != dtype or x.device.type != "cpu" or x.dim() != 2 for x in xs) or \
                any(e.dtype != etype or e.device.type != "cpu" for e in experts):
            return None
        rows, hidden = sum(x.shape[0] for x in xs), xs[0].shape[1]
        x_nbytes = rows * hidden * dtype.itemsize
        e_at = -(-x_nbytes // p.SHARED_ALIGN) * p.SHARED_ALIGN
        if not rows or e_at + rows * etype.itemsize > self.slot_bytes or out_nbytes > self.slot_bytes:
            return None
        slot = self._take()
        if slot is None:
            return None
        at = self._input_at(slot)
        try:
            x = torch.cat(xs, out=self._bytes[at:at + x_nbytes].view(dtype).view(rows, hidden))
            e = torch.cat(experts, out=self._bytes[at + e_at:at + e_at + rows * etype.itemsize].view(etype))
        except BaseException:
            self._in_flight[slot] = False
            raise
        return x, e, at + self.slot_bytes

    def sending(self, message: p.Message) -> None:
        if isinstance(message, p.Invoke) and message.out_offset >= 0:
            self._pending[message.req_id] = (message.out_offset - _HEADER_BYTES) // (2 * self.slot_bytes)

    def received(self, message: p.Message) -> None:
        # Any reply means the worker is done with the slot, also one nobody awaits any more (cancelled).
        if isinstance(message, (p.Result, p.Error)):
            slot = self._pending.pop(message.req_id, None)
            if slot is not None:
                self._in_flight[slot] = False

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """A reply's output, in the output area of a slot whose invoke is in flight; the slot stays
        taken while the view (or any tensor sharing its memory) lives."""
        slot, within = divmod(offset - _HEADER_BYTES, 2 * self.slot_bytes)
        if offset < _HEADER_BYTES or slot >= self.slots or not self._in_flight[slot] or \
                within < self.slot_bytes or within + nbytes > 2 * self.slot_bytes:
            raise p.ProtocolError(f"shared tensor at {offset}+{nbytes} is not in an output area lent to the peer")
        # Its own buffer object, kept alive by the tensor and every view of it: the weak reference says when
        # the caller is done (a view of the whole region could not tell).
        piece = self._memory[offset:offset + nbytes]
        self._outputs[slot].append(weakref.ref(piece))
        return torch.frombuffer(piece, dtype=torch.uint8)


def _remove_orphans() -> None:
    """Remove regions whose creator is gone (killed within an offer's round trip): their pid is in the name.
    A creator in another pid namespace that shares /dev/shm looks gone too: its offer then takes the socket."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        match = _ORPHAN.match(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            _unlink(os.path.join(SHM_DIR, name))
        except (PermissionError, OverflowError):  # alive but another user's, or no such pid at all
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
