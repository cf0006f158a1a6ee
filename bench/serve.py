"""A bounded load against `faasmoe serve`, against the in-process full model serving the same load.

    python bench/serve.py                      # 2-layer Qwen1.5-MoE-A2.7B shape, 4 clients, 60 s each
    python bench/serve.py --quick              # tiny model, 3 clients, 15 s

Two servers run one after the other on the same checkpoint: `faasmoe serve --experts in-process`
(every expert resident in the frontend process: the baseline) and `faasmoe serve` with expert
functions on a local worker pool, warm (keep-alive infinite, warmed up before measuring).
N concurrent streaming clients send seeded prompts for T seconds. Throughput comes from the
responses' usage; time to first token and inter-token latency from the servers' own per-token
histograms (a random model's tokens often decode to no text, so the client cannot see every
token arrive). Prints a table with the ratios, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import checkpoint  # noqa: E402
from tests.processes import faasmoe, free_port  # noqa: E402


async def one_client(url: str, model: str, seed: int, prompt_len: int, max_tokens: int, until: float,
                     vocab: int, out: dict) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until:
            body = {"model": model, "prompt": [rng.randrange(vocab) for _ in range(prompt_len)],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            async with session.post(url + "/v1/completions", json=body) as response:
                response.raise_for_status()
                usage = await streamed_usage(response)
                out["tokens"] += usage["completion_tokens"] if usage else 0
            out["requests"] += 1


async def streamed_usage(response: aiohttp.ClientResponse) -> dict | None:
    """Read an SSE completion stream to its end; the usage of its last chunk (stream_options.include_usage)."""
    usage = None
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: {") and '"usage"' in line:
            usage = json.loads(line[6:]).get("usage") or usage
    return usage


async def histograms(session: aiohttp.ClientSession, url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of the server's TTFT and inter-token histograms (all labels summed)."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    out: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        for name in ("faasmoe_time_to_first_token_seconds", "faasmoe_inter_token_latency_seconds"):
            if line.startswith(name + "_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                out.setdefault(name, {})
                out[name][bound] = out[name].get(bound, 0.0) + float(line.split()[-1])
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile of the observations between two scrapes (linear within a bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    target, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= target:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (target - below) / max(cumulative - below, 1e-12)
        lower, below = bound, cumulative
    return lower


async def load(url: str, model: str, clients: int, seconds: float, prompt_len: int, max_tokens: int,
               vocab: int) -> dict:
    out = {"tokens": 0, "requests": 0}
    warm = {"tokens": 0, "requests": 0}
    await one_client(url, model, 999, prompt_len, max_tokens, time.monotonic() + 0.1, vocab, warm)  # cold starts
    async with aiohttp.ClientSession() as session:
        before = await histograms(session, url)
        start = time.monotonic()
        await asyncio.gather(*(one_client(url, model, i, prompt_len, max_tokens, start + seconds, vocab, out)
                               for i in range(clients)))
        out["elapsed"] = time.monotonic() - start
        after = await histograms(session, url)
    for key, name in (("ttft", "faasmoe_time_to_first_token_seconds"), ("itl", "faasmoe_inter_token_latency_seconds")):
        out[f"{key}_p50_s"] = quantile(before.get(name, {}), after.get(name, {}), 0.5)
        out[f"{key}_p99_s"] = quantile(before.get(name, {}), after.get(name, {}), 0.99)
    return out


def run_server(args: argparse.Namespace, path: Path, mode: str) -> dict:
    port = free_port()
    flags = ["--experts", "in-process"] if mode == "in-process" else [
        "--workers", str(args.workers), "--expert-block-size", str(args.block), "--keep-alive", "inf"]
    state = Path(tempfile.mkdtemp(prefix="faasmoe-bench-")) / "state.db"
    proc = faasmoe("serve", str(path), "--port", str(port), "--dtype", args.dtype, "--state", str(state), *flags)
    try:
        proc.wait_for("faasmoe serving", timeout=600)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        result = uvloop.run(load(f"http://127.0.0.1:{port}", path.name, args.clients, args.seconds,
                                 args.prompt_len, args.max_tokens, min(vocab, 1000)))
    finally:
        proc.stop(timeout=60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--block", type=int, default=4, help="experts per function")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.dtype = 3, 15, "float32"
        if not args.model_dir:
            from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

            args.model_dir = str(init_checkpoint(ROOT / "models" / "bench-tiny", "qwen2_moe", progress=False))
    path = checkpoint(args)
    rows = []
    for mode in ("in-process", "faasmoe"):
        r = run_server(args, path, mode)
        rows.append(dict(
            mode=mode, requests=r["requests"], tokens=r["tokens"], throughput_tok_s=r["tokens"] / r["elapsed"],
            ttft_p50_s=r["ttft_p50_s"], ttft_p99_s=r["ttft_p99_s"], itl_p50_s=r["itl_p50_s"], itl_p99_s=r["itl_p99_s"],
        ))
        print(f"{mode}: {rows[-1]}", flush=True)
    base = rows[0]
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{args.clients} streaming clients x {args.seconds:g}s, prompt {args.prompt_len}, {args.max_tokens} new "
          f"tokens, {path.name}, {args.dtype}, block {args.block}, {args.workers} worker(s) ({machine})")
    print("| mode | requests | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL p50 vs in-process |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['requests']} | {r['throughput_tok_s']:.1f} | {r['ttft_p50_s'] * 1e3:.0f} "
              f"| {r['ttft_p99_s'] * 1e3:.0f} | {r['itl_p50_s'] * 1e3:.1f} | {r['itl_p99_s'] * 1e3:.1f} "
              f"| {r['itl_p50_s'] / base['itl_p50_s']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine, args=vars(args), rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
