"""Cost of one per-layer round trip to a worker, against the same expert compute in process.

    python bench/dispatch.py            # 16 tokens x top-4 over 4 functions, hidden 2048, bf16
    python bench/dispatch.py --quick    # fewer iterations

A real `faasmoe scheduler` and two real `faasmoe worker join` processes (one on a Unix
socket, one on TCP loopback) serve Qwen1.5-MoE-shaped expert blocks; this process is the
frontend. Each iteration sends one layer's calls (one message to one worker) and waits for
the outputs. The in-process baseline runs the same blocks on the same rows here. Overhead =
round trip - in-process compute, p50 and p99. Prints a table, writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from faasmoe.checkpoint import CheckpointReader, ExpertLayout  # noqa: E402
from faasmoe.config import MoEConfig  # noqa: E402
from faasmoe.experts import ExpertBlock  # noqa: E402
from runtime import protocol as p  # noqa: E402
from runtime.client import RuntimeClient  # noqa: E402
from tests.processes import faasmoe, free_port  # noqa: E402

TOKEN = "bench-dispatch"


def checkpoint(args: argparse.Namespace) -> Path:
    for candidate in (args.model_dir, ROOT / "models" / "bench-qwen1.5-moe-a2.7b-2l",
                      ROOT / "models" / "bench-qwen1.5-moe-a2.7b-1l"):
        if candidate and (Path(candidate) / "config.json").exists():
            return Path(candidate)
    from faasmoe.model_init import init_checkpoint

    path = ROOT / "models" / "bench-qwen1.5-moe-a2.7b-1l"
    print(f"building a 1-layer Qwen1.5-MoE-A2.7B-shaped checkpoint in {path} ...", flush=True)
    return init_checkpoint(path, "qwen2_moe", preset="qwen1.5-moe-a2.7b", layers=1, dtype="bfloat16")


def make_calls(path: Path, tokens: int, top_k: int, functions: int, block: int, dtype: str) -> list[p.Call]:
    config = MoEConfig.from_pretrained(path)
    layer = config.moe_layers[0]
    g = torch.Generator().manual_seed(0)
    rows = tokens * top_k // functions
    calls = []
    for f in range(functions):
        spec = p.FunctionSpec(f"bench/{layer}/{f}", str(path), layer, f * block, block, dtype,
                              block * config.expert_bytes(getattr(torch, dtype)), "", 3600.0)
        x = torch.randn(rows, config.hidden_size, generator=g).to(getattr(torch, dtype))
        calls.append(p.Call(spec, x, torch.randint(0, block, (rows,), generator=g)))
    return calls


def in_process(path: Path, calls: list[p.Call], iterations: int) -> list[float]:
    config = MoEConfig.from_pretrained(path)
    layout = ExpertLayout(CheckpointReader(path), config)
    blocks = [ExpertBlock(c.function.layer, c.function.first,
                          layout.load_block(c.function.layer, c.function.first, c.function.count,
                                            getattr(torch, c.function.dtype))) for c in calls]
    times = []
    with torch.inference_mode():
        for i in range(iterations + 20):
            start = time.perf_counter()
            for block, c in zip(blocks, calls):
                block.forward(c.x, c.experts)
            if i >= 20:
                times.append(time.perf_counter() - start)
    return times


async def remote(scheduler: str, calls: list[p.Call], iterations: int) -> list[float]:
    client = await RuntimeClient(scheduler, TOKEN).start()
    while not client.workers:
        await asyncio.sleep(0.05)
    times = []
    for i in range(iterations + 20):  # the first calls load the blocks: warm-up
        start = time.perf_counter()
        await client.invoke(calls)
        if i >= 20:
            times.append(time.perf_counter() - start)
    assert client.stats.messages == iterations + 20, "one message per layer per worker"
    await client.close()
    return times


def measure_transport(listen: str, calls: list[p.Call], iterations: int) -> list[float]:
    """A scheduler and one worker serving on `listen`; this process is the frontend."""
    port = free_port()
    env = {"OMP_NUM_THREADS": "1"}
    sched = faasmoe("scheduler", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--workers", "0", env=env)
    worker = None
    try:
        sched.wait_for("scheduler listening")
        worker = faasmoe("worker", "join", f"127.0.0.1:{port}", "--token", TOKEN, "--id", "bench", "--device",
                         "cpu", "--memory", "8GiB", "--listen", listen, env=env)
        worker.wait_for("listening at")
        return asyncio.run(remote(f"127.0.0.1:{port}", calls, iterations))
    finally:
        if worker is not None:
            worker.stop()
        sched.stop()


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 100 else max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--functions", type=int, default=4)
    parser.add_argument("--block", type=int, default=4, help="experts per function")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dispatch.json"))
    args = parser.parse_args()
    if args.quick:
        args.iterations = 300
    torch.set_num_threads(1)  # the worker computes with one thread too: same work on both sides
    path = checkpoint(args)
    calls = make_calls(path, args.tokens, args.top_k, args.functions, args.block, args.dtype)

    sock = Path(tempfile.mkdtemp(prefix="faasmoe-bench-")) / "w.sock"
    results = {"in-process": in_process(path, calls, args.iterations)}
    results["unix"] = measure_transport(f"unix:{sock}", calls, args.iterations)
    results["tcp"] = measure_transport("127.0.0.1:0", calls, args.iterations)
    local = results["in-process"]

    base_p50 = statistics.median(local)
    rows = []
    for name, times in results.items():
        p50, p99 = statistics.median(times), pct(times, 99)
        rows.append(dict(path=name, p50_us=p50 * 1e6, p99_us=p99 * 1e6,
                         overhead_p50_us=(p50 - base_p50) * 1e6 if name != "in-process" else 0.0))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    rows_per_call = args.tokens * args.top_k // args.functions
    print(f"\nOne layer's round trip: {args.functions} functions x {rows_per_call} rows, hidden "
          f"{calls[0].x.shape[1]}, {args.dtype}, {args.iterations} iterations ({machine})")
    print("| path | p50 µs | p99 µs | overhead p50 µs |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['overhead_p50_us']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine, args=vars(args), rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
