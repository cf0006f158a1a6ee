"""Trunk tensors by content, shared by every model of one process that holds the same bytes.

Two tenants' fine-tunes of one base keep the base's embeddings, attention and norms byte for byte:
their trunks hold one copy. Entries are weak: a tensor lives while some loaded trunk uses it, so a
trunk that scales to zero gives back what no other trunk shares.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class SharedTensors:
    """get(key, make): the live object made for `key` (a content digest and how it was laid out), else make it."""

    def __init__(self) -> None:
        self._live: weakref.WeakValueDictionary[Hashable, object] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self.reused = 0  # lookups answered by a tensor another trunk had loaded

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        with self._lock:
            found = self._live.get(key)
            if found is not None:
                self.reused += 1
                return found  # type: ignore[return-value]
        made = make()  # outside the lock: a read may take seconds, other keys need not wait
        with self._lock:
            return self._live.setdefault(key, made)  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._live)
