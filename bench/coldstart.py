"""Cold-start time of an expert block, from disk and from the host tier, against the floor.

    python bench/coldstart.py                 # Qwen1.5-MoE-A2.7B-shaped blocks, bf16, cpu
    python bench/coldstart.py --device cuda   # adds the pinned host-to-device copy floor

Runs the worker's own `ExpertStore` (the code a cold invoke runs). Disk: the block's shard
pages are dropped from the page cache first (fsync + POSIX_FADV_DONTNEED; noted when that is
not possible), then the block is loaded; the floor is the same byte ranges read with plain
sequential preads into one buffer, also from a cold cache. Host tier: the block is evicted
(it drops to host RAM) and loaded again; the floor is a copy of the same bytes (a pinned
host-to-device copy on CUDA). Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import checkpoint  # noqa: E402
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout  # noqa: E402
from faasmoe.model.config import MoEConfig  # noqa: E402
from runtime import protocol as p  # noqa: E402
from runtime.policies import make_eviction, make_keep_alive  # noqa: E402
from tests.pagecache import drop_page_cache, page_cache_bytes  # noqa: E402
from worker.memory import ExpertStore, HostCache  # noqa: E402


def drop_cache(files: set[Path]) -> bool:
    """Evict the files from the page cache; False if the OS would not."""
    for file in files:
        drop_page_cache(file)
    return all(page_cache_bytes(file) == 0 for file in files)


def block_ranges(path: Path, config: MoEConfig, layer: int, first: int, count: int) -> list[tuple[Path, int, int]]:
    """(file, offset, length) of every tensor byte range the block needs."""
    reader = CheckpointReader(path)
    layout = ExpertLayout(reader, config)
    prefix = layout.moe_prefix(layer)
    ranges = []
    fused = f"{prefix}.experts.gate_up_proj"
    if reader.has(fused):
        for name in (fused, f"{prefix}.experts.down_proj"):
            e = reader.entry(name)
            ranges.append((e.file, e.offset + first * e.row_bytes, count * e.row_bytes))
        return ranges
    for expert in range(first, first + count):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            e = reader.entry(f"{prefix}.experts.{expert}.{proj}.weight")
            ranges.append((e.file, e.offset, e.row_bytes * e.shape[0]))
    return ranges


def plain_read(ranges: list[tuple[Path, int, int]]) -> float:
    total = sum(n for _, _, n in ranges)
    buffer = bytearray(total)
    view = memoryview(buffer)
    start = time.perf_counter()
    at = 0
    fds: dict[Path, int] = {}
    for file, offset, n in sorted(ranges, key=lambda r: (str(r[0]), r[1])):
        fd = fds.setdefault(file, os.open(file, os.O_RDONLY))
        done = 0
        while done < n:
            done += os.preadv(fd, [view[at + done:at + n]], offset + done)
        at += n
    elapsed = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    return elapsed


def copy_floor(nbytes: int, device: torch.device) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)  # warm
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


async def measure(path: Path, device: torch.device, block: int, dtype: str, reps: int) -> dict:
    config = MoEConfig.from_pretrained(path)
    layer = config.moe_layers[0]
    keep = make_keep_alive("fixed", ttl_s=3600.0)
    store = ExpertStore(device, 64 << 30, HostCache(64 << 30, pin=device.type == "cuda"), make_eviction("lru"),
                        lambda spec: keep)
    disk, host, floor_disk, floor_host = [], [], [], []
    droppable = True
    nbytes = 0
    for rep in range(reps):
        first = (rep * block) % (config.num_experts - block + 1)
        spec = p.FunctionSpec(f"cold/{layer}/{rep}", str(path), layer, first, block, dtype)
        ranges = block_ranges(path, config, layer, first, block)
        files = {f for f, _, _ in ranges}
        droppable &= drop_cache(files)
        floor_disk.append(plain_read(ranges))
        droppable &= drop_cache(files)
        start = time.perf_counter()
        resident, _ = await store.acquire(spec)
        disk.append(time.perf_counter() - start)
        store.release(resident)
        nbytes = resident.nbytes
        store.evict(spec.function_id, "bench")
        start = time.perf_counter()
        resident, _ = await store.acquire(spec)
        host.append(time.perf_counter() - start)
        assert resident.source == "host"
        store.release(resident)
        store.evict(spec.function_id, "bench")
        store.host.take(spec.function_id)
        floor_host.append(copy_floor(nbytes, device))
    med = statistics.median
    return dict(block_experts=block, block_bytes=nbytes, page_cache_dropped=droppable,
                disk_ms=med(disk) * 1e3, disk_floor_ms=med(floor_disk) * 1e3, disk_ratio=med(disk) / med(floor_disk),
                host_ms=med(host) * 1e3, host_floor_ms=med(floor_host) * 1e3,
                host_ratio=med(host) / max(med(floor_host), 1e-9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--blocks", default="1,4,20", help="experts per function to measure")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "coldstart.json"))
    args = parser.parse_args()
    if args.quick:
        args.reps, args.blocks = 3, "4"
    path = checkpoint(args)
    device = torch.device(args.device)
    rows = [asyncio.run(measure(path, device, int(b), args.dtype, args.reps)) for b in args.blocks.split(",")]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}"
    print(f"\nCold start of Qwen1.5-MoE-shaped expert blocks ({args.dtype}), median of {args.reps} ({machine})")
    print("| experts/block | MiB | disk ms | plain read ms | disk/floor | host tier ms | copy floor ms | host/floor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block_experts']} | {r['block_bytes'] / 2**20:.1f} | {r['disk_ms']:.1f} | {r['disk_floor_ms']:.1f} "
              f"| {r['disk_ratio']:.2f}x | {r['host_ms']:.2f} | {r['host_floor_ms']:.2f} | {r['host_ratio']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
