"""How a worker's OpenMP threads wait between parallel regions: a short spin, unless the environment says.

A worker runs a call's experts one after another, every matmul on all cores (faasmoe/model/experts.py):
8-32 parallel regions back to back, so threads that sleep after each one pay a wake-up per matmul
(remote experts on the 2-core VM with OMP_WAIT_POLICY=PASSIVE: batch 1 21.3-21.5 tok/s against
23.3-24.0 spinning, concurrency 4 53-54 against 59-61), while an endless spin would take the cores the
frontend's trunk computes on next. libgomp's GOMP_SPINCOUNT bounds the spin (measured here after one region: 100k iterations keep a core
busy ~3 ms, libgomp's default 300k ~8 ms); it reads it when torch loads, so it goes into the worker's environment first.
"""

from __future__ import annotations

from collections.abc import Mapping

WORKER_SPIN_COUNT = "100000"


def worker_openmp_env(env: Mapping[str, str]) -> dict[str, str]:
    """What a worker's environment gets added: the bounded spin, unless it sets a wait policy or spin itself."""
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return {}
    return {"GOMP_SPINCOUNT": WORKER_SPIN_COUNT}
