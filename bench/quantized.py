"""Quantized experts on the Qwen1.5-MoE-A2.7B shape: what a cold start reads, what a worker holds, how fast
a layer's routed experts decode, for bf16, fp8 (128x128 blocks) and 4-bit GPTQ and AWQ (groups of 128).

    python bench/quantized.py                  # 1-layer A2.7B-shaped checkpoint (built and quantized on first use)
    python bench/quantized.py --rounds 3 --iterations 40

Per format, as a worker does it (`ExpertLayout.load_block`, hashed against the block's content digest):
* cold start: the bytes of a 4-expert block's stored tensors, and the seconds to read and verify all 15
  blocks of the layer with the file's pages dropped from the page cache first (posix_fadvise DONTNEED);
* resident: the layer's expert bytes as held once packed for the CPU's kernels;
* compute: one MoE layer's routed experts (top-4 of 60, routed by the checkpoint's router on random hidden
  states, fresh ones each step so the experts change as in a real decode) at batch 1 and 16 (decode) and 256
  (a prefill chunk), p50 of `--iterations` steps, shown as the tokens/s a 24-layer model's experts would allow.
Formats alternate within each round (A B C D A B C D). Writes bench/results/quantized.md and .json.

    python bench/quantized.py --vllm           # also: does vLLM's CPU build serve each quantized checkpoint?

With --vllm, vLLM's CPU build (bench/peer.py's `.venv-vllm/`, installed there on first use) is started on each
quantized checkpoint, bound to all cores: "serves", or the reason its engine gives for refusing it.
"""

from __future__ import annotations

import argparse
import glob
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

from faasmoe.engine.functions import block_content  # noqa: E402
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout  # noqa: E402
from faasmoe.model.config import MoEConfig  # noqa: E402
from faasmoe.model.content import CheckpointDigests  # noqa: E402
from faasmoe.model.experts import ExpertBlock, LocalExpertExecutor, route  # noqa: E402
from faasmoe.model.kernels import cpu_isa  # noqa: E402
from faasmoe.model.moe_model import block_ranges  # noqa: E402
from faasmoe.model.quantize import quantize_checkpoint  # noqa: E402
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint  # noqa: E402

FORMATS = ("bf16", "fp8", "gptq-int4", "awq-int4")
BLOCK = 4
MODEL_LAYERS = 24  # Qwen1.5-MoE-A2.7B's


def checkpoints(model_dir: Path) -> dict[str, Path]:
    plain = model_dir / "bench-qwen1.5-moe-a2.7b-1l"
    if not (plain / "config.json").exists():
        print(f"building {plain} ...", flush=True)
        init_checkpoint(plain, "qwen2_moe", preset="qwen1.5-moe-a2.7b", layers=1, dtype="bfloat16")
    out = {"bf16": plain}
    for method in FORMATS[1:]:
        path = model_dir / f"bench-qwen1.5-moe-a2.7b-1l-{method}"
        if not (path / "config.json").exists():
            print(f"quantizing {plain.name} to {method} ...", flush=True)
            quantize_checkpoint(plain, path, method, group_size=None if method == "fp8" else 128)
        out[method] = path
    return out


def drop_page_cache(path: Path) -> None:
    for file in path.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_start(path: Path) -> dict:
    """Bytes of one block as stored, and the seconds to read and verify every block of the layer from disk."""
    config = MoEConfig.from_pretrained(path)
    reader = CheckpointReader(path)
    layout = ExpertLayout(reader, config)
    digests = CheckpointDigests.of(reader)
    ranges = block_ranges(config.num_experts, BLOCK)
    expect = [block_content(layout, digests, 0, first, count, torch.bfloat16) for first, count in ranges]
    stored = sum(reader.entry(name).nbytes for name, _, _, _ in layout.block_parts(0, 0, BLOCK))
    drop_page_cache(path)
    start = time.perf_counter()
    for (first, count), digest in zip(ranges, expect):
        layout.load_block(0, first, count, torch.bfloat16, expect=digest)
    seconds = time.perf_counter() - start
    reader.close()
    return {"block_bytes": stored, "layer_load_s": seconds}


def layer_executor(path: Path) -> tuple[LocalExpertExecutor, torch.Tensor, MoEConfig]:
    config = MoEConfig.from_pretrained(path)
    reader = CheckpointReader(path)
    layout = ExpertLayout(reader, config)
    blocks = [ExpertBlock(0, first, layout.load_block(0, first, count, torch.bfloat16)).packed()
              for first, count in block_ranges(config.num_experts, BLOCK)]
    router = reader.tensor(layout.router_name(0)).to(torch.bfloat16)
    reader.close()
    return LocalExpertExecutor({0: blocks}, BLOCK), router, config


@torch.inference_mode()
def decode_layer_s(executor: LocalExpertExecutor, router: torch.Tensor, config: MoEConfig, batch: int,
                   iterations: int, seed: int) -> tuple[float, torch.Tensor]:
    """p50 seconds of one layer's routed experts at `batch` rows; and the first step's output (a correctness check)."""
    g = torch.Generator().manual_seed(seed)
    times, first = [], None
    for i in range(iterations + 2):
        x = (torch.randn(batch, config.hidden_size, generator=g) * 0.5).to(torch.bfloat16)
        routing = route(x, router, config.top_k, config.norm_topk_prob)
        start = time.perf_counter()
        out = executor.run_layer(0, x, routing)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
        if first is None:
            first = out.float()
    return statistics.median(times), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=30, help="decode steps timed per batch size and round")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--batches", default="1,16,256", help="rows per layer call: decode batches, a prefill chunk")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantized.json")
    parser.add_argument("--vllm", action="store_true", help="also start vLLM's CPU build on each quantized checkpoint")
    args = parser.parse_args()
    formats = args.formats.split(",")
    if args.vllm:
        args.vllm = vllm_verdicts({f: p for f, p in checkpoints(args.model_dir).items() if f in formats and f != "bf16"})
    batches = [int(b) for b in args.batches.split(",")]
    paths = checkpoints(args.model_dir)
    executors = {f: layer_executor(paths[f]) for f in formats}
    results: dict[str, dict] = {f: {"cold": [], "decode": {b: [] for b in batches}} for f in formats}
    for round_ in range(args.rounds):
        for f in formats:
            results[f]["cold"].append(cold_start(paths[f]))
            for batch in batches:
                iterations = args.iterations if batch <= 16 else max(5, args.iterations // 4)
                seconds, out = decode_layer_s(*executors[f], batch, iterations, seed=round_)
                results[f]["decode"][batch].append(seconds)
                if batch == batches[-1] and round_ == 0:
                    results[f]["output"] = out
            layer = ", ".join(f"b{b} {results[f]['decode'][b][-1] * 1e3:.1f} ms" for b in batches)
            print(f"round {round_ + 1} {f}: load {results[f]['cold'][-1]['layer_load_s']:.2f}s, layer {layer}", flush=True)
    report(args, formats, batches, executors, results)


def vllm_verdicts(paths: dict[str, Path]) -> dict[str, str]:
    """Format -> "serves" or vLLM's reason for refusing its checkpoint (the exception its engine raised)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import peer  # bench/peer.py: the vLLM virtualenv and how to start and stop its server

    peer.ensure_vllm()
    verdicts = {}
    for fmt, path in paths.items():
        logs = tempfile.mkdtemp(prefix="faasmoe-vllm-")
        options = argparse.Namespace(vllm_kv_gib=1, server_log=True, out=str(Path(logs) / "x.json"))
        try:
            with peer.serving("vllm-2core", path, "bfloat16", options) as server:
                verdicts[fmt] = f"serves (ready after {server.ready_s:.0f} s)"
        except RuntimeError:
            lines = [line for log in glob.glob(f"{logs}/peer-logs/*.log") for line in Path(log).read_text().splitlines()]
            reasons = [line.split("] ", 1)[-1].strip() for line in lines
                       if "Error: " in line and "Engine core initialization failed" not in line]
            verdicts[fmt] = "refused: " + (reasons[-1] if reasons else "(no reason in its log)")
            more = [line.split("] ", 1)[-1].strip() for line in lines if "Kernel requires" in line]  # why each kernel declined
            if more:
                verdicts[fmt] += " " + " ".join(dict.fromkeys(more))
        print(f"vLLM on {fmt}: {verdicts[fmt]}", flush=True)
    return verdicts


def report(args, formats, batches, executors, results) -> None:
    base = results.get("bf16")
    summary = {}
    for f in formats:
        r = results[f]
        layer_s = {b: statistics.median(r["decode"][b]) for b in batches}
        error = 0.0
        if base is not None:
            error = float((r["output"] - base["output"]).norm() / base["output"].norm())
        summary[f] = {"block_bytes": r["cold"][0]["block_bytes"],
                      "layer_load_s": statistics.median(c["layer_load_s"] for c in r["cold"]),
                      "resident_bytes": executors[f][0].nbytes,
                      "layer_ms": {b: s * 1e3 for b, s in layer_s.items()},
                      "expert_tok_s": {b: b / (MODEL_LAYERS * s) for b, s in layer_s.items()},
                      "relative_output_error_vs_bf16": error,
                      "rounds": {"layer_load_s": [c["layer_load_s"] for c in r["cold"]],
                                 **{f"layer_ms_b{b}": [s * 1e3 for s in r["decode"][b]] for b in batches}}}
    ref = summary.get("bf16")

    def ratio(value: float, base: float | None) -> str:
        return "–" if base is None else f"{value / base:.2f}x"

    header = ["format", "block bytes (4 experts)", "x bf16", "layer cold load", "x bf16", "resident (layer)", "x bf16"]
    for b in batches:
        header += [f"layer b{b}", f"expert tok/s b{b}", "x bf16"]
    rows = ["| " + " | ".join(header + ["output vs bf16"]) + " |", "|" + "---|" * (len(header) + 1)]
    for f, s in summary.items():
        cells = [f, f"{s['block_bytes'] / 2**20:.1f} MiB", ratio(s["block_bytes"], ref and ref["block_bytes"]),
                 f"{s['layer_load_s']:.2f} s", ratio(s["layer_load_s"], ref and ref["layer_load_s"]),
                 f"{s['resident_bytes'] / 2**20:.0f} MiB", ratio(s["resident_bytes"], ref and ref["resident_bytes"])]
        for b in batches:
            cells += [f"{s['layer_ms'][b]:.1f} ms", f"{s['expert_tok_s'][b]:.1f}",
                      ratio(s["expert_tok_s"][b], ref and ref["expert_tok_s"][b])]
        rows.append("| " + " | ".join(cells + [f"{s['relative_output_error_vs_bf16']:.3f}"]) + " |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {cpu_isa()}, torch {torch.__version__}"
    text = (f"# Quantized experts, Qwen1.5-MoE-A2.7B shape ({machine})\n\n"
            f"`python bench/quantized.py --rounds {args.rounds} --iterations {args.iterations}`; medians over rounds; "
            f"expert tok/s = rows / (24 layers x the layer's time).\n\n" + "\n".join(rows) + "\n")
    if args.vllm:
        text += "\nvLLM's CPU build on the same checkpoints (bound to all cores):\n\n" + "".join(
            f"* {fmt}: {verdict}\n" for fmt, verdict in args.vllm.items())
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "formats": summary, "vllm": args.vllm or None}, indent=2,
                                   default=str))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
