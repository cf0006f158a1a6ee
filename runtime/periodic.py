"""Background loops that survive their own failures: a failing round is logged, the next one runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def every(seconds: float, step: Callable[[], Awaitable[None] | None], name: str) -> asyncio.Task[None]:
    """Run `step` every `seconds` until the task is cancelled; an exception in one round is logged
    with its traceback and the loop goes on (a dead background loop fails silently otherwise)."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                result = step()
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; it runs again in %.2fs", name, seconds)

    return asyncio.create_task(loop(), name=name)
