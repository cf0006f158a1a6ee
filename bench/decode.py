"""Decode throughput of MoEModel against Hugging Face transformers on the same checkpoint.

    python bench/decode.py                       # 2-layer Qwen1.5-MoE-A2.7B shape, fp32+bf16, batch 1 and 16
    python bench/decode.py --quick               # tiny model, seconds (smoke run)

Both engines run greedy decoding of the same prompts for the same number of new tokens
(EOS ignored), in this process, one after the other; tokens/s counts generated tokens over
the wall time of the whole generate call (prefill included, identical for both). Prints a
table with the ratio and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import gc
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


def build_checkpoint(args: argparse.Namespace) -> Path:
    path = Path(args.model_dir or ROOT / "models" / f"bench-{args.preset}-{args.layers}l")
    if not (path / "config.json").exists():
        print(f"building {args.preset} with {args.layers} layers in {path} ...", flush=True)
        init_checkpoint(path, family=args.family, preset=args.preset, layers=args.layers, seed=0, dtype="bfloat16")
    return path


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 1000), (batch, length), generator=g).tolist()


def time_transformers(path: Path, dtype: torch.dtype, batch: list[list[int]], new_tokens: int, reps: int):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor(batch)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        best, out = float("inf"), None
        for _ in range(reps):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            best = min(best, time.perf_counter() - start)
    tokens = out[:, ids.shape[1]:].tolist()
    del model
    gc.collect()
    return best, tokens


def time_faasmoe(path: Path, dtype: torch.dtype, batch: list[list[int]], new_tokens: int, reps: int):
    model = MoEModel.from_pretrained(path, dtype=dtype)
    model.generate(batch, max_tokens=2, ignore_eos=True)  # warm-up
    best, results = float("inf"), []
    for _ in range(reps):
        start = time.perf_counter()
        results = model.generate(batch, max_tokens=new_tokens, ignore_eos=True)
        best = min(best, time.perf_counter() - start)
    del model
    gc.collect()
    return best, [r.token_ids for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_moe")
    parser.add_argument("--preset", default="qwen1.5-moe-a2.7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--model-dir", help="use this checkpoint instead of building one")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2, help="best of N timed runs per cell")
    parser.add_argument("--quick", action="store_true", help="tiny preset, few tokens: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode.json"))
    args = parser.parse_args()
    if args.quick:
        args.preset, args.layers, args.new_tokens, args.reps = "tiny", None, 8, 1
        args.model_dir = args.model_dir or str(ROOT / "models" / "bench-tiny")

    path = build_checkpoint(args)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for batch_size in (int(b) for b in args.batches.split(",")):
            batch = prompts(batch_size, args.prompt_len, vocab)
            hf_s, hf_tokens = time_transformers(path, dtype, batch, args.new_tokens, args.reps)
            ours_s, our_tokens = time_faasmoe(path, dtype, batch, args.new_tokens, args.reps)
            generated = batch_size * args.new_tokens
            same = sum(a == b for a, b in zip(hf_tokens, our_tokens))
            rows.append(dict(
                dtype=dtype_name, batch=batch_size, new_tokens=args.new_tokens,
                transformers_tok_s=generated / hf_s, faasmoe_tok_s=generated / ours_s,
                ratio=hf_s / ours_s, sequences_identical=f"{same}/{batch_size}",
            ))
            print(f"{dtype_name:9s} batch {batch_size:3d}: transformers {generated / hf_s:7.2f} tok/s, "
                  f"faasmoe {generated / ours_s:7.2f} tok/s, x{hf_s / ours_s:.2f}", flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"\nDecode throughput, {args.preset} ({args.layers or 'all'} layers), {machine}")
    print("| dtype | batch | transformers tok/s | faasmoe tok/s | ratio | identical greedy sequences |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['batch']} | {r['transformers_tok_s']:.2f} | {r['faasmoe_tok_s']:.2f} "
              f"| {r['ratio']:.2f}x | {r['sequences_identical']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(preset=args.preset, layers=args.layers, machine=machine, rows=rows), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
