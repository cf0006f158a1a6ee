"""Lazy access to a Hugging Face safetensors checkpoint, single-file or sharded.

Tensors are read one at a time through safetensors' memory-mapped handles; an expert block
is read by slicing, so loading experts 8..15 of a layer touches only their bytes, never the
whole shard (the point of per-expert functions is not to pay for the experts you don't run).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from faasmoe.config import MoEConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing a tensor or has one of the wrong shape."""


@dataclass(frozen=True)
class ExpertWeights:
    """Weights of `count` consecutive experts of one layer, fused for one matmul each.

    gate_up: [count, 2*I, H] (gate rows first, then up rows), down: [count, H, I].
    """

    gate_up: torch.Tensor
    down: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


class CheckpointReader:
    """Maps tensor names to shard files and reads tensors or slices of them on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file_of = self._index()
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
            missing = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
            return dict(weight_map)
        files = [self.path / SINGLE_FILE] if (self.path / SINGLE_FILE).exists() else sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")
        names: dict[str, str] = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                names.update((key, file.name) for key in handle.keys())
        return names

    def _handle(self, name: str) -> Any:
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        with self._lock:
            if file not in self._handles:
                self._handles[file] = safe_open(self.path / file, framework="pt")
            return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def file_of(self, name: str) -> Path:
        self._handle(name)
        return self.path / self._file_of[name]

    def view(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A zero-copy view of the memory-mapped tensor; pages are read when touched."""
        if shape is not None:
            self._check_shape(name, shape)
        return self._handle(name).get_tensor(name)

    # safetensors hands out views of its memory map; copying makes the bytes ours, so a
    # loaded weight is real memory that is accounted, and the file can be closed.
    def tensor(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A whole tensor (an owned copy), checked against the expected shape when given."""
        return self.view(name, shape).to(dtype=dtype, copy=True)

    def rows(
        self, name: str, start: int, stop: int, shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rows start..stop of a tensor's first dimension (an owned copy): only those bytes are read."""
        self._check_shape(name, shape)
        return self._handle(name).get_slice(name)[start:stop].to(dtype=dtype, copy=True)

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        actual = self.shape(name)
        if tuple(actual) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {actual}, expected {list(shape)}")

    def close(self) -> None:
        with self._lock:
            self._handles.clear()


class ExpertLayout:
    """Where one family's routed-expert and router tensors live, in any of the on-disk layouts.

    Per-expert: `mlp.experts.E.{gate,up,down}_proj.weight`; Mixtral: `block_sparse_moe.experts.E.
    {w1,w3,w2}.weight`; fused (transformers v5): `mlp.experts.gate_up_proj` [E,2I,H] and
    `mlp.experts.down_proj` [E,H,I].
    """

    def __init__(self, reader: CheckpointReader, config: MoEConfig) -> None:
        self.reader = reader
        self.config = config

    def moe_prefix(self, layer: int) -> str:
        mixtral = f"model.layers.{layer}.block_sparse_moe"
        if self.reader.has(f"{mixtral}.gate.weight"):
            return mixtral
        return f"model.layers.{layer}.mlp"

    def router_name(self, layer: int) -> str:
        return f"{self.moe_prefix(layer)}.gate.weight"

    def load_block(self, layer: int, first: int, count: int, dtype: torch.dtype) -> ExpertWeights:
        """Experts first..first+count of `layer`, reading only their bytes."""
        cfg = self.config
        if not (0 <= first and first + count <= cfg.num_experts and count > 0):
            raise CheckpointError(f"experts {first}..{first + count - 1} out of range 0..{cfg.num_experts - 1}")
        hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
        prefix = self.moe_prefix(layer)
        fused = f"{prefix}.experts.gate_up_proj"
        if self.reader.has(fused):
            gate_up = self.reader.rows(fused, first, first + count, (cfg.num_experts, 2 * inter, hidden), dtype)
            down = self.reader.rows(
                f"{prefix}.experts.down_proj", first, first + count, (cfg.num_experts, hidden, inter), dtype
            )
            return ExpertWeights(gate_up.contiguous(), down.contiguous())

        gate_up = torch.empty(count, 2 * inter, hidden, dtype=dtype)
        down = torch.empty(count, hidden, inter, dtype=dtype)
        names = ("w1", "w3", "w2") if prefix.endswith("block_sparse_moe") else ("gate_proj", "up_proj", "down_proj")
        for slot, expert in enumerate(range(first, first + count)):
            base = f"{prefix}.experts.{expert}"
            gate_up[slot, :inter].copy_(self.reader.view(f"{base}.{names[0]}.weight", (inter, hidden)))
            gate_up[slot, inter:].copy_(self.reader.view(f"{base}.{names[1]}.weight", (inter, hidden)))
            down[slot].copy_(self.reader.view(f"{base}.{names[2]}.weight", (hidden, inter)))
        return ExpertWeights(gate_up, down)
