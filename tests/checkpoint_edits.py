"""Edits of real checkpoint files, as a fine-tune or a corrupted disk would make them (tests only)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from faasmoe.model.checkpoint import CheckpointReader


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def retrain_tensor(path: Path, name: str, seed: int) -> None:
    """Replace a tensor by new values, as expert-specialised fine-tuning does (the file is rewritten whole)."""
    file = CheckpointReader(path).entry(name).file
    tensors = load_file(file)
    g = torch.Generator().manual_seed(seed)
    tensors[name] = (torch.randn(tensors[name].shape, generator=g) * 0.05).to(tensors[name].dtype)
    save_file(tensors, file, metadata={"format": "pt"})


def overwrite_middle(path: Path, name: str, values: int = 3) -> int:
    """Change `values` elements a third of the way into a tensor, in place (header, size and every other
    byte kept): a change between any sampled windows. Returns the byte offset changed in the file."""
    entry = CheckpointReader(path).entry(name)
    item = entry.dtype.itemsize
    count = entry.row_bytes * (entry.shape[0] if entry.shape else 1) // item
    at = entry.offset + (count // 3) * item
    with open(entry.file, "r+b") as f:
        f.seek(at)
        old = torch.frombuffer(bytearray(f.read(values * item)), dtype=entry.dtype)
        f.seek(at)
        f.write((old + 0.25).numpy().tobytes() if entry.dtype != torch.bfloat16
                else (old + 0.25).view(torch.int16).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return at
