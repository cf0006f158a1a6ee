"""A compute thread: runs torch work off the event loop with the leanest handoff there is (a worker's
expert calls, a frontend's trunk halves).

`loop.run_in_executor` wraps each job in a concurrent.futures.Future whose state is copied into an
asyncio future by callbacks on both threads; after a call has streamed the weights through the
caches, those layers cost ~240 us per invoke on a 2-core VM (bench/dispatch.py). Here a job is
one queue entry and its result one `call_soon_threadsafe`: ~110 us.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """One thread that runs jobs in order; `run` returns an awaitable of the job's result."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def shutdown(self) -> None:
        """Jobs not started are dropped (their futures cancelled); a running one finishes."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].call_soon_threadsafe(job[1].cancel)
        self._jobs.put(None)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, fn, args = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting task, as run_in_executor does
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            # This frame lives on while the queue waits: the job's arguments (a call's blocks) must not.
            del job, loop, future, fn, args, result, error


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
