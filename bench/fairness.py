"""One tenant's flood against another's short requests on one shared model: per-tenant TTFT and tokens/s.

    python bench/fairness.py [--model-dir DIR] [--quick] [--rounds 2] [--flood 32] [--weights 1,1]

Tenants `a` and `b` share one model served by `faasmoe serve` (remote experts, two CPU workers).
Per round, each measured alone and then together, alternating:
  * a alone: --flood concurrent streams of --flood-tokens tokens each; its output tokens per second;
  * b alone: short requests one after another (--b-prompt tokens in, --b-tokens out); their TTFT;
  * both: a's flood, and b's short requests while it lasts.
TTFT comes from the server's own usage ledger (per request: queue + prefill until the first token).
`--weights A,B` sets the tenants' `weight` in the config (their shares when both are busy).
The goal (issue 21): b's TTFT p50 under the flood <= 2x alone, a's throughput alone >= 0.95x the
engine's before fair scheduling. Prints a table; writes bench/results/fairness.json.
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
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import checkpoint  # noqa: E402
from bench.serve import streamed_usage  # noqa: E402
from faasmoe.model.kernels import cpu_isa  # noqa: E402
from faasmoe.tenancy.ledger import UsageLedger  # noqa: E402
from tests.processes import free_port, serving  # noqa: E402

KEYS = {"a": "fm-fair-a-0123456789abcdefghijklmnopqrstuvw", "b": "fm-fair-b-0123456789abcdefghijklmnopqrstuvw"}


async def stream(session: aiohttp.ClientSession, url: str, tenant: str, prompt: list[int], tokens: int) -> int:
    """One streamed completion; the completion tokens it got."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/completions", json=body,
                            headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as response:
        response.raise_for_status()
        usage = await streamed_usage(response)
    return usage["completion_tokens"] if usage else 0


async def flood(url: str, args: argparse.Namespace, rng: random.Random) -> tuple[int, float]:
    """a's streams, all at once: (tokens, seconds)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        start = time.monotonic()
        got = await asyncio.gather(*(stream(session, url, "a", [rng.randrange(args.vocab) for _ in range(args.a_prompt)],
                                            args.flood_tokens) for _ in range(args.flood)))
        return sum(got), time.monotonic() - start


async def shorts(url: str, args: argparse.Namespace, rng: random.Random, until: asyncio.Future | None,
                 count: int) -> int:
    """b's short requests, one after another (a pause between): `count` of them, or until `until` is done."""
    sent = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        while (until is None and sent < count) or (until is not None and not until.done()):
            await stream(session, url, "b", [rng.randrange(args.vocab) for _ in range(args.b_prompt)], args.b_tokens)
            sent += 1
            await asyncio.sleep(rng.uniform(0.05, 0.3))
    return sent


def ttfts(db: Path, tenant: str, since: float) -> list[float]:
    with UsageLedger(db) as ledger:
        return [r.ttft_s for r in ledger.query(tenant=tenant, since=since) if r.ttft_s is not None]


async def one_round(url: str, db: Path, args: argparse.Namespace, seed: int) -> dict:
    rng = random.Random(seed)
    out: dict = {}
    tokens, seconds = await flood(url, args, rng)
    out["a_alone_tok_s"] = tokens / seconds
    since = time.time()
    await shorts(url, args, rng, None, args.b_alone)
    out["b_alone_ttft"] = ttfts(db, "b", since)
    await asyncio.sleep(0.5)
    since = time.time()
    task = asyncio.ensure_future(flood(url, args, rng))
    await asyncio.sleep(0.5)  # the flood is running
    await shorts(url, args, rng, task, 0)
    tokens, seconds = await task
    out["a_flood_tok_s"] = tokens / seconds
    out["b_flood_ttft"] = ttfts(db, "b", since)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a checkpoint (default: the 1- or 2-layer Qwen1.5-MoE-A2.7B shape)")
    parser.add_argument("--quick", action="store_true", help="the tiny qwen2_moe model")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flood", type=int, default=32, help="a's concurrent streams")
    parser.add_argument("--flood-tokens", type=int, default=64)
    parser.add_argument("--a-prompt", type=int, default=64)
    parser.add_argument("--b-prompt", type=int, default=16)
    parser.add_argument("--b-tokens", type=int, default=4)
    parser.add_argument("--b-alone", type=int, default=12, help="b's requests when measured alone")
    parser.add_argument("--weights", default="1,1", help="the tenants' weights, a,b")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

        path = ROOT / "models" / "tiny-qwen2_moe"
        if not (path / "config.json").exists():
            init_checkpoint(path, "qwen2_moe", seed=0, progress=False)
    else:
        path = checkpoint(args)
    config = json.loads((path / "config.json").read_text())
    args.vocab = min(config["vocab_size"], 30000)
    weight_a, weight_b = (float(w) for w in args.weights.split(","))
    machine = {"cpu": platform.processor() or platform.machine(), "isa": cpu_isa(), "cores": os.cpu_count(),
               "load_before": os.getloadavg()[0]}
    print(f"{path.name}: {machine['isa']}, {machine['cores']} cores, load {machine['load_before']:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="faasmoe-fair-") as tmp:
        db = Path(tmp) / "state.db"
        port = free_port()
        toml = Path(tmp) / "faasmoe.toml"
        toml.write_text(
            f'[server]\nport = {port}\nworkers = {args.workers}\ndevice = "cpu"\nstate = "{db}"\nkeep_alive = 3600\n\n'
            f'[[models]]\nname = "m"\npath = "{path}"\nexpert_block_size = 4\n\n'
            + "".join(f'[[tenants]]\nname = "{t}"\nmodels = ["*"]\napi_keys = ["{KEYS[t]}"]\n'
                      + (f"weight = {w}\n" if args.weights != "1,1" else "")  # the default: every config reads
                      for t, w in (("a", weight_a), ("b", weight_b))))
        proc = serving(port, "--config", str(toml), timeout=300)
        try:
            asyncio.run(shorts(proc.url, args, random.Random(0), None, 3))  # warm: every block loaded once
            asyncio.run(flood(proc.url, argparse.Namespace(**{**vars(args), "flood": 4, "flood_tokens": 4}),
                              random.Random(1)))
            rounds = [asyncio.run(one_round(proc.url, db, args, seed)) for seed in range(args.rounds)]
        finally:
            proc.stop()
    b_alone = [t for r in rounds for t in r["b_alone_ttft"]]
    b_flood = [t for r in rounds for t in r["b_flood_ttft"]]
    summary = {
        "a_alone_tok_s": statistics.mean(r["a_alone_tok_s"] for r in rounds),
        "a_flood_tok_s": statistics.mean(r["a_flood_tok_s"] for r in rounds),
        "b_alone_ttft_p50": statistics.median(b_alone), "b_flood_ttft_p50": statistics.median(b_flood),
        "b_flood_requests": len(b_flood),
    }
    summary["b_ttft_ratio"] = summary["b_flood_ttft_p50"] / summary["b_alone_ttft_p50"]
    print(f"\n{'':28} {'a tok/s':>9} {'b TTFT p50':>11} {'b requests':>11}")
    print(f"{'alone':28} {summary['a_alone_tok_s']:>9.1f} {summary['b_alone_ttft_p50'] * 1e3:>9.0f}ms {len(b_alone):>11}")
    print(f"{'together (a floods)':28} {summary['a_flood_tok_s']:>9.1f} {summary['b_flood_ttft_p50'] * 1e3:>9.0f}ms "
          f"{len(b_flood):>11}")
    print(f"b's TTFT under a's flood / alone: {summary['b_ttft_ratio']:.2f}x (goal <= 2x); "
          f"per round: {[round(r['a_alone_tok_s'], 1) for r in rounds]} a tok/s alone")
    out = ROOT / "bench" / "results" / "fairness.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "model": str(path), "args": {k: v for k, v in vars(args).items()},
                               "rounds": rounds, "summary": summary, "time": time.time()}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
