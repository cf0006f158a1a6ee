"""Cost of one per-layer round trip to a worker, against the same expert compute in process.

    python bench/dispatch.py            # 16 tokens x top-4 over 4 functions, hidden 2048, bf16
    python bench/dispatch.py --quick    # fewer iterations
    python bench/dispatch.py --paths ring,shm   # only these: socket (tensors in the frames), shm (tensors in
                                                # shared memory, the socket the doorbell), ring (runtime.ring),
                                                # ring-sync (the ring called from a thread, futex wakeups),
                                                # ring-spin / ring-sync-spin (those with polling, --spin-us)

A real `faasmoe scheduler` and real `faasmoe worker join` processes (on a Unix socket, with
and without the per-frame HMAC that TCP links always carry, and on TCP loopback) serve
Qwen1.5-MoE-shaped expert blocks; this process is the frontend. Each iteration sends one
layer's calls (one message to one worker) and waits for the outputs. Each link runs with the
tensors in the frames (the socket path), through shared memory (`runtime.shm`, the socket only as
doorbell) and through the call ring (`runtime.ring`: shared memory, a pipe as doorbell, served on the
worker's ring thread; ring-sync: called from a thread off the event loop, as the frontend's compute thread
does between trunk halves, the reply a futex wakeup), alternating A B C A B C for `--rounds` rounds, each
in a fresh pair of processes.
The in-process baseline runs the same blocks on the same rows here. Overhead = round trip minus
the worker-side compute time, p50 and p99. Prints a table (with the load average seen at the
start and end of each run), writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from faasmoe.engine.functions import block_content_at  # noqa: E402
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout  # noqa: E402
from faasmoe.model.config import MoEConfig  # noqa: E402
from faasmoe.model.experts import ExpertBlock  # noqa: E402
from runtime import protocol as p  # noqa: E402
from runtime.client import FunctionCall, InvokeMeter, RuntimeClient  # noqa: E402
from runtime.ring import SPIN_ENV  # noqa: E402
from runtime.transport import MAC_UNIX_SOCKETS_ENV  # noqa: E402
from tests.processes import faasmoe, free_port  # noqa: E402

TOKEN = "bench-dispatch"
DOORBELL_BYTES = 200  # an invoke or result whose tensors are in shared memory, with its framing
SPIN_US = 200  # *-spin paths: poll this long (--spin-us; longer than this loop's turnaround)
FLUSH_MIB = 64  # more than the caches: what 4 expert blocks of Qwen1.5-MoE stream per call


def checkpoint(args: argparse.Namespace) -> Path:
    for candidate in (args.model_dir, ROOT / "models" / "bench-qwen1.5-moe-a2.7b-2l",
                      ROOT / "models" / "bench-qwen1.5-moe-a2.7b-1l"):
        if candidate and (Path(candidate) / "config.json").exists():
            return Path(candidate)
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    path = ROOT / "models" / "bench-qwen1.5-moe-a2.7b-1l"
    print(f"building a 1-layer Qwen1.5-MoE-A2.7B-shaped checkpoint in {path} ...", flush=True)
    return init_checkpoint(path, "qwen2_moe", preset="qwen1.5-moe-a2.7b", layers=1, dtype="bfloat16")


def make_calls(path: Path, tokens: int, top_k: int, functions: int, block: int, dtype: str) -> list[FunctionCall]:
    config = MoEConfig.from_pretrained(path)
    layer = config.moe_layers[0]
    g = torch.Generator().manual_seed(0)
    rows = tokens * top_k // functions
    calls = []
    for f in range(functions):
        spec = p.FunctionSpec(f"bench/{layer}/{f}", str(path), layer, f * block, block, dtype,
                              block * config.expert_bytes(getattr(torch, dtype)), "", 3600.0,
                              content=block_content_at(path, layer, f * block, block, dtype))
        x = torch.randn(rows, config.hidden_size, generator=g).to(getattr(torch, dtype))
        calls.append(FunctionCall(spec, x, torch.randint(0, block, (rows,), generator=g)))
    return calls


def in_process(path: Path, calls: list[FunctionCall], iterations: int) -> list[float]:
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


async def remote(scheduler: str, calls: list[FunctionCall], iterations: int,
                 path: str) -> tuple[list[float], list[float]]:
    """Round-trip times, and the same minus the worker's own compute time (the dispatch overhead)."""
    use_shm = path != "socket"
    ringed = path.startswith("ring")
    client = await RuntimeClient(scheduler, TOKEN, shm_slots=None if use_shm else 0, call_ring=ringed).start()
    while not client.workers:
        await asyncio.sleep(0.05)
    times, overheads = [], []

    for _ in range(20):  # the first calls load the blocks: warm-up
        await client.invoke(calls)

    loop = asyncio.get_running_loop()
    declined = 0

    def run_in_thread() -> None:  # the event loop idle meanwhile, as during a frontend's step
        nonlocal declined
        for _ in range(iterations):
            meter = InvokeMeter()
            start = time.perf_counter()
            if client.invoke_warm(calls, meter) is None:  # the engine would send it through the loop: so here
                declined += 1
                asyncio.run_coroutine_threadsafe(client.invoke(calls), loop).result()
                continue
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            overheads.append(elapsed - meter.compute_s)

    if path.startswith("ring-sync"):
        await loop.run_in_executor(None, run_in_thread)
        if declined:
            print(f"{path}: {declined} of {iterations} calls declined by the synchronous path (sent through the "
                  f"event loop, not timed)", flush=True)
    else:
        for _ in range(iterations):
            meter = InvokeMeter()
            start = time.perf_counter()
            await client.invoke(calls, meter)
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            overheads.append(elapsed - meter.compute_s)
    assert client.stats.messages == iterations + 20, "one message per layer per worker"
    assert client.stats.shm_messages == (iterations + 20 if use_shm else 0), "shared memory used as asked"
    assert client.stats.ring_messages >= (iterations + 19 - declined if ringed else 0), "the ring used as asked"
    await client.close()
    return times, overheads


def measure_transport(listen: str, calls: list[FunctionCall], iterations: int, mac_unix: bool = False,
                      path: str = "socket", spin_us: int = SPIN_US) -> tuple[list[float], list[float]]:
    """A scheduler and one worker serving on `listen`; this process is the frontend.

    `mac_unix`: Unix-socket frames carry the HMAC too (both ends), to measure what it costs.
    `path`: socket (tensors in the frames), shm (tensors in shared memory, the socket carries the
    message), ring (shared memory, a pipe as doorbell, no message), ring-spin (the worker's ring
    thread polls for `spin_us` after each call before it blocks), ring-sync (the ring called from a
    thread, the reply a futex wakeup) or ring-sync-spin (that, both ends polling for `spin_us`).
    """
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", MAC_UNIX_SOCKETS_ENV: "1" if mac_unix else "0",
           SPIN_ENV: str(spin_us if path.endswith("-spin") else 0)}
    os.environ[SPIN_ENV] = env[SPIN_ENV]  # ring-sync-spin: this process's synchronous calls poll too
    os.environ[MAC_UNIX_SOCKETS_ENV] = env[MAC_UNIX_SOCKETS_ENV]  # this process's end of the link
    sched = faasmoe("scheduler", "--listen", f"127.0.0.1:{port}", "--token", TOKEN, "--workers", "0", env=env)
    worker = None
    try:
        sched.wait_for("scheduler listening")
        worker = faasmoe("worker", "join", f"127.0.0.1:{port}", "--token", TOKEN, "--id", "bench", "--device",
                         "cpu", "--memory", "8GiB", "--listen", listen, env=env)
        worker.wait_for("listening at")
        return uvloop.run(remote(f"127.0.0.1:{port}", calls, iterations, path))
    finally:
        if worker is not None:
            worker.stop()
        sched.stop()


ECHO_SERVER = r"""
import asyncio, struct, sys, time, uvloop
flush = None
if int(sys.argv[2]):  # touch this many MiB on every core before each reply, as an expert call streams its weights
    import os, torch
    from concurrent.futures import ThreadPoolExecutor
    torch.set_num_threads(1)
    cores = ThreadPoolExecutor(os.cpu_count())
    parts = torch.empty(int(sys.argv[2]) << 20, dtype=torch.uint8).chunk(os.cpu_count())
    flush = lambda: list(cores.map(lambda part: part.add_(1), parts))
async def handle(r, w):
    while True:
        try:
            n = int.from_bytes(await r.readexactly(4), "big")
            data = await r.readexactly(n)
        except asyncio.IncompleteReadError:
            return
        start = time.perf_counter()
        if flush is not None:
            flush()
        w.write((n + 8).to_bytes(4, "big") + struct.pack("<d", time.perf_counter() - start) + data)
async def main():
    server = await asyncio.start_unix_server(handle, sys.argv[1])
    print("ready", flush=True)
    await server.serve_forever()
uvloop.run(main())
"""


def echo_floor(sock: Path, request_bytes: int, reply_bytes: int, iterations: int, flush_mib: int = 0) -> list[float]:
    """The same bytes through a bare uvloop echo process: what any Python design pays here. With
    `flush_mib`, the echo first touches that much memory (its time is not counted), so both ends run
    with caches as cold as after an expert call."""
    import subprocess

    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(sock), str(flush_mib)], stdout=subprocess.PIPE,
                              text=True)
    server.stdout.readline()

    async def run() -> list[float]:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        payload = os.urandom(max(request_bytes, reply_bytes))
        times = []
        for i in range(iterations + 20):
            start = time.perf_counter()
            writer.write(len(payload).to_bytes(4, "big") + payload)
            await writer.drain()
            reply = await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
            if i >= 20:
                times.append(time.perf_counter() - start - struct.unpack_from("<d", reply)[0])
        writer.close()
        return times

    try:
        return uvloop.run(run())
    finally:
        server.kill()


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
    parser.add_argument("--paths", default="socket,shm,ring",
                        help="comma list of: socket, shm (the socket as doorbell), ring (runtime.ring), ring-sync "
                        "(called from a thread), ring-spin and ring-sync-spin (those with polling for --spin-us); "
                        "default: socket,shm,ring")
    parser.add_argument("--spin-us", type=int, default=SPIN_US, help="how long the *-spin paths poll (µs)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the paths (A B C A B C)")
    parser.add_argument("--links", default="unix,unix+mac,tcp", help="which links: unix, unix+mac, tcp (comma-separated)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dispatch.json"))
    args = parser.parse_args()
    if args.quick:
        args.iterations = 300
    torch.set_num_threads(1)  # the worker computes with one thread too: same work on both sides
    path = checkpoint(args)
    calls = make_calls(path, args.tokens, args.top_k, args.functions, args.block, args.dtype)

    sock = Path(tempfile.mkdtemp(prefix="faasmoe-bench-")) / "w.sock"
    links = {"unix": (f"unix:{sock}", False), "unix+mac": (f"unix:{sock}", True), "tcp": ("127.0.0.1:0", False)}
    names = {"unix": "unix", "unix+mac": "unix + frame HMAC", "tcp": "tcp (frame HMAC)"}
    chosen = [name.strip() for name in args.links.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in links]
    if unknown:
        parser.error(f"--links: unknown {', '.join(unknown)} (choose from {', '.join(links)})")
    modes = [m.strip() for m in args.paths.split(",") if m.strip()]
    if any(m not in ("socket", "shm", "ring", "ring-spin", "ring-sync", "ring-sync-spin") for m in modes):
        parser.error(f"--paths: choose from socket, shm, ring, ring-spin, ring-sync, ring-sync-spin (got {args.paths})")
    rows = []
    local = in_process(path, calls, args.iterations)
    rows.append(dict(path="in-process", p50_us=statistics.median(local) * 1e6, p99_us=pct(local, 99) * 1e6,
                     overhead_p50_us=0.0, overhead_p99_us=0.0, load=os.getloadavg()[0]))
    for round_ in range(args.rounds):
        for link in chosen:
            listen, mac = links[link]
            for mode in modes:  # A B C A B C: a drift in the machine's load hits all alike
                if mode.startswith("ring") and link != "unix":
                    continue  # the ring never touches the socket: one link tells it all
                load_before = os.getloadavg()[0]
                times, overheads = measure_transport(listen, calls, args.iterations, mac_unix=mac, path=mode,
                                                     spin_us=args.spin_us)
                suffix = {"socket": "", "shm": " + shm", "ring": " + shm, call ring",
                          "ring-spin": f" + shm, call ring polled {args.spin_us} µs",
                          "ring-sync": " + shm, call ring from a thread (futex)",
                          "ring-sync-spin": f" + shm, call ring from a thread, both ends polled {args.spin_us} µs"}[mode]
                rows.append(dict(path=names[link] + suffix, round=round_ + 1,
                                 p50_us=statistics.median(times) * 1e6, p99_us=pct(times, 99) * 1e6,
                                 overhead_p50_us=statistics.median(overheads) * 1e6,
                                 overhead_p99_us=pct(overheads, 99) * 1e6,
                                 load=f"{load_before:.2f}-{os.getloadavg()[0]:.2f}"))
    frame = sum(c.x.nbytes for c in calls)
    floors = {"bare uvloop echo, same bytes (floor)": (frame, 0),
              f"bare uvloop echo, a {DOORBELL_BYTES}-byte doorbell (shm floor)": (DOORBELL_BYTES, 0),
              f"the doorbell echo after touching {FLUSH_MIB} MiB (cold caches, as after an expert call)":
                  (DOORBELL_BYTES, FLUSH_MIB)}
    for name, (nbytes, flush_mib) in floors.items():
        floor = echo_floor(sock.parent / "echo.sock", nbytes, nbytes, args.iterations, flush_mib)
        rows.append(dict(path=name, p50_us=statistics.median(floor) * 1e6, p99_us=pct(floor, 99) * 1e6,
                         overhead_p50_us=statistics.median(floor) * 1e6, overhead_p99_us=pct(floor, 99) * 1e6,
                         load=os.getloadavg()[0]))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    rows_per_call = args.tokens * args.top_k // args.functions
    print(f"\nOne layer's round trip: {args.functions} functions x {rows_per_call} rows, hidden "
          f"{calls[0].x.shape[1]}, {args.dtype}, {args.iterations} iterations ({machine})")
    print("overhead = round trip - the worker's expert compute time (serialisation, sockets, event loops, thread hop)")
    print("| path | round | round trip p50 µs | p99 µs | overhead p50 µs | overhead p99 µs | load avg |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        load = r["load"] if isinstance(r["load"], str) else f"{r['load']:.2f}"
        print(f"| {r['path']} | {r.get('round', '')} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | "
              f"{r['overhead_p50_us']:.0f} | {r['overhead_p99_us']:.0f} | {load} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine, args=vars(args), rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
