"""The Python steps of bench/gpu_check.sh; each writes one JSON file.

    python bench/gpu_check.py parity --device cuda --out parity.json
    python bench/gpu_check.py decode --device cuda --model-dir DIR --out decode.json
    python bench/gpu_check.py merge --out gpu_check.json NAME=FILE ...

parity: the tiny qwen2_moe preset in fp32, MoEModel on the device against MoEModel on the CPU:
logits of a batch of prompts (max abs and relative difference) and 16 greedy tokens each.
decode: tokens/s of the full model (`faasmoe serve --experts in-process`) against FaaSMoE with
warm experts (scheduler + frontend, keep-alive inf, every expert function loaded by a warm-up),
same requests, batch 1 and 8 concurrent streams, 32 tokens each (EOS ignored), over HTTP.
merge: one JSON object of all the parts (a missing or broken part is recorded as such).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parity(device: str, models_root: Path) -> dict:
    import torch

    from faasmoe.engine.offline import generate
    from faasmoe.model.moe_model import MoEModel
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    path = models_root / "gpu-check-tiny-qwen2_moe"
    if not (path / "config.json").exists():
        init_checkpoint(path, "qwen2_moe", preset="tiny", seed=3, progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 1000, (4, 24), generator=g)
    out = {"device": device}
    logits = {}
    tokens = {}
    for where in ("cpu", device):
        model = MoEModel.from_pretrained(path, device=where, dtype=torch.float32, expert_block_size=4)
        with torch.inference_mode():
            logits[where] = model(prompts.to(where)).float().cpu()
        tokens[where] = [r.token_ids for r in generate(model, prompts.tolist(), max_tokens=16, ignore_eos=True)]
        del model
    diff = (logits["cpu"] - logits[device]).abs()
    out.update(max_abs_diff=float(diff.max()), max_rel_diff=float((diff / logits["cpu"].abs().clamp_min(1e-3)).max()),
               logits_close=bool(torch.allclose(logits["cpu"], logits[device], atol=1e-3, rtol=1e-3)),
               greedy_identical=f"{sum(a == b for a, b in zip(tokens['cpu'], tokens[device]))}/{len(prompts)}")
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def quantized(device: str, models_root: Path) -> dict:
    """Quantized experts (FP8 blocks, GPTQ act order, AWQ) on the device against the CPU: logits and greedy tokens."""
    import torch

    from faasmoe.engine.offline import generate
    from faasmoe.model.moe_model import MoEModel
    from faasmoe.model.quantize import quantize_checkpoint
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    plain = models_root / "gpu-check-tiny-mixtral"
    if not (plain / "config.json").exists():
        init_checkpoint(plain, "mixtral", preset="tiny", seed=3, progress=False)
    prompts = torch.randint(0, 1000, (4, 24), generator=torch.Generator().manual_seed(0))
    out = {}
    for method in ("fp8", "gptq-int4", "awq-int4"):
        path = quantize_checkpoint(plain, models_root / f"gpu-check-tiny-mixtral-{method}", method,
                                   desc_act=method == "gptq-int4")
        logits, tokens = {}, {}
        for where in ("cpu", device):
            model = MoEModel.from_pretrained(path, device=where, dtype=torch.float32, expert_block_size=4)
            with torch.inference_mode():
                logits[where] = model(prompts.to(where)).float().cpu()
            tokens[where] = [r.token_ids for r in generate(model, prompts.tolist(), max_tokens=16, ignore_eos=True)]
        diff = (logits["cpu"] - logits[device]).abs()
        out[method] = {"max_abs_diff": float(diff.max()),
                       "greedy_identical": f"{sum(a == b for a, b in zip(tokens['cpu'], tokens[device]))}/{len(prompts)}"}
    return out


async def _timed_batch(endpoint, prompts: list[list[int]], max_tokens: int) -> float:
    import aiohttp

    from bench.paperlib.loadgen import RequestResult, stream_completion
    from bench.paperlib.workload import Request

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        results = [RequestResult(endpoint.tenant, str(i), 0.0) for i in range(len(prompts))]
        start = time.perf_counter()
        requests = [Request(endpoint.tenant, i, 0.0, tuple(p), max_tokens) for i, p in enumerate(prompts)]
        await asyncio.gather(*(stream_completion(session, endpoint, q, r, start) for q, r in zip(requests, results)))
        elapsed = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"decode requests failed: {errors[:3]}")
    return sum(r.tokens for r in results) / elapsed


def decode(device: str, model_dir: Path, batches: list[int], max_tokens: int, threads: int | None) -> dict:
    import os
    import random

    from bench.paperlib.setups import SetupOptions, auto_threads, start_setup

    dtype = json.loads((model_dir / "config.json").read_text()).get("torch_dtype", "bfloat16")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="faasmoe-gpu-check-") as tmp:
        for setup in ("baseline", "faasmoe-shared"):
            opts = SetupOptions(model_dir=model_dir, dtype=dtype, device=device, block_size=4, keep_alive_s=float("inf"),
                                threads=threads or auto_threads(setup, 1, os.cpu_count() or 1))
            running = start_setup(setup, ["tenant-0"], opts, Path(tmp))
            try:
                endpoint = running.endpoints["tenant-0"]
                # Warm-up: 64 random tokens x 16 steps route through (nearly) every expert of every layer.
                warm = [[rng.randrange(vocab) for _ in range(64)] for _ in range(8)]
                asyncio.run(_timed_batch(endpoint, warm, 16))
                for b in batches:
                    prompts = [[rng.randrange(vocab) for _ in range(16)] for _ in range(b)]
                    rows.setdefault(f"batch {b}", {})[setup] = asyncio.run(_timed_batch(endpoint, prompts, max_tokens))
            finally:
                running.stop()
    for row in rows.values():
        row["faasmoe_over_full"] = row["faasmoe-shared"] / row["baseline"]
    return {"device": device, "model": str(model_dir), "max_tokens": max_tokens, "tok_s": rows}


def merge(parts: list[str]) -> dict:
    out = {}
    for part in parts:
        name, _, file = part.partition("=")
        try:
            out[name] = json.loads(Path(file).read_text())
        except (OSError, ValueError) as exc:
            out[name] = {"missing": f"{type(exc).__name__}: {exc}"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("parity", "quantized", "decode", "merge"))
    parser.add_argument("parts", nargs="*", help="merge: NAME=FILE ...")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--models-root", type=Path, default=ROOT / "models")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per server process; default: all cores (one server computes at a time)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_intermixed_args()
    if args.step == "parity":
        result = parity(args.device, args.models_root)
    elif args.step == "quantized":
        result = quantized(args.device, args.models_root)
    elif args.step == "decode":
        result = decode(args.device, args.model_dir, [int(b) for b in args.batches.split(",")], args.max_tokens,
                        args.threads)
    else:
        result = merge(args.parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1)[:4000])


if __name__ == "__main__":
    main()
