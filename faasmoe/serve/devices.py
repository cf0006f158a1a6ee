"""Which devices a local worker pool runs on, from the `--device` flag."""

from __future__ import annotations

import torch


def resolve_devices(spec: str | None) -> list[str]:
    """`cpu`, `cuda` (every GPU) or a comma list like `cuda:0,cuda:1`; None: cuda when available."""
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available here")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [d.strip() for d in spec.split(",") if d.strip()]
