"""The call ring: a per-layer invoke to a worker on this host with no event-loop turn on the worker and
no msgpack on either side.

It rides on a connection's shared region (`runtime.shm`). The region's header page holds one fixed-layout
control record per slot; the slot's areas hold the activations, expert indices and a small call list
(rows and function id per call) on the way in, the output on the way out. Two FIFOs next to the region
are the doorbells: the frontend writes a byte into "calls" after posting a slot, the worker's ring thread,
blocked in read() on it (the GIL released), wakes, computes every posted slot in place with its blocks
taken synchronously, sets the record's state and writes a byte into "done", which the frontend's event
loop watches. Each direction is one pipe write and one wakeup, the way vLLM's shared-memory MessageQueue
carries its per-step broadcast, without its spinning: on 2 cores a spinning reader takes the core the
writer needs (measured in bench/dispatch.py).

A thread off the event loop (the frontend's compute thread, between two trunk halves) can call through the
ring synchronously (`RingCaller.post_sync`, `wait_sync`): it posts the slot with the WAKE_FUTEX flag and sleeps on the
slot's state word (`runtime.futex`); the worker wakes it there instead of writing "done", so the reply
reaches the caller with one kernel wakeup and no event loop, message or task on either side. Workers that
can do so say it in the header (READY_FUTEX).

A call whose blocks are not all resident (or whose spec the worker lacks) comes back `COLD` and the
frontend sends the same slot through the socket, which loads. Bad records come back `FAILED` with the
reason and are logged; the worker goes on. A connection's ring ends with the connection: the worker's
thread is woken and exits, the frontend's pending calls fail with ConnectionError. FAASMOE_RING=0 (either
end) keeps the socket as every invoke's doorbell.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime import futex
from runtime import protocol as p

log = logging.getLogger(__name__)

RING_ENV = "FAASMOE_RING"  # "0": never offer or accept the call ring
# The worker's thread polls the slots this long after a call before it blocks on the doorbell, a synchronous
# caller its slot before it sleeps. 0 by default: on a CPU the next layer's call comes a trunk half later and
# an expert call takes milliseconds, so polling only takes the GIL and a core from the process beside it;
# bench/dispatch.py --paths ring,ring-spin,ring-sync,ring-sync-spin measures each.
SPIN_ENV = "FAASMOE_RING_SPIN_US"
IDLE, POSTED, DONE, COLD, FAILED = 0, 1, 2, 3, 4
READY_AT = 32  # header byte the worker sets once its ring thread runs (before it answers the offer):
READY_PIPE, READY_FUTEX = 1, 2  # it wakes callers through "done" only, or also on a slot's state word
WAKE_FUTEX = 1  # record flag: the caller sleeps on the state word (wait_sync), not in the event loop
_CONTROL_AT = 64  # after the cookie: one record per slot
_CONTROL_STRIDE = 64
# state, calls, rows, hidden, x dtype, experts dtype, output dtype, flags, offsets in the input area of the
# expert indices and of the call list, output bytes (the frontend: room; the worker: written), compute seconds
_CONTROL = struct.Struct("<IIIIBBBBIIId")
_FLAGS_AT = struct.calcsize("<IIIIBBB")  # the flags byte within a record
_CALL = struct.Struct("<IH")  # rows, length of the function id that follows
MAX_CALLS = 4096
_DTYPES = p._DTYPES
_CODES = p._DTYPE_CODE


def enabled() -> bool:
    return os.environ.get(RING_ENV, "1") != "0"


def fifo_paths(region_path: str) -> tuple[str, str]:
    return region_path + "-calls", region_path + "-done"


def max_slots(header_bytes: int) -> int:
    return (header_bytes - _CONTROL_AT) // _CONTROL_STRIDE


@dataclass
class RingCall:
    """One posted slot as the worker reads it: views of the region, no copies."""

    slot: int
    function_ids: list[str]
    rows: list[int]
    x: torch.Tensor
    experts: torch.Tensor
    dest: torch.Tensor  # the slot's output area (uint8)


class _Slots:
    """The control records and areas of a region (`runtime.shm` lays them out)."""

    def __init__(self, region) -> None:
        if not 0 < region.slots <= max_slots(region.header_bytes):
            raise ValueError(f"a call ring has 1 to {max_slots(region.header_bytes)} slots, not {region.slots}")
        self.mm, self.bytes = region._mm, region._bytes
        self.slots, self.slot_bytes, self.header = region.slots, region.slot_bytes, region.header_bytes

    def record_at(self, slot: int) -> int:
        return _CONTROL_AT + slot * _CONTROL_STRIDE

    def state(self, slot: int) -> int:
        return int.from_bytes(self.mm[self.record_at(slot):self.record_at(slot) + 4], "little")

    def set_state(self, slot: int, state: int) -> None:
        at = self.record_at(slot)
        self.mm[at:at + 4] = state.to_bytes(4, "little")

    def state_address(self, slot: int) -> int:
        """Where the slot's state word lies in this process (what a futex waits on)."""
        return self.bytes.data_ptr() + self.record_at(slot)

    def input_at(self, slot: int) -> int:
        return self.header + 2 * slot * self.slot_bytes


# -- the frontend's side ------------------------------------------------------------------------------


class RingCaller:
    """Posts invokes into a region's slots and wakes on the worker's "done" doorbell (in the event loop)."""

    def __init__(self, slots: _Slots, calls_fd: int, done_fd: int, release: Callable[[int], None]) -> None:
        self._slots = slots
        self._calls_fd, self._done_fd = calls_fd, done_fd
        self._release = release  # hands a slot back to the region once nobody needs it
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._spin_s = _spin_seconds()  # wait_sync polls this long before it sleeps
        self.closed = False

    @classmethod
    def create(cls, region) -> RingCaller:
        """FIFOs beside `region` (an shm.OfferedRegion not yet offered); raises OSError where they cannot be made."""
        slots = _Slots(region)
        calls, done = fifo_paths(region.path)
        os.mkfifo(calls, 0o600)
        try:
            os.mkfifo(done, 0o600)
            # O_RDWR: never blocks on open, never EOF nor EPIPE when the peer goes (the socket says so)
            flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
            calls_fd = os.open(calls, flags)
            done_fd = os.open(done, flags)
        except BaseException:
            cls.unlink_paths(region.path)
            raise
        return cls(slots, calls_fd, done_fd, region.release)

    @staticmethod
    def unlink_paths(region_path: str) -> None:
        for path in fifo_paths(region_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def accepted(self) -> bool:
        """Whether the worker runs the ring for this region (it says so in the header before answering)."""
        return self._slots.mm[READY_AT] in (READY_PIPE, READY_FUTEX)

    @property
    def synchronous(self) -> bool:
        """Whether `post_sync` and `wait_sync` may be used: the worker wakes callers on the state word and this
        host can wait there."""
        return self._slots.mm[READY_AT] == READY_FUTEX and futex.available() and not self.closed

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._done_fd, self._on_done)

    async def call(self, slot: int, function_ids: list[str], rows: list[int], x: torch.Tensor,
                   experts: torch.Tensor, out_nbytes: int,
                   timeout: float) -> tuple[int, float, torch.dtype | None, int] | None:
        """Post the invoke already placed in `slot` (x and experts are its views) and wait for the worker:
        (state, compute seconds, output dtype, output bytes); None, posting nothing, when the call list
        does not fit the slot. The slot stays lent: on COLD the socket path reuses it, on DONE the caller
        takes the output view and gives the slot back."""
        if self.closed:
            raise ConnectionError("the call ring is closed")
        offsets = self._write_calls(slot, function_ids, rows, experts)
        if offsets is None:
            return None
        async with asyncio.timeout(timeout):
            state = await self.post(slot, len(function_ids), x.shape[0], x.shape[1], _CODES[x.dtype],
                                    _CODES[experts.dtype], *offsets, out_nbytes)
        return self._answer(slot, state)

    def post_sync(self, slot: int, function_ids: list[str], rows: list[int], x: torch.Tensor,
                  experts: torch.Tensor, out_nbytes: int) -> bool:
        """`call`'s posting for a thread off the event loop (only where `synchronous`): the worker will wake
        `wait_sync` on the slot's state word. False, posting nothing, when the call list does not fit."""
        if self.closed:
            raise ConnectionError("the call ring is closed")
        offsets = self._write_calls(slot, function_ids, rows, experts)
        if offsets is None:
            return False
        self._write_record(slot, len(function_ids), x.shape[0], x.shape[1], _CODES[x.dtype], _CODES[experts.dtype],
                           *offsets, out_nbytes, WAKE_FUTEX)
        return True

    def wait_sync(self, slot: int, timeout: float) -> tuple[int, float, torch.dtype | None, int]:
        """Sleep on a slot `post_sync` posted until the worker answers: (state, compute seconds, output
        dtype, output bytes). Raises TimeoutError past `timeout` (the slot stays lent: the caller drops the
        connection) and ConnectionError when the ring closes meanwhile."""
        s = self._slots
        if self._spin_s:
            until = time.perf_counter() + self._spin_s
            while s.state(slot) == POSTED and time.perf_counter() < until:
                pass
        address, deadline = s.state_address(slot), time.monotonic() + timeout
        while (state := s.state(slot)) == POSTED:
            if self.closed:
                raise ConnectionError("connection lost during a call through the ring")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer through the call ring in {timeout:.1f} s")
            futex.wait(address, POSTED, min(left, 0.1))  # close() wakes it too; 0.1 s bounds a missed wakeup
        return self._answer(slot, state)

    def _write_calls(self, slot: int, function_ids: list[str], rows: list[int],
                     experts: torch.Tensor) -> tuple[int, int] | None:
        """The call list after the expert indices `place` put in the slot: their offset and its, or None
        when it does not fit."""
        s = self._slots
        base = s.input_at(slot)
        experts_at = experts.data_ptr() - s.bytes.data_ptr() - base  # where `place` put them (aligned after x)
        at = calls_at = -(-(experts_at + experts.nbytes) // 8) * 8
        mm = s.mm
        for fid, n in zip(function_ids, rows):
            name = fid.encode()
            end = at + _CALL.size + len(name)
            if end > s.slot_bytes:
                return None
            _CALL.pack_into(mm, base + at, n, len(name))
            mm[base + at + _CALL.size:base + end] = name
            at = end
        return experts_at, calls_at

    def _answer(self, slot: int, state: int) -> tuple[int, float, torch.dtype | None, int]:
        _, _, _, _, _, _, out_code, _, _, _, out_nbytes, compute_s = _CONTROL.unpack_from(
            self._slots.mm, self._slots.record_at(slot))
        return state, compute_s, _DTYPES[out_code] if out_code < len(_DTYPES) else None, out_nbytes

    def post(self, slot: int, calls: int, rows: int, hidden: int, x_code: int, e_code: int, experts_at: int,
             calls_at: int, out_nbytes: int) -> asyncio.Future[int]:
        """Write `slot`'s record, ring the doorbell; the future gets the state the worker leaves."""
        future = self._loop.create_future()
        self._pending[slot] = future
        self._write_record(slot, calls, rows, hidden, x_code, e_code, experts_at, calls_at, out_nbytes, 0)
        return future

    def _write_record(self, slot: int, calls: int, rows: int, hidden: int, x_code: int, e_code: int,
                      experts_at: int, calls_at: int, out_nbytes: int, flags: int) -> None:
        s = self._slots
        # The record first, its state last: the worker's thread may be scanning the slots right now.
        _CONTROL.pack_into(s.mm, s.record_at(slot), IDLE, calls, rows, hidden, x_code, e_code, 0, flags, experts_at,
                           calls_at, out_nbytes, 0.0)
        s.set_state(slot, POSTED)
        try:
            os.write(self._calls_fd, b"\x01")
        except BlockingIOError:  # the worker has a pipe full of bytes to read: it will see this slot too
            pass

    def failure(self, slot: int, nbytes: int) -> str:
        """The worker's reason for a FAILED slot (written where the output would be)."""
        at = self._slots.input_at(slot) + self._slots.slot_bytes
        return bytes(self._slots.mm[at:at + min(nbytes, 4096)]).decode(errors="replace")

    def _on_done(self) -> None:
        try:
            os.read(self._done_fd, 4096)
        except BlockingIOError:
            pass
        for slot in [slot for slot in self._pending if self._slots.state(slot) != POSTED]:
            future = self._pending.pop(slot)
            if future.done():  # its caller gave up (cancelled, timed out): nobody takes the slot
                if not self.closed:
                    self._release(slot)
            else:
                future.set_result(self._slots.state(slot))

    def close(self) -> None:
        """The connection is gone: pending calls fail; their slots go with the region."""
        if self.closed:
            return
        self.closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._done_fd)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("connection lost during a call through the ring"))
        self._pending.clear()
        if futex.available():  # a synchronous caller sleeping on a state word sees `closed` now
            for slot in range(self._slots.slots):
                futex.wake(self._slots.state_address(slot))
        for fd in (self._calls_fd, self._done_fd):
            os.close(fd)


# -- the worker's side --------------------------------------------------------------------------------


class RingServer:
    """A thread that serves a region's posted slots: `serve(call)` returns the output and compute seconds,
    or None when the call needs the socket path (a block to load)."""

    def __init__(self, region, serve: Callable[[RingCall], tuple[torch.Tensor, float] | None], name: str) -> None:
        self._slots = _Slots(region)
        calls, done = fifo_paths(region.path)
        self._calls_fd = _open_fifo(calls, os.O_RDWR | os.O_CLOEXEC)  # the thread blocks in read()
        try:
            self._done_fd = _open_fifo(done, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            os.close(self._calls_fd)
            raise
        for path in (calls, done):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._serve = serve
        self._spin_s = _spin_seconds()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        region._mm[READY_AT] = READY_FUTEX if futex.available() else READY_PIPE

    def close(self) -> None:
        """Wake the thread to exit; it closes the doorbells (only it reads them: no fd is closed under it)."""
        if self._stopping or not self._thread.is_alive():
            return
        self._stopping = True
        os.write(self._calls_fd, b"\x00")

    def _run(self) -> None:
        try:
            while not self._stopping:
                os.read(self._calls_fd, 4096)  # EINTR is retried by Python; no other error is expected
                try:
                    served = self._serve_posted()
                    while served and self._spin_s and not self._stopping:
                        until = time.perf_counter() + self._spin_s
                        served = False
                        while not served and time.perf_counter() < until:
                            served = self._serve_posted()
                except Exception:  # _serve_slot answers each call's own failure; this is anything else
                    log.exception("the call ring's thread failed a round; it goes on")
        finally:
            os.close(self._calls_fd)
            os.close(self._done_fd)

    def _serve_posted(self) -> bool:
        served = False
        for slot in range(self._slots.slots):
            if self._slots.state(slot) == POSTED:
                self._serve_slot(slot)
                served = True
        return served

    def _serve_slot(self, slot: int) -> None:
        s = self._slots
        record = s.record_at(slot)
        flags = s.mm[record + _FLAGS_AT]  # the caller's WAKE_FUTEX: where it waits for the answer
        try:
            call = self._read(slot)
            served = self._serve(call)
            if served is None:
                s.set_state(slot, COLD)
            else:
                output, compute_s = served
                nbytes = _place_output(output, call.dest)
                # Everything else first, the state last: the frontend may be scanning for another slot's reply.
                _CONTROL.pack_into(s.mm, record, POSTED, len(call.rows), sum(call.rows), output.shape[-1], 0, 0,
                                   _CODES[output.dtype], flags, 0, 0, nbytes, compute_s)
                s.set_state(slot, DONE)
        except Exception as exc:  # the caller gets the reason; this worker goes on serving
            log.warning("ring call in slot %d failed: %r", slot, exc)
            reason = f"{type(exc).__name__}: {exc}".encode()[:4096]
            at = s.input_at(slot) + s.slot_bytes
            s.mm[at:at + len(reason)] = reason
            _CONTROL.pack_into(s.mm, record, POSTED, 0, 0, 0, 0, 0, 0, flags, 0, 0, len(reason), 0.0)
            s.set_state(slot, FAILED)
        if flags & WAKE_FUTEX and futex.available():
            futex.wake(s.state_address(slot))
            return
        try:
            os.write(self._done_fd, b"\x01")
        except BlockingIOError:  # the frontend has bytes to read already: it scans every slot
            pass

    def _read(self, slot: int) -> RingCall:
        """The posted call, bounds-checked: a record that points outside its slot is an error, not a read."""
        s = self._slots
        _, n_calls, rows, hidden, x_code, e_code, _, _, experts_at, calls_at, out_nbytes, _ = _CONTROL.unpack_from(
            s.mm, s.record_at(slot))
        if not 0 < n_calls <= MAX_CALLS or x_code >= len(_DTYPES) or e_code >= len(_DTYPES):
            raise ValueError(f"bad call record: {n_calls} calls, dtype codes {x_code}/{e_code}")
        x_dtype, e_dtype = _DTYPES[x_code], _DTYPES[e_code]
        x_nbytes, e_nbytes = rows * hidden * x_dtype.itemsize, rows * e_dtype.itemsize
        if not rows or experts_at < x_nbytes or experts_at % e_dtype.itemsize or experts_at + e_nbytes > calls_at \
                or calls_at > s.slot_bytes or out_nbytes > s.slot_bytes:
            raise ValueError(f"call record of {rows} rows x {hidden} does not fit its slot")
        base = s.input_at(slot)
        ids, counts, at = [], [], calls_at
        for _ in range(n_calls):
            if at + _CALL.size > s.slot_bytes:
                raise ValueError("the call list runs past the slot")
            n, length = _CALL.unpack_from(s.mm, base + at)
            at += _CALL.size
            if at + length > s.slot_bytes:
                raise ValueError("the call list runs past the slot")
            ids.append(bytes(s.mm[base + at:base + at + length]).decode())
            counts.append(n)
            at += length
        if sum(counts) != rows:
            raise ValueError(f"calls of {sum(counts)} rows in a record of {rows}")
        x = s.bytes[base:base + x_nbytes].view(x_dtype).view(rows, hidden)
        experts = s.bytes[base + experts_at:base + experts_at + e_nbytes].view(e_dtype)
        out_at = base + s.slot_bytes
        return RingCall(slot, ids, counts, x, experts, s.bytes[out_at:out_at + out_nbytes])


def _place_output(output: torch.Tensor, dest: torch.Tensor) -> int:
    """The output's bytes in the slot's output area (computed there already, or copied now)."""
    nbytes = output.nbytes
    if nbytes > dest.numel() or output.dtype not in _CODES:
        raise ValueError(f"an output of {nbytes} bytes ({output.dtype}) does not fit the slot's {dest.numel()}")
    if output.device.type == "cpu" and output.data_ptr() == dest.data_ptr():
        return nbytes
    dest[:nbytes].view(output.dtype).view(output.shape).copy_(output)
    return nbytes


def _spin_seconds() -> float:
    # Polling sees a slot without a syscall between, which orders the peer's writes only on x86 (TSO).
    return float(os.environ.get(SPIN_ENV, "0")) / 1e6 if platform.machine() in ("x86_64", "AMD64") else 0.0


def _open_fifo(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise OSError(f"{path} is not our FIFO")
    return fd
