"""Recent calls per expert function, counted where the frontend invokes them: the dashboard's hit map.

One row of per-second buckets per function, in a ring of `horizon_s` columns shared by every row: a
call is one integer increment, and a column is cleared once when its second comes round again, so the
counter costs O(functions x horizon) memory however busy the model is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

HORIZON_S = 60


class RecentHits:
    """Calls per function in the last seconds (up to `horizon_s`), plus totals since start."""

    def __init__(self, function_ids: Iterable[str], horizon_s: int = HORIZON_S) -> None:
        self.ids = list(function_ids)
        self.index = {fid: i for i, fid in enumerate(self.ids)}
        self.horizon_s = horizon_s
        self._counts = np.zeros((len(self.ids), horizon_s), dtype=np.int64)
        self._second = np.full(horizon_s, -1, dtype=np.int64)  # the second each column counts
        self.calls = 0  # every call recorded, since start
        self.cold_starts = 0  # of them, the ones that loaded their function first

    def record(self, function_ids: Iterable[str], cold_starts: int = 0, now: float | None = None) -> None:
        """Count one call of each id (ids this counter does not know are ignored)."""
        second = int(time.monotonic() if now is None else now)
        column = second % self.horizon_s
        if self._second[column] != second:
            self._counts[:, column] = 0
            self._second[column] = second
        for fid in function_ids:
            i = self.index.get(fid)
            if i is not None:
                self._counts[i, column] += 1
                self.calls += 1
        self.cold_starts += cold_starts

    def recent(self, window_s: float, now: float | None = None) -> dict[str, int]:
        """Calls per function id in the last `window_s` seconds (at most the horizon), the current one included."""
        second = int(time.monotonic() if now is None else now)
        window = max(1, min(int(window_s), self.horizon_s))
        live = (self._second > second - window) & (self._second <= second)
        totals = self._counts[:, live].sum(axis=1)
        return {fid: int(n) for fid, n in zip(self.ids, totals)}
