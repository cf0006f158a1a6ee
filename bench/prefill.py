"""Prefill time against prompt length: does a long prompt cost what its tokens do, or more?

    python bench/prefill.py                       # tiny model and the 1-layer Qwen1.5-MoE-A2.7B shape
    python bench/prefill.py --models tiny --lengths 1024,2048,4096,8192

Each prompt (seeded random token ids) is prefilled by `MoEModel.step` in this process, the way
the serving engine does it: in chunks of `--chunk` tokens (2048, the engine's default), each
chunk attending to the cache the previous ones wrote. Best of `--reps` runs per length. The goal
(issue 10): a 4096-token prefill takes at most 5x a 1024-token one. Attention grows with the
square of the length, everything else linearly, so the ratio tells how much the attention costs.
Prints a table, writes JSON to bench/results/prefill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from faasmoe.model.moe_model import MoEModel  # noqa: E402
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint  # noqa: E402

MODELS = {  # name -> (checkpoint dir, init arguments)
    "tiny": (ROOT / "models" / "bench-tiny", dict(family="qwen2_moe", preset="tiny", dtype="float32")),
    "a2.7b-1l": (ROOT / "models" / "bench-qwen1.5-moe-a2.7b-1l",
                 dict(family="qwen2_moe", preset="qwen1.5-moe-a2.7b", layers=1, dtype="bfloat16")),
}


def checkpoint(name: str) -> Path:
    path, init = MODELS[name]
    if not (path / "config.json").exists():
        print(f"building {path.relative_to(ROOT)} ...", flush=True)
        init_checkpoint(path, seed=0, **init)
    return path


def prefill_s(model: MoEModel, prompt: list[int], chunk: int) -> float:
    cache = model.new_cache(len(prompt) + 1)
    start = time.perf_counter()
    for i in range(0, len(prompt), chunk):
        model.step([prompt[i:i + chunk]], [cache])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,a2.7b-1l", help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (the engine's --max-batch-tokens share)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefill.json"))
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = []
    for name in args.models.split(","):
        path = checkpoint(name)
        model = MoEModel.from_pretrained(path)
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prefill_s(model, torch.randint(0, vocab, (256,), generator=g).tolist(), args.chunk)  # warm-up
        times = {}
        for n in lengths:
            prompt = torch.randint(0, vocab, (n,), generator=g).tolist()
            times[n] = min(prefill_s(model, prompt, args.chunk) for _ in range(args.reps))
            print(f"{name}: {n} tokens {times[n] * 1e3:9.1f} ms ({n / times[n]:8.0f} tok/s)", flush=True)
        base = lengths[0]
        rows += [dict(model=name, dtype=str(model.dtype).removeprefix("torch."), tokens=n, seconds=s,
                      tok_s=n / s, ratio_to_first=s / times[base]) for n, s in times.items()]
        del model
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    print(f"\nPrefill in chunks of {args.chunk} tokens, {machine}")
    print(f"| model | dtype | prompt tokens | prefill ms | tok/s | x {lengths[0]}-token prefill |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['tokens']} | {r['seconds'] * 1e3:.1f} | {r['tok_s']:.0f} "
              f"| {r['ratio_to_first']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine, chunk=args.chunk, rows=rows), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
