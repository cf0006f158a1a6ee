"""Default memory budgets of workers, as fractions of what the machine has free: set here once.

A worker may fill most of a device; CPU workers and host caches share one RAM, so each of the
`sharers` gets its share instead of every one claiming the whole. A CPU worker has no host tier
by default: it would be the same RAM as its device tier, holding what scale to zero should give
back, and the page cache already serves re-reads of the checkpoint.
"""

from __future__ import annotations

import psutil
import torch

DEVICE_FRACTION = 0.9  # of a GPU's free memory, or of available RAM on CPU, for resident experts
HOST_CACHE_FRACTION = 0.25  # of available RAM, for the (pinned) host tier of a GPU worker's evicted blocks
KV_CACHE_FRACTION = 0.1  # of available RAM (CPU) or free device memory (CUDA), for the KV caches of all models
KV_CACHE_MAX_CPU = 4 * 1024**3  # vLLM's CPU default (VLLM_CPU_KVCACHE_SPACE=4)


def available_ram() -> int:
    return psutil.virtual_memory().available


def device_budget(device: torch.device, sharers: int = 1) -> int:
    """Expert bytes a worker on `device` may hold: free GPU memory (pynvml, else torch) or RAM."""
    if device.type == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            free = pynvml.nvmlDeviceGetMemoryInfo(handle).free
        except Exception:  # no NVML (containers): ask the CUDA runtime
            free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEVICE_FRACTION)
    return int(available_ram() * DEVICE_FRACTION / max(1, sharers))


def host_cache_budget(device: torch.device, sharers: int = 1) -> int:
    """Host-RAM cache of one worker on `device` when `sharers` workers share this machine's RAM: none on CPU."""
    if device.type == "cpu":
        return 0
    return int(available_ram() * HOST_CACHE_FRACTION / max(1, sharers))


def kv_cache_budget(device: torch.device, models: int = 1) -> int:
    """Default KV cache budget of one served model when `models` share the trunk's device."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * KV_CACHE_FRACTION / max(1, models))
        except (RuntimeError, AssertionError):  # no usable CUDA runtime here: size it like the CPU
            pass
    return int(min(available_ram() * KV_CACHE_FRACTION, KV_CACHE_MAX_CPU) / max(1, models))
