"""The expert functions a frontend's models use, one entry per content: who uses each, and as whom.

Function ids name a block's bytes (faasmoe.model.content), so the models a frontend serves (a base
and its tenants' fine-tunes) share every block they hold in common: one FunctionSpec object, one
load on a worker, one resident copy. The catalog keeps that spec and its users. A spec's `owner` is
a tenant only while that tenant's private models are its only users: then the tenant's memory quota
counts it; a block a shared model (or another tenant) also uses is nobody's alone and counts for none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig, parse_dtype
from faasmoe.model.content import CheckpointDigests, DigestCache, PartDigest, scoped_function_id
from faasmoe.model.moe_model import block_ranges
from runtime import protocol as p


def function_name(model: str, layer: int, block: int, owner: str = "") -> str:
    """`model/layer/block`, prefixed `tenant:` for a private deployment (DESIGN.md): for people."""
    return f"{owner}:{model}/{layer}/{block}" if owner else f"{model}/{layer}/{block}"


def block_content(layout: ExpertLayout, digests: CheckpointDigests, layer: int, first: int, count: int,
                  dtype: torch.dtype) -> str:
    """The content digest of experts first..first+count of `layer`, from the checkpoint's cached digests."""
    parts = (PartDigest(dt, shape, digests.piece(name, index)) for name, index, dt, shape
             in layout.block_parts(layer, first, count))
    return layout.block_digest(dtype, count, parts)


def block_content_at(path: str | Path, layer: int, first: int, count: int, dtype: torch.dtype | str,
                     cache: DigestCache | None = None) -> str:
    """The content digest of one block of the checkpoint at `path` (hashing what no cache has): the
    `content` a hand-made FunctionSpec needs (benchmarks and tests)."""
    reader = CheckpointReader(path)
    try:
        layout = ExpertLayout(reader, MoEConfig.from_pretrained(path))
        return block_content(layout, CheckpointDigests.of(reader, cache), layer, first, count, parse_dtype(dtype))
    finally:
        reader.close()


@dataclass(frozen=True)
class FunctionUser:
    """A deployment that calls a function: its model name and, for a private one, its tenant."""

    model: str
    owner: str = ""


@dataclass
class CatalogEntry:
    spec: p.FunctionSpec
    users: list[FunctionUser] = field(default_factory=list)
    quotas: dict[str, int] = field(default_factory=dict)  # owner -> its memory quota


class FunctionCatalog:
    """Every expert function of a frontend's models, by id: one spec per content, with its users."""

    def __init__(self) -> None:
        self.entries: dict[str, CatalogEntry] = {}

    def model_functions(self, model: str, path: Path, layout: ExpertLayout, digests: CheckpointDigests,
                        block_size: int, dtype: torch.dtype, keep_alive_s: float, owner: str = "",
                        owner_quota_bytes: int = 0, dedupe: bool = True) -> dict[tuple[int, int], p.FunctionSpec]:
        """(layer, block) -> the function of every expert block of one model, shared with the models
        already here wherever the bytes are the same (unless `dedupe` is off for this model)."""
        config = layout.config
        dtype_name = str(dtype).removeprefix("torch.")
        resolved = str(Path(path).resolve())
        specs = {}
        for layer in config.moe_layers:
            for block, (first, count) in enumerate(block_ranges(config.num_experts, block_size)):
                content = block_content(layout, digests, layer, first, count, dtype)
                fid = content if dedupe else scoped_function_id(content, f"{owner}:{model}@{resolved}")
                spec = p.FunctionSpec(fid, resolved, layer, first, count, dtype_name, count * config.expert_bytes(dtype),
                                      owner, keep_alive_s, owner_quota_bytes, content,
                                      function_name(model, layer, block, owner))
                specs[(layer, block)] = self._add(spec, FunctionUser(model, owner), owner_quota_bytes)
        return specs

    def _add(self, spec: p.FunctionSpec, user: FunctionUser, quota: int) -> p.FunctionSpec:
        entry = self.entries.get(spec.function_id)
        if entry is None:
            entry = self.entries[spec.function_id] = CatalogEntry(spec)
        shared = entry.spec
        if user not in entry.users:
            entry.users.append(user)
        if user.owner:
            entry.quotas[user.owner] = quota
        owners = {u.owner for u in entry.users}
        only = next(iter(owners)) if len(owners) == 1 else ""
        shared.owner = only  # one tenant's alone, or nobody's
        shared.owner_quota_bytes = entry.quotas.get(only, 0) if only else 0
        shared.keep_alive_s = max(shared.keep_alive_s, spec.keep_alive_s)  # the longest any user asked for
        return shared

    def users(self, function_id: str) -> list[FunctionUser]:
        entry = self.entries.get(function_id)
        return list(entry.users) if entry is not None else []

    def describe(self, function_id: str) -> dict:
        """A function for the admin view: its name, where it lies, its size and the models that use it
        (the frontend adds the tenants that may call them)."""
        entry = self.entries[function_id]
        s = entry.spec
        models = sorted({u.model for u in entry.users})
        return {"id": s.function_id, "name": s.name, "layer": s.layer, "first": s.first, "count": s.count,
                "dtype": s.dtype, "bytes": s.nbytes, "owner": s.owner, "models": models, "shared_by": len(models)}
