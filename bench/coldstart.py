"""Cold start of expert blocks, and of a whole cold model's first request, against the read floor.

    python bench/coldstart.py                 # Qwen1.5-MoE-A2.7B-shaped blocks, bf16, cpu
    python bench/coldstart.py --device cuda   # adds the pinned host-to-device copy floor
    python bench/coldstart.py --model         # a cold 4-layer model's TTFT: pipeline on / next layer only / off

Blocks: runs the worker's own `ExpertStore` (the code a cold invoke runs). Disk: the block's shard
pages are dropped from the page cache first (fsync + POSIX_FADV_DONTNEED; noted when that is
not possible), then the block is loaded; the floor is the same byte ranges read with plain
sequential preads into one buffer, also from a cold cache. Host tier: the block is evicted
(it drops to host RAM) and loaded again; the floor is a copy of the same bytes (a pinned
host-to-device copy on CUDA).

--model: a real scheduler and worker process, the serving engine in this process (its trunk stays
loaded; only the experts scale to zero). Each run evicts every block and drops the checkpoint from
the page cache, times one request's first token (cold), then the same request warm (median of 3).
The floor is the bytes of the blocks the request touched over the read bandwidth, measured right
before the run with several parallel reads of the cold checkpoint (the best of 2, 4, 8 readers),
plus the warm TTFT; the goal is cold TTFT <= 1.3 x floor. Modes alternate run by run: `pipeline`
(a starting step pre-gates every later layer), `next` (only the next layer, as before) and `off`.

Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import checkpoint  # noqa: E402
from faasmoe.engine.deployments import Deployment, DeploymentSpec  # noqa: E402
from faasmoe.engine.executors import RemoteExpertExecutor, StepCost  # noqa: E402
from faasmoe.engine.functions import block_content_at  # noqa: E402
from faasmoe.engine.requests import Finished, GenerationRequest  # noqa: E402
from faasmoe.engine.sampling import SamplingParams  # noqa: E402
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout  # noqa: E402
from faasmoe.model.config import MoEConfig  # noqa: E402
from runtime import protocol as p  # noqa: E402
from runtime.client import RuntimeClient  # noqa: E402
from runtime.policies import make_eviction, make_keep_alive  # noqa: E402
from tests.pagecache import drop_page_cache, page_cache_bytes  # noqa: E402
from tests.processes import faasmoe, free_port  # noqa: E402
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
        spec = p.FunctionSpec(f"cold/{layer}/{rep}", str(path), layer, first, block, dtype,
                              content=block_content_at(path, layer, first, block, dtype))
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


# -- a whole cold model's first request --------------------------------------------------------

TOKEN = "bench-coldstart"
MODES = {"pipeline": None, "next": 1, "off": 0}  # ModelEngine.prefetch_depth; 0 = no prefetch
GOAL = 1.3


def model_checkpoint(args: argparse.Namespace) -> Path:
    path = Path(args.model_dir) if args.model_dir else ROOT / "models" / f"bench-qwen1.5-moe-a2.7b-{args.layers}l"
    if not (path / "config.json").exists():
        from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

        print(f"building a {args.layers}-layer Qwen1.5-MoE-A2.7B-shaped checkpoint in {path} ...", flush=True)
        init_checkpoint(path, "qwen2_moe", preset="qwen1.5-moe-a2.7b", layers=args.layers, dtype="bfloat16")
    return path


def parallel_read(file: Path, readers: int, nbytes: int, chunk: int = 6 << 20) -> float:
    """Bytes/s of `readers` threads reading the first `nbytes` of `file` in `chunk`-sized preads
    (about one expert tensor each, as a block load reads them)."""
    fd = os.open(file, os.O_RDONLY)
    offsets = list(range(0, nbytes, chunk))

    def read(i: int) -> None:
        view = memoryview(bytearray(chunk))
        for offset in offsets[i::readers]:
            n, done = min(chunk, nbytes - offset), 0
            while done < n:
                done += os.preadv(fd, [view[done:n]], offset + done)

    start = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(read, range(readers)))
    elapsed = time.perf_counter() - start
    os.close(fd)
    return nbytes / elapsed


def read_bandwidth(files: set[Path], cold: bool = True, readers: tuple[int, ...] = (2, 4, 8),
                   nbytes: int = 1 << 30) -> dict[int, float]:
    """The read bandwidth of the checkpoint's largest file with each number of parallel readers; cold:
    from the disk (and the checkpoint is left out of the page cache), else from the page cache (and
    every file of the checkpoint is left in it)."""
    largest = max(files, key=lambda f: f.stat().st_size)
    if not cold:
        for file in files:
            parallel_read(file, 4, file.stat().st_size)
    out = {}
    for n in readers:
        if cold:
            drop_cache(files)
        out[n] = parallel_read(largest, n, min(nbytes, largest.stat().st_size))
    if cold:
        drop_cache(files)
    return out


async def first_token(dep: Deployment, prompt: list[int]) -> tuple[float, Finished]:
    request = GenerationRequest(dep.name, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    dep.engine.submit(request)
    ttft = None
    while not isinstance(event := await request.events.get(), Finished):
        ttft = ttft if ttft is not None else time.perf_counter() - start
    if ttft is None:
        raise RuntimeError(f"the request failed: {event.error}")
    return ttft, event


async def evict_all(client: RuntimeClient, executor: RemoteExpertExecutor) -> None:
    """Every block of the model out of every worker (the scale to zero a long idle time would do)."""
    for spec in executor.functions:
        for wid in list(client.routes.get(spec.function_id, ())):
            channel = await client._channel(wid)
            await channel.request(p.Evict(0, spec.function_id, "bench"), timeout=30)
    async with asyncio.timeout(30):
        while executor.resident_functions():
            await asyncio.sleep(0.05)


async def worker_counters(client: RuntimeClient) -> dict[str, float]:
    """The workers' counters, summed."""
    total: dict[str, float] = {}
    for stats in await client.cluster_state():
        for k, v in stats.counters.items():
            total[k] = total.get(k, 0) + v
    return total


async def packed(client: RuntimeClient, timeout: float = 120.0) -> None:
    """Wait until the workers have packed every block they loaded (they do it when idle)."""
    async with asyncio.timeout(timeout):
        while (await worker_counters(client)).get("blocks_unpacked", 0):
            await asyncio.sleep(0.2)


async def one_model_run(dep: Deployment, client: RuntimeClient, prompt: list[int], mode: str, files: set[Path],
                        costs: list[StepCost], calls: list[tuple[int, float, float]], cold: bool = True) -> dict:
    executor = dep.executor
    engine = dep.engine
    await evict_all(client, executor)
    load = os.getloadavg()[0]
    bandwidth = read_bandwidth(files, cold)  # leaves the checkpoint out of the page cache (cold) or in it
    engine.prefetch, engine.prefetch_depth = MODES[mode] != 0, MODES[mode]
    before = vars(executor.prefetch_stats).copy(), await worker_counters(client)
    costs.clear()
    calls.clear()
    began = time.perf_counter()
    cold_s, finished = await first_token(dep, prompt)
    timeline = [dict(layer=layer, call_s=start - began, done_s=end - began) for layer, start, end in calls]
    touched = sum(c.touched_bytes for c in costs)
    stats = {k: v - before[0][k] for k, v in vars(executor.prefetch_stats).items()}
    await packed(client)  # warm means packed too: the steady state's speed
    after = await worker_counters(client)
    loads = sum(after.get(f"cold_starts_{s}", 0) - before[1].get(f"cold_starts_{s}", 0) for s in ("disk", "host"))
    warm = statistics.median([(await first_token(dep, prompt))[0] for _ in range(3)])
    best = max(bandwidth.values())
    floor = touched / best + warm
    return dict(mode=mode, load=load, touched_bytes=touched, bandwidth={str(k): v for k, v in bandwidth.items()},
                best_bandwidth=best, floor_s=floor, cold_ttft_s=cold_s, warm_ttft_s=warm, ratio=cold_s / floor,
                cold_start_s=finished.usage.cold_start_s, loads=loads, prefetch=stats, layers=timeline)


async def measure_model(args: argparse.Namespace) -> dict:
    path = model_checkpoint(args).resolve()
    files = set(path.glob("*.safetensors"))
    port = free_port()
    sched = faasmoe("scheduler", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--workers", "1",
                    "--device", "cpu", "--worker-memory", args.worker_memory)
    client = None
    try:
        sched.wait_for("scheduler listening at", timeout=60)
        client = await RuntimeClient(f"127.0.0.1:{port}", TOKEN).start()
        async with asyncio.timeout(60):
            while not client.workers:
                await asyncio.sleep(0.05)
        compute = ThreadPoolExecutor(1, thread_name_prefix="trunk")
        spec = DeploymentSpec("bench", path, expert_block_size=args.block, keep_alive_s=3600.0, dtype="bfloat16")
        dep = Deployment(spec, lambda d: RemoteExpertExecutor(client, d.name, path, d.config, d.block_size, d.dtype,
                                                              spec.keep_alive_s), compute)
        costs: list[StepCost] = []
        calls: list[tuple[int, float, float]] = []  # (layer, call sent, answer back) of the cold request
        executor = dep.executor
        take, run_layer = executor.take_step_cost, executor.run_layer
        executor.take_step_cost = lambda: costs.append(take()) or costs[-1]

        async def timed_run_layer(layer, x, routing):
            start = time.perf_counter()
            out = await run_layer(layer, x, routing)
            calls.append((layer, start, time.perf_counter()))
            return out

        executor.run_layer = timed_run_layer
        await asyncio.get_running_loop().run_in_executor(compute, dep.trunk)
        rng = random.Random(0)
        prompt = [rng.randrange(dep.config.vocab_size) for _ in range(args.prompt_tokens)]
        await first_token(dep, prompt)  # connections, kernels, placement: not part of any run
        await packed(client)
        modes = args.modes.split(",")
        runs = []
        for round_ in range(args.rounds):
            for mode in modes:  # A B C A B C: drift in the machine's load hits every mode alike
                row = await one_model_run(dep, client, prompt, mode, files, costs, calls, args.page_cache == "dropped")
                row["round"] = round_
                runs.append(row)
                print(model_row(row), flush=True)
        compute.shutdown()
        return dict(model=str(path), layers=dep.config.num_layers, block=args.block, prompt_tokens=args.prompt_tokens,
                    page_cache=args.page_cache, runs=runs)
    finally:
        if client is not None:
            await client.close()
        sched.stop()
        if args.log:
            Path(args.log).write_text(sched.output)


MODEL_HEADER = ("| round | mode | load | touched GiB | read GB/s (2/4/8 readers) | floor s | cold TTFT s | warm TTFT s "
                "| cold / floor | cold-start s | prefetch issued/used/wasted | loads |\n" + "|---" * 12 + "|")


def model_row(r: dict) -> str:
    bw = "/".join(f"{v / 1e9:.2f}" for v in r["bandwidth"].values())
    f = r["prefetch"]
    return (f"| {r['round']} | {r['mode']} | {r['load']:.2f} | {r['touched_bytes'] / 2**30:.2f} | {bw} | {r['floor_s']:.2f} "
            f"| {r['cold_ttft_s']:.2f} | {r['warm_ttft_s']:.2f} | {r['ratio']:.2f}x | {r['cold_start_s']:.2f} "
            f"| {f['issued']}/{f['used']}/{f['wasted']} | {r['loads']} |")


def model_main(args: argparse.Namespace) -> None:
    print(MODEL_HEADER, flush=True)
    result = asyncio.run(measure_model(args))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\nA cold {result['layers']}-layer Qwen1.5-MoE-A2.7B-shaped model (bf16, blocks of {args.block}), "
          f"{args.prompt_tokens}-token prompt, page cache {args.page_cache}, first token ({machine}); "
          f"goal: cold / floor <= {GOAL}")
    print(MODEL_HEADER)
    for row in result["runs"]:
        print(model_row(row))
    for mode in args.modes.split(","):
        ratios = [r["ratio"] for r in result["runs"] if r["mode"] == mode]
        print(f"{mode}: cold / floor median {statistics.median(ratios):.2f}x over {len(ratios)} runs")
    name = f"coldstart-model-{args.prompt_tokens}t-{args.page_cache}.json"
    out = Path(args.out if args.out != DEFAULT_OUT else ROOT / "bench" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine, goal=GOAL, **result), indent=2))
    print(f"wrote {out}")


DEFAULT_OUT = str(ROOT / "bench" / "results" / "coldstart.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--blocks", default="1,4,20", help="experts per function to measure")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--model", action="store_true", help="a whole cold model's first request (see above)")
    parser.add_argument("--layers", type=int, default=4, help="--model: layers of the checkpoint built when missing")
    parser.add_argument("--block", type=int, default=4, help="--model: experts per function")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="pipeline,next,off")
    parser.add_argument("--worker-memory", default="8GiB")
    parser.add_argument("--log", help="--model: write the scheduler's and worker's log here")
    parser.add_argument("--page-cache", choices=("dropped", "kept"), default="dropped",
                        help="--model: the checkpoint out of the page cache before each cold run (reads from the "
                             "disk), or in it (a CPU worker's scale to zero: the page cache is its host tier)")
    args = parser.parse_args()
    if args.model:
        model_main(args)
        return
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
