"""Per-sequence key/value cache: one growable buffer per layer, written in place."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one sequence for every layer, [kv_heads, capacity, head_dim] each.

    A step writes its new tokens at `length` in every layer, then `commit` advances `length`
    once, so all layers of one step see the same past.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 64,
        max_capacity: int | None = None,
    ) -> None:
        self.length = 0
        self.max_capacity = max_capacity  # growth never passes it (None: no cap)
        self._shape = (num_kv_heads, head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        self._keys = [self._alloc(capacity) for _ in range(num_layers)]
        self._values = [self._alloc(capacity) for _ in range(num_layers)]

    def _alloc(self, capacity: int) -> torch.Tensor:
        heads, dim = self._shape
        return torch.empty(heads, capacity, dim, dtype=self._dtype, device=self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def capacity(self) -> int:
        return self._keys[0].shape[1]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._keys) + sum(t.nbytes for t in self._values)

    def reserve(self, capacity: int) -> None:
        """Grow every layer's buffer to hold `capacity` tokens (amortised doubling)."""
        if capacity <= self.capacity:
            return
        if self.max_capacity is not None and capacity > self.max_capacity:
            raise ValueError(f"KV cache of {capacity} tokens asked for; this sequence may hold {self.max_capacity}")
        capacity = max(capacity, 2 * self.capacity)
        if self.max_capacity is not None:
            capacity = min(capacity, self.max_capacity)
        for buffers in (self._keys, self._values):
            for i, old in enumerate(buffers):
                new = self._alloc(capacity)
                new[:, : self.length] = old[:, : self.length]
                buffers[i] = new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [t, kv_heads, d] and return the layer's whole past + new."""
        t = k.shape[0]
        end = self.length + t
        if end > self.capacity:
            self.reserve(end)
        keys, values = self._keys[layer], self._values[layer]
        keys[:, self.length : end] = k.transpose(0, 1)
        values[:, self.length : end] = v.transpose(0, 1)
        return keys[:, :end], values[:, :end]

    def commit(self, tokens: int) -> None:
        self.length += tokens
