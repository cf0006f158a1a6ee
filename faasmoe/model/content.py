"""Content digests of checkpoint tensors: what names an expert function, and what every load proves.

Each tensor of a safetensors file is hashed (BLAKE3) in *pieces*: the whole tensor, or for a fused
expert tensor [E, ...] each expert's slice, a fused gate_up row split into its gate and up halves.
So a block's digest is the same whichever on-disk layout holds its experts (per-expert or fused), and
it covers every byte, with shapes, the checkpoint dtype and the dtype it is served in: the same bytes in
two checkpoints (two tenants' fine-tunes of one base) name one function, a byte changed anywhere names
another. Hashing reads each file once; the digests are cached on disk, keyed by the file's identity
(path, device, inode, size, mtime), so a restart or a second frontend pays a stat, not a read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3
import torch

log = logging.getLogger(__name__)

DIGEST_VERSION = 2  # bump when the piece rule or the block formula changes: old caches are ignored
BLOCK_DIGEST_HEX = 40  # 160 bits: a collision takes ~2^80 hashes, out of a tenant's reach
_READ_CHUNK = 16 << 20
# BLAKE3 splits one update over the cores from here up (smaller ones are not worth waking threads for).
_PARALLEL_FROM = 1 << 20


class ContentMismatch(ValueError):
    """Bytes read for a function or tensor whose hash is not the one it is named by."""


def pieces_of(name: str, shape: tuple[int, ...]) -> int:
    """How many equal, contiguous pieces a tensor is hashed in: one per expert (gate and up halves
    apart) for a fused expert tensor, one per expert for fused FP8 experts' scales, else one."""
    if len(shape) == 3 and name.endswith("experts.gate_up_proj"):
        return 2 * shape[0]
    if len(shape) == 3 and name.endswith(("experts.down_proj", "experts.gate_up_proj_scale_inv",
                                          "experts.down_proj_scale_inv")):
        return shape[0]
    return 1


def hash_bytes(data: memoryview | bytes | bytearray) -> str:
    """The hex BLAKE3 digest of a buffer, over every core for big ones."""
    threads = blake3.blake3.AUTO if len(data) >= _PARALLEL_FROM else 1
    return blake3.blake3(data, max_threads=threads).hexdigest()


def hash_tensor(t: torch.Tensor) -> str:
    """The digest of a CPU tensor's bytes, as they lie in a checkpoint file (C order)."""
    flat = t.detach().contiguous().reshape(-1)
    return hash_bytes(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"")


@dataclass(frozen=True)
class PartDigest:
    """One part of an expert block (gate, up or down of one expert) as the block digest sees it."""

    dtype: torch.dtype  # in the checkpoint
    shape: tuple[int, ...]
    digest: str


def block_digest(served_dtype: torch.dtype, count: int, parts: Iterable[PartDigest], scheme: str = "") -> str:
    """The name of an expert block: its parts (each expert's gate, up, down in order), the dtype it is
    served in and, for quantized parts, the scheme that gives their bytes a meaning. Neither the model
    nor the layer enters: identical bytes are one function."""
    head = f"faasmoe.expert-block.v{DIGEST_VERSION}|{served_dtype}|{count}" + (f"|{scheme}" if scheme else "")
    h = blake3.blake3(head.encode())
    for part in parts:
        h.update(f"|{part.dtype}|{list(part.shape)}|{part.digest}".encode())
    return h.hexdigest()[:BLOCK_DIGEST_HEX]


# Where a block was read from: (checkpoint, layer, first expert, count) and its files' identities.
BlockSource = tuple[str, int, int, int, tuple["FileIdentity", ...]]


class ProvenBlocks:
    """Blocks a worker has hashed and found right, by the content they proved and where they were read
    from, files' identities included. Reading the same place again from files with the same identities
    needs no second hash; a file written to since (its ctime moved) or replaced is hashed again; another
    place claiming the same content is hashed too. Bounded: the oldest proofs are forgotten first."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._proofs: OrderedDict[tuple[str, BlockSource], None] = OrderedDict()
        self._lock = threading.Lock()  # loads read (and ask) from several threads
        self.reused = 0  # loads that an earlier hash proved

    def proven(self, content: str, source: BlockSource) -> bool:
        key = (content, source)
        with self._lock:
            if key in self._proofs:
                self._proofs.move_to_end(key)
                self.reused += 1
                return True
            return False

    def add(self, content: str, source: BlockSource) -> None:
        with self._lock:
            self._proofs[(content, source)] = None
            self._proofs.move_to_end((content, source))
            while len(self._proofs) > self.capacity:
                self._proofs.popitem(last=False)


class PartHasher:
    """Hashes a block's parts on a helper thread while the loader reads the next ones: a cold load
    then takes about as long as its read alone (the disk is slower than BLAKE3)."""

    def __init__(self) -> None:
        self._pending: dict[int, Future[PartDigest]] = {}

    def add(self, index: int, raw: torch.Tensor) -> None:
        """Part `index` (its place in the block digest's order), as the file holds it; kept until hashed."""
        self._pending[index] = _hash_pool().submit(_part_digest, raw)

    def parts(self) -> list[PartDigest]:
        return [self._pending[i].result() for i in sorted(self._pending)]


def _part_digest(raw: torch.Tensor) -> PartDigest:
    return PartDigest(raw.dtype, tuple(raw.shape), hash_tensor(raw))


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:  # a few loads hash at once; BLAKE3 spreads a big part over the cores itself
            _pool = ThreadPoolExecutor(max(1, min(4, (os.cpu_count() or 2) - 1)), "faasmoe-hash")
        return _pool


def scoped_function_id(content: str, scope: str) -> str:
    """The id of a function that must not be shared (a model with `dedupe = false`): its content
    digest bound to the model it belongs to."""
    return blake3.blake3(f"{content}|{scope}".encode()).hexdigest()[:BLOCK_DIGEST_HEX]


# --- per-file digests, cached ------------------------------------------------------------


# Resolved path, device, inode, size, mtime and ctime (ns). Any write to the file, or a utime that puts
# its mtime back, moves its ctime, which no user can set: the same identity means the same bytes.
FileIdentity = tuple[str, int, int, int, int, int]


def file_identity(file: Path, fd: int | None = None) -> FileIdentity:
    """The identity of `file` (of the file open as `fd`, when given: what a reader reads, even after the
    name was renamed over)."""
    st = os.fstat(fd) if fd is not None else os.stat(file)
    return (str(Path(file).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def cache_dir() -> Path:
    """Where digests are kept: $FAASMOE_CACHE_DIR, else $XDG_CACHE_HOME/faasmoe, else ~/.cache/faasmoe."""
    explicit = os.environ.get("FAASMOE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "faasmoe"


class DigestCache:
    """Piece digests of checkpoint files, in memory and under `cache_dir()/digests`, by file identity."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = (directory or cache_dir()) / "digests"
        self._memo: dict[FileIdentity, dict[str, list[str]]] = {}
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # read and hashed by this process (cache misses)

    def file(self, file: Path, entries: dict) -> tuple[FileIdentity, dict[str, list[str]]]:
        """The file's identity and, per tensor name, its pieces' digests, for one safetensors file whose
        header `entries` (name -> TensorEntry) are given: cached, else hashed now."""
        identity = file_identity(file)
        with self._lock:
            if identity in self._memo:
                return identity, self._memo[identity]
            pieces = self._read_cached(identity)
            if pieces is None:
                log.info("hashing %s (%.2f GB): its first deploy reads it once; the digests are cached in %s",
                         file, identity[3] / 1e9, self.directory)
                pieces = hash_file(file, entries)
                self.hashed_bytes += identity[3]
                if file_identity(file) != identity:  # written to while we read it: trust nothing of it
                    raise ContentMismatch(f"{file} changed while it was being hashed; deploy it again")
                self._write_cached(identity, pieces)
            self._memo[identity] = pieces
            return identity, pieces

    def _path(self, identity: FileIdentity) -> Path:
        return self.directory / f"{blake3.blake3(identity[0].encode()).hexdigest()[:32]}.json"

    def _read_cached(self, identity: FileIdentity) -> dict[str, list[str]] | None:
        try:
            saved = json.loads(self._path(identity).read_text())
        except (OSError, ValueError):
            return None
        if saved.get("version") != DIGEST_VERSION or tuple(saved.get("identity", ())) != identity:
            return None  # another version of the file (or of the rule) was hashed there
        return saved["pieces"]

    def _write_cached(self, identity: FileIdentity, pieces: dict[str, list[str]]) -> None:
        path = self._path(identity)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": DIGEST_VERSION, "identity": list(identity), "pieces": pieces}))
            os.replace(tmp, path)  # readers see the old entry or the new one, never half of one
        except OSError as exc:  # a read-only home: hash again next time, serve anyway
            log.warning("could not cache the digests of %s in %s: %s", identity[0], path.parent, exc)


def hash_file(file: Path, header: dict) -> dict[str, list[str]]:
    """Read a safetensors file once, front to back, and hash every tensor of its `header` (name ->
    TensorEntry) in its pieces."""
    entries = sorted(header.items(), key=lambda item: item[1].offset)
    out: dict[str, list[str]] = {}
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    fd = os.open(file, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for name, entry in entries:
            nbytes = entry.nbytes
            count = pieces_of(name, entry.shape)
            size = nbytes // count
            digests = []
            for i in range(count):
                h = blake3.blake3(max_threads=blake3.blake3.AUTO)
                at, end = entry.offset + i * size, entry.offset + (i + 1) * size
                while at < end:
                    n = os.preadv(fd, [view[: min(_READ_CHUNK, end - at)]], at)
                    if n <= 0:
                        raise ContentMismatch(f"{file}: short read of tensor {name!r} (file truncated?)")
                    h.update(view[:n])
                    at += n
                digests.append(h.hexdigest())
            out[name] = digests
    finally:
        os.close(fd)
    return out


class CheckpointDigests:
    """The piece digests of every tensor of one checkpoint (all its shard files)."""

    def __init__(self, entries: dict, cache: DigestCache) -> None:
        """`entries`: tensor name -> TensorEntry, over every file of the checkpoint."""
        by_file: dict[Path, dict] = {}
        for name, entry in entries.items():
            by_file.setdefault(entry.file, {})[name] = entry
        hashed = {file: cache.file(file, header) for file, header in sorted(by_file.items())}
        self._identity = {file: identity for file, (identity, _) in hashed.items()}
        self._by_file = {file: pieces for file, (_, pieces) in hashed.items()}
        self._file_of = {name: entry.file for name, entry in entries.items()}

    def hashed_as(self, file: Path, identity: FileIdentity) -> bool:
        """Whether `file`, as `identity` says it is now, is the very file these digests were made from
        (not written to since: its ctime would have moved): what is read from it needs no second hash."""
        return self._identity.get(file) == identity

    @classmethod
    def of(cls, reader, cache: DigestCache | None = None) -> CheckpointDigests:
        """Digests of the checkpoint a CheckpointReader opened (hashing what no cache has)."""
        return cls({name: reader.entry(name) for name in reader.names()}, cache or DigestCache())

    def piece(self, name: str, index: int = 0) -> str:
        return self._by_file[self._file_of[name]][name][index]

    def tensor(self, name: str) -> str:
        """One digest for a whole tensor (a fused one: over its pieces' digests)."""
        pieces = self._by_file[self._file_of[name]][name]
        return pieces[0] if len(pieces) == 1 else blake3.blake3("|".join(pieces).encode()).hexdigest()
