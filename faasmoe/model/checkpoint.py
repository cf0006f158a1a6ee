"""Lazy access to a Hugging Face safetensors checkpoint, single-file or sharded.

Tensors are read one at a time through safetensors' memory-mapped handles; an expert block
is read by slicing, so loading experts 8..15 of a layer touches only their bytes, never the
whole shard (the point of per-expert functions is not to pay for the experts you don't run).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from faasmoe.model.config import MoEConfig
from faasmoe.model.content import ContentMismatch, FileIdentity, PartHasher, block_digest, file_identity
from faasmoe.model.quantized import (
    QuantizedMatrix,
    from_stored,
    fuse_rows,
    pack_int4,
    packable,
    per_row_scales,
    rows_buffer,
    stored_names,
    words_held,
)

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


@dataclass(frozen=True)
class QuantizedExpertWeights:
    """Experts of a quantized checkpoint, kept quantized (faasmoe.model.quantized): per expert its gate and up
    projections fused in one [2I, H] matrix and its down [H, I]."""

    gate_up: tuple[QuantizedMatrix, ...]
    down: tuple[QuantizedMatrix, ...]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.gate_up) + sum(m.nbytes for m in self.down)

    def to(self, device: torch.device | str) -> QuantizedExpertWeights:
        return QuantizedExpertWeights(tuple(m.to(device) for m in self.gate_up), tuple(m.to(device) for m in self.down))

    def packed(self) -> QuantizedExpertWeights:
        """Its 4-bit matrices in the CPU int4 kernel's layout where it takes them (itself if none changes)."""
        gate_up, down = tuple(map(pack_int4, self.gate_up)), tuple(map(pack_int4, self.down))
        same = all(a is b for a, b in zip(gate_up + down, self.gate_up + self.down))
        return self if same else QuantizedExpertWeights(gate_up, down)

    @property
    def can_pack(self) -> bool:
        """Whether `packed` would change a matrix (an Int4Matrix the kernel takes)."""
        return any(map(packable, self.gate_up + self.down))


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024
_RUN_BYTES = 2 * 1024 * 1024  # at most this much in one read_many preadv: what is in is hashed while the rest comes
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)

_convert_pool: ThreadPoolExecutor | None = None
_convert_lock = threading.Lock()


def _converter() -> ThreadPoolExecutor:
    """The thread that turns quantized tensors as stored into their compute form during a load."""
    global _convert_pool
    with _convert_lock:
        if _convert_pool is None:
            _convert_pool = ThreadPoolExecutor(1, "faasmoe-quantized")
        return _convert_pool


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, writable in place."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def unscaled_fp8(path: Path, name: str, dtype: torch.dtype) -> CheckpointError:
    """The error for a float8 tensor read as a plain weight: its scales would be lost (a cast alone gives
    other weights), so such a checkpoint is refused."""
    return CheckpointError(f"{path}: {name!r} is stored as {dtype} without the quantization_config "
                           "(fp8, weight_block_size) that gives its scales")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, absolute byte offset, dtype and shape."""

    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first dimension (the whole tensor for a scalar)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return self.row_bytes * (self.shape[0] if self.shape else 1)


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header: 8-byte little-endian length, then JSON."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: unreadable safetensors header ({exc})") from exc
    entries = {}
    base = 8 + length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        entry = TensorEntry(file, base + begin, dtype, tuple(info["shape"]))
        expected = math.prod(entry.shape) * dtype.itemsize
        if end - begin != expected or base + end > size:
            raise CheckpointError(f"{file}: tensor {name!r} has inconsistent offsets (file truncated?)")
        entries[name] = entry
    return entries


class CheckpointReader:
    """Maps tensor names to shard files and reads tensors, or rows of them, on demand.

    Reads are positional (`preadv`) straight into the destination tensor, so loading an
    expert block reads exactly its bytes; no shard is mapped or read whole.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries = self._index()
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _index(self) -> dict[str, TensorEntry]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
            missing = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
            files = sorted({self.path / f for f in weight_map.values()})
        elif (self.path / SINGLE_FILE).exists():
            files = [self.path / SINGLE_FILE]
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")
        entries: dict[str, TensorEntry] = {}
        self._inodes = {}
        for file in files:
            st = file.stat()
            self._inodes[file] = (st.st_dev, st.st_ino)
            entries.update(read_header(file))
        return entries

    def replaced(self) -> bool:
        """Whether a file this reader indexed is no longer the one at its name (renamed over, or deleted):
        its header and bytes are the old file's, so a reader for what is there now must be made."""
        for file, inode in self._inodes.items():
            try:
                st = file.stat()
            except FileNotFoundError:
                return True
            if (st.st_dev, st.st_ino) != inode:
                return True
        return False

    def entry(self, name: str) -> TensorEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        return entry

    def has(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> list[int]:
        return list(self.entry(name).shape)

    def tensor(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A whole tensor, checked against the expected shape when given."""
        entry = self.entry(name)
        if shape is not None:
            self.check_shape(name, shape)
        return self.rows(name, 0, entry.shape[0] if entry.shape else 1, entry.shape, dtype)

    def rows(
        self, name: str, start: int, stop: int, shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rows start..stop of a tensor's first dimension: only those bytes are read."""
        entry = self.entry(name)
        self.check_shape(name, shape)
        out = torch.empty((stop - start, *entry.shape[1:]) if entry.shape else (), dtype=entry.dtype)
        self.read_into(name, out, start)
        return out if dtype is None or dtype == entry.dtype else out.to(dtype)

    def read_into(self, name: str, out: torch.Tensor, start_row: int = 0) -> None:
        """Fill a contiguous CPU tensor of the file's dtype from the tensor's rows at start_row."""
        entry = self.entry(name)
        if out.dtype != entry.dtype or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"read_into {name!r}: need a contiguous CPU {entry.dtype} tensor")
        if out.nbytes == 0:
            return
        self._read_fully(entry.file, [_bytes_of(out)], entry.offset + start_row * entry.row_bytes, name)

    def read_many(self, names: list[str], into: dict[str, torch.Tensor] | None = None,
                  done: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
        """Whole tensors by name, in the file's order, those lying back to back in one preadv each. A quantized
        block has many small tensors: safetensors keeps those of one dtype together, so each matrix's int32 words,
        zeros and g_idx lie back to back and its fp16 scales far away; read matrix by matrix, a cold load jumped
        between the two and paid the disk's latency for every small read.
        A tensor in `into` (contiguous, the file's dtype) is read there. `done(name, tensor)` is called for each
        as soon as its run is in (to hash it while the next run is read)."""
        into = into or {}
        ordered = sorted(names, key=lambda name: (str(self.entry(name).file), self.entry(name).offset))
        if hasattr(os, "posix_fadvise"):  # every range asked for at once: the disk works on several (cold 4-bit
            for name in ordered:          # layer, 3 A/B pairs: 0.38-0.44 s against 0.46-0.69 s without)
                entry = self.entry(name)
                os.posix_fadvise(self._fd(entry.file), entry.offset, entry.nbytes, os.POSIX_FADV_WILLNEED)
        tensors: dict[str, torch.Tensor] = {}
        run: list[str] = []
        run_file, run_end, run_bytes = None, 0, 0
        for name in ordered + [None]:
            entry = None if name is None else self.entry(name)
            size = 0 if entry is None else entry.nbytes
            if run and (entry is None or entry.file != run_file or entry.offset != run_end
                        or run_bytes + size > _RUN_BYTES):
                self._read_run(run, tensors)
                for read in run if done is not None else ():
                    done(read, tensors[read])
                run, run_bytes = [], 0
            if name is not None:
                tensors[name] = into[name] if name in into else torch.empty(entry.shape, dtype=entry.dtype)
                run.append(name)
                run_file, run_end, run_bytes = entry.file, entry.offset + size, run_bytes + size
        return tensors

    def _read_run(self, run: list[str], tensors: dict[str, torch.Tensor]) -> None:
        """Tensors back to back in one file into tensors[name], one preadv for all (more where it reads short)."""
        first = self.entry(run[0])
        buffers = []
        for name in run:
            out = tensors[name]
            if out.dtype != self.entry(name).dtype or not out.is_contiguous() or out.nbytes != self.entry(name).nbytes:
                raise ValueError(f"read_many {name!r}: need a contiguous CPU {self.entry(name).dtype} tensor")
            if out.nbytes:
                buffers.append(_bytes_of(out))
        self._read_fully(first.file, buffers, first.offset, run[0])

    def _read_fully(self, file: Path, buffers: list[memoryview], offset: int, name: str) -> None:
        """Fill the buffers from `file` at `offset` in turn, asking again where the kernel reads short."""
        fd = self._fd(file)
        while buffers:
            n = os.preadv(fd, buffers, offset)
            if n <= 0:
                raise CheckpointError(f"{file}: short read of tensor {name!r} (file truncated?)")
            offset += n
            while buffers and n >= len(buffers[0]):
                n -= len(buffers[0])
                buffers.pop(0)
            if buffers and n:
                buffers[0] = buffers[0][n:]

    def identity(self, file: Path) -> FileIdentity:
        """The identity of the file this reader reads as `file` (its open descriptor's, not the name's)."""
        return file_identity(file, self._fd(file))

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        actual = self.shape(name)
        if tuple(actual) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {actual}, expected {list(shape)}")

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


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

    def load_block(
        self, layer: int, first: int, count: int, dtype: torch.dtype, pin_memory: bool = False,
        expect: str | None = None,
    ) -> ExpertWeights | QuantizedExpertWeights:
        """Experts first..first+count of `layer`, reading only their bytes (into pinned memory
        when asked, so the host-to-device copy that follows can run at full speed). With `expect`,
        the bytes read are hashed as they come in and a block whose digest is not `expect` is refused
        (ContentMismatch): what is served is what the function id names. A quantized checkpoint's
        experts stay quantized (`QuantizedExpertWeights`)."""
        cfg = self.config
        if not (0 <= first and first + count <= cfg.num_experts and count > 0):
            raise CheckpointError(f"experts {first}..{first + count - 1} out of range 0..{cfg.num_experts - 1}")
        prefix = self.moe_prefix(layer)
        hasher = PartHasher() if expect is not None else None  # in block_parts' order
        if self._fused_fp8(prefix):
            weights = self._load_fused_fp8(prefix, first, count, dtype, hasher)
        elif self.quantized_experts(layer):
            weights = self._load_quantized(prefix, first, count, dtype, hasher)
        else:
            weights = self._load_plain(layer, prefix, first, count, dtype, pin_memory, hasher)
        if hasher is not None:
            got = self.block_digest(dtype, count, hasher.parts())
            if got != expect:
                raise ContentMismatch(
                    f"experts {first}..{first + count - 1} of layer {layer} in {self.reader.path} hash to {got[:16]}, "
                    f"not {expect[:16]} as their function id says: the checkpoint changed since it was deployed; "
                    "refusing to serve them")
        return weights

    def _load_plain(self, layer: int, prefix: str, first: int, count: int, dtype: torch.dtype, pin_memory: bool,
                    hasher: PartHasher | None) -> ExpertWeights:
        for name, _, stored, _ in self.block_parts(layer, first, 1):
            if stored in FLOAT8:
                raise unscaled_fp8(self.reader.path, name, stored)
        cfg = self.config
        hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
        gate_up = torch.empty(count, 2 * inter, hidden, dtype=dtype, pin_memory=pin_memory)
        down = torch.empty(count, hidden, inter, dtype=dtype, pin_memory=pin_memory)
        fused = f"{prefix}.experts.gate_up_proj"  # part i of expert s: index 3 * s + i
        if self.reader.has(fused):
            raw_gate_up = self._fill_rows(fused, first, (cfg.num_experts, 2 * inter, hidden), gate_up)
            if hasher is not None:  # hashed while the down rows are read
                for slot in range(count):
                    hasher.add(3 * slot, raw_gate_up[slot, :inter])
                    hasher.add(3 * slot + 1, raw_gate_up[slot, inter:])
            raw_down = self._fill_rows(f"{prefix}.experts.down_proj", first, (cfg.num_experts, hidden, inter), down)
            if hasher is not None:
                for slot in range(count):
                    hasher.add(3 * slot + 2, raw_down[slot])
            return ExpertWeights(gate_up, down)
        names = self._expert_names(prefix)
        for slot, expert in enumerate(range(first, first + count)):
            base = f"{prefix}.experts.{expert}"
            for i, (name, dest) in enumerate(zip(names, (gate_up[slot, :inter], gate_up[slot, inter:], down[slot]))):
                raw = self._fill(f"{base}.{name}.weight", dest)
                if hasher is not None:
                    hasher.add(3 * slot + i, raw)
        return ExpertWeights(gate_up, down)

    def quantized_experts(self, layer: int) -> bool:
        """Whether this layer's routed experts are stored quantized (the config's quantization_config)."""
        scheme = self.config.quantization
        if scheme is None:
            return False
        prefix = self.moe_prefix(layer)
        if self._fused_fp8(prefix):
            return True
        gate = f"{prefix}.experts.0.{self._expert_names(prefix)[0]}.weight"
        return len(stored_names(self.reader.has, scheme, gate)) > 1

    def _fused_fp8(self, prefix: str) -> bool:
        """Whether the experts are stored fused and in FP8: `experts.gate_up_proj` [E, 2I, H] e4m3 with its
        `experts.gate_up_proj_scale_inv` [E, row blocks, column blocks], the same for down_proj (transformers'
        fine-grained FP8 layout of fused experts)."""
        scheme = self.config.quantization
        fused = f"{prefix}.experts.gate_up_proj"
        return scheme is not None and scheme.method == "fp8" and self.reader.has(fused) and \
            self.reader.has(f"{fused}_scale_inv")

    def block_digest(self, dtype: torch.dtype, count: int, parts) -> str:
        """The content digest of a block of this checkpoint's parts; a quantized one names its scheme too
        (the same codes mean other weights under another zero offset or group size)."""
        scheme = self.config.quantization
        return block_digest(dtype, count, parts, "" if scheme is None else repr(scheme))

    def _quantized_matrices(self, prefix: str, first: int, count: int):
        """(weight name, [N, K], the tensors it is stored as) of each expert's gate, up and down, in order."""
        cfg = self.config
        hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
        shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
        for expert in range(first, first + count):
            for name, shape in zip(self._expert_names(prefix), shapes):
                weight = f"{prefix}.experts.{expert}.{name}.weight"
                yield weight, shape, stored_names(self.reader.has, cfg.quantization, weight)

    def _load_quantized(self, prefix: str, first: int, count: int, dtype: torch.dtype,
                        hasher: PartHasher | None) -> QuantizedExpertWeights:
        """Experts first..first+count as their quantized matrices, each stored tensor hashed in block_parts' order."""
        scheme = self.config.quantization
        listed = list(self._quantized_matrices(prefix, first, count))
        # 4-bit words are held as read (Int4Words): nothing to convert into a buffer
        convert = not words_held(scheme)
        outs: list[torch.Tensor | None] = []
        for i, (_, shape, _) in enumerate(listed):
            if i % 3 == 0:  # an expert's gate and up go straight into one buffer: fuse_rows copies nothing
                halves = rows_buffer(scheme, [shape, shape]) if convert else [None, None]
            outs.append(halves[i % 3] if i % 3 < 2 else None)
        parts = [(i, full, index) for index, (i, full) in
                 enumerate((i, full) for i, (_, _, names) in enumerate(listed) for full in names)]
        into = {}
        for i, full, _ in parts:  # fp8 codes are read where they will stay
            entry, out = self.reader.entry(full), outs[i]
            if out is not None and entry.dtype == torch.float8_e4m3fn and tuple(entry.shape) == listed[i][1]:
                into[full] = out.view(torch.float8_e4m3fn)
        stored: list[dict[str, torch.Tensor]] = [{} for _ in listed]
        missing = [len(names) for _, _, names in listed]
        matrices: list = [None] * len(listed)
        where = {full: (i, index) for i, full, index in parts}

        def arrived(full: str, raw: torch.Tensor) -> None:
            i, index = where[full]
            if hasher is not None:
                hasher.add(index, raw)
            stored[i][full.rsplit(".", 1)[1]] = raw
            missing[i] -= 1
            if not missing[i]:  # converted on a thread of its own while the next parts are read (torch lets go of the GIL)
                weight, shape, _ = listed[i]
                matrices[i] = _converter().submit(from_stored, scheme, stored[i], shape, dtype, weight, outs[i])

        self.reader.read_many([full for _, full, _ in parts], into, arrived)
        matrices = [m.result() for m in matrices]
        gate_up = tuple(fuse_rows(gate, up) for gate, up in zip(matrices[0::3], matrices[1::3]))
        return QuantizedExpertWeights(gate_up, tuple(matrices[2::3]))

    def _fused_fp8_parts(self, prefix: str, expert: int) -> list[tuple[str, int, torch.dtype, tuple[int, ...]]]:
        """One expert's parts of fused FP8 tensors, in block_parts' form: its gate rows, its up rows (the
        pieces a fused gate_up is hashed in), its gate_up scales, its down rows, its down scales."""
        cfg = self.config
        hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
        gate_up, down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
        entry = self.reader.entry
        return [(gate_up, 2 * expert, entry(gate_up).dtype, (inter, hidden)),
                (gate_up, 2 * expert + 1, entry(gate_up).dtype, (inter, hidden)),
                (f"{gate_up}_scale_inv", expert, entry(f"{gate_up}_scale_inv").dtype,
                 tuple(entry(f"{gate_up}_scale_inv").shape[1:])),
                (down, expert, entry(down).dtype, (hidden, inter)),
                (f"{down}_scale_inv", expert, entry(f"{down}_scale_inv").dtype, tuple(entry(f"{down}_scale_inv").shape[1:]))]

    def _load_fused_fp8(self, prefix: str, first: int, count: int, dtype: torch.dtype,
                        hasher: PartHasher | None) -> QuantizedExpertWeights:
        """Experts first..first+count of fused FP8 tensors: each expert's rows read where they stay, checked and
        hashed as block_parts lists them."""
        cfg, scheme = self.config, self.config.quantization
        hidden, inter, experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        rows, cols = scheme.block
        gate_up, down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
        tensors = {}
        for name, shape in ((gate_up, (2 * inter, hidden)), (down, (hidden, inter))):
            scale_shape = (math.ceil(shape[0] / rows), math.ceil(shape[1] / cols))
            self.reader.check_shape(name, (experts, *shape))
            self.reader.check_shape(f"{name}_scale_inv", (experts, *scale_shape))
            for full in (name, f"{name}_scale_inv"):
                tensors[full] = self.reader.rows(full, first, first + count, self.reader.entry(full).shape)
        gate_ups, downs = [], []
        for slot in range(count):
            raw = [tensors[gate_up][slot, :inter], tensors[gate_up][slot, inter:], tensors[f"{gate_up}_scale_inv"][slot],
                   tensors[down][slot], tensors[f"{down}_scale_inv"][slot]]
            for i, part in enumerate(raw if hasher is not None else ()):
                hasher.add(5 * slot + i, part)
            stored = {"weight": tensors[gate_up][slot], "weight_scale_inv": raw[2]}
            matrix = from_stored(scheme, stored, (2 * inter, hidden), dtype, f"{gate_up}[{first + slot}]")
            gate_ups.append(per_row_scales(matrix) if inter % rows else matrix)  # as fuse_rows holds a gate and up
            stored = {"weight": tensors[down][slot], "weight_scale_inv": raw[4]}
            downs.append(from_stored(scheme, stored, (hidden, inter), dtype, f"{down}[{first + slot}]"))
        return QuantizedExpertWeights(tuple(gate_ups), tuple(downs))

    def block_parts(self, layer: int, first: int, count: int) -> list[tuple[str, int, torch.dtype, tuple[int, ...]]]:
        """(tensor name, piece index, checkpoint dtype, shape) of each part of experts first..first+count,
        in the order a block digest takes them: each expert's gate, up, down (see faasmoe.model.content);
        a quantized matrix's part is each tensor it is stored as (codes, scales, zeros, ...)."""
        cfg = self.config
        hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
        shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
        prefix = self.moe_prefix(layer)
        fused = f"{prefix}.experts.gate_up_proj"
        parts = []
        if self._fused_fp8(prefix):
            return [part for e in range(first, first + count) for part in self._fused_fp8_parts(prefix, e)]
        if self.quantized_experts(layer):
            names = [full for _, _, stored in self._quantized_matrices(prefix, first, count) for full in stored]
            return [(full, 0, self.reader.entry(full).dtype, self.reader.entry(full).shape) for full in names]
        if self.reader.has(fused):
            down_name = f"{prefix}.experts.down_proj"
            gu, dn = self.reader.entry(fused).dtype, self.reader.entry(down_name).dtype
            for e in range(first, first + count):
                parts += [(fused, 2 * e, gu, shapes[0]), (fused, 2 * e + 1, gu, shapes[1]), (down_name, e, dn, shapes[2])]
            return parts
        for e in range(first, first + count):
            for name, shape in zip(self._expert_names(prefix), shapes):
                full = f"{prefix}.experts.{e}.{name}.weight"
                parts.append((full, 0, self.reader.entry(full).dtype, shape))
        return parts

    def block_identities(self, layer: int, first: int, count: int) -> tuple[FileIdentity, ...]:
        """The identities of the files holding experts first..first+count of `layer`, as this reader reads them."""
        files = sorted({self.reader.entry(name).file for name, _, _, _ in self.block_parts(layer, first, count)})
        return tuple(self.reader.identity(file) for file in files)

    @staticmethod
    def _expert_names(prefix: str) -> tuple[str, str, str]:
        """The gate, up and down projections' names in a per-expert layout (Mixtral: w1, w3, w2)."""
        return ("w1", "w3", "w2") if prefix.endswith("block_sparse_moe") else ("gate_proj", "up_proj", "down_proj")

    def _fill_rows(self, name: str, first: int, shape: tuple[int, ...], dest: torch.Tensor) -> torch.Tensor:
        """Rows first.. of a fused [E, ...] tensor into `dest`, straight from the file if dtypes match;
        the rows as the file holds them (`dest` itself when no conversion was needed)."""
        self.reader.check_shape(name, shape)
        if self.reader.entry(name).dtype == dest.dtype:
            self.reader.read_into(name, dest, first)
            return dest
        raw = self.reader.rows(name, first, first + dest.shape[0], shape)
        dest.copy_(raw)
        return raw

    def _fill(self, name: str, dest: torch.Tensor) -> torch.Tensor:
        """Read a tensor into `dest`, straight from the file when no dtype conversion is needed; the
        tensor as the file holds it (`dest` itself when no conversion was needed)."""
        if self.reader.entry(name).dtype == dest.dtype:
            self.reader.check_shape(name, tuple(dest.shape))
            self.reader.read_into(name, dest)
            return dest
        raw = self.reader.tensor(name, tuple(dest.shape))
        dest.copy_(raw)
        return raw
