"""Which devices a local worker pool runs on, from the `--device` flag, and where the trunk runs."""

from __future__ import annotations

import re

import torch

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def cuda_device_count() -> int:
    """GPUs this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(spec: str | None, cuda_devices: int | None = None) -> list[str]:
    """`cpu`, `cuda` (every GPU) or a comma list like `cuda:0,cuda:1`; None: every GPU when there is one,
    else cpu. `cuda_devices` is how many GPUs there are (None: ask torch)."""
    count = cuda_device_count() if cuda_devices is None else cuda_devices
    if spec is None:
        spec = "cuda" if count else "cpu"
    if spec == "cuda":
        if not count:
            raise ValueError("--device cuda: CUDA is not available here")
        return [f"cuda:{i}" for i in range(count)]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError(f"--device {spec!r}: name cpu, cuda or devices like cuda:0,cuda:1")
    for device in devices:
        index = _CUDA_INDEX.fullmatch(device)
        if index and int(index.group(1)) >= count:
            have = f"only cuda:0..cuda:{count - 1}" if count else "no CUDA device"
            raise ValueError(f"--device {spec}: {device} does not exist here ({have})")
    return devices


def trunk_device(spec: str | None, cuda_devices: int | None = None) -> str:
    """Where a frontend runs its models' trunks: the first device of the pool `spec` names, so the
    trunk sits on a GPU whenever the experts do (`cuda:1` means cuda:1, not cuda:0)."""
    return resolve_devices(spec, cuda_devices)[0]
