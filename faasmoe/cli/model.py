"""`faasmoe model init` and `faasmoe generate`: checkpoints and the in-process reference path."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from runtime.sizes import format_bytes, parse_size


def add_model_parser(subparsers: argparse._SubParsersAction) -> None:
    from faasmoe.model.synthetic.presets import FAMILIES, PRESETS

    model = subparsers.add_parser("model", help="model checkpoints: init writes a random one")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    presets = "; ".join(f"{family}: {', '.join(PRESETS[family])}" for family in FAMILIES)
    init = actions.add_parser(
        "init",
        help="write a random MoE checkpoint (HF format, with tokenizer) into OUT",
        description="Write a complete random checkpoint of an MoE family in the real Hugging Face "
        "on-disk format: config.json, generation_config.json, tokenizer files and safetensors "
        "weights (sharded with model.safetensors.index.json when larger than --max-shard-size). "
        "The same arguments always write the same weights.",
    )
    init.add_argument("out", metavar="OUT", type=Path, help="directory to write (created if missing)")
    init.add_argument("--family", required=True, choices=FAMILIES, help="model family (the HF model_type)")
    init.add_argument("--preset", default="tiny",
                      help=f"model shape; 'tiny' builds in a second, the others have the real dimensions "
                      f"({presets}); default: tiny")
    init.add_argument("--layers", type=int, default=None,
                      help="keep only the first N layers (so a real-shaped preset fits a machine); default: all")
    init.add_argument("--seed", type=int, default=0, help="random seed of the weights; default: 0")
    init.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="weight dtype; default: the preset's (tiny float32, real shapes bfloat16)")
    init.add_argument("--router-skew", type=float, default=0.0, metavar="S",
                      help="Zipf exponent of expert popularity per MoE layer: the expert of popularity rank r "
                      "gets a share of the routed tokens proportional to r^-S, with a different popular set in "
                      "every layer (0: random routers, about uniform; 1: the busiest expert takes several times "
                      "the mean load). Trained models are skewed; random ones are not. Default: 0")
    init.add_argument("--routing-locality", type=float, default=0.0, metavar="L",
                      help="temporal locality of routing, in [0, 1): routers also read a moving average of the "
                      "last few tokens (layer 0's first attention head), weighted by L at the middle layers and "
                      "less at the first and last, so consecutive tokens pick the same experts more often than at "
                      "random, as in trained models; 0.4 is close to Mixtral-8x7B's measured repetition (24-28%% "
                      "same first expert mid-stack vs 12.5%% at random). qwen2_moe and mixtral only; needs float32 "
                      "compute (the default). Default: 0 (off)")
    init.add_argument("--max-shard-size", type=parse_size, default=2 * 1024**3, metavar="SIZE",
                      help="largest safetensors file before sharding (e.g. 2GiB, 500MB); default: 2GiB")
    init.add_argument("--expert-format", choices=("per_expert", "fused"), default="per_expert",
                      help="per_expert: mlp.experts.E.gate_proj.weight ... as the published checkpoints; "
                      "fused: mlp.experts.gate_up_proj [E,2I,H] and down_proj [E,H,I] as transformers 5 "
                      "saves them. Default: per_expert")
    init.add_argument("--quantize", choices=("fp8", "gptq-int4", "awq-int4"), default=None,
                      help="write it quantized as the published checkpoints are: fp8 (e4m3 in 128x128 blocks with "
                      "weight_scale_inv, quant_method fp8), gptq-int4 (qweight/qzeros/scales/g_idx, 4-bit) or awq-int4 "
                      "(GEMM layout); every decoder linear is quantized, embeddings, norms, routers and the LM head "
                      "are not. Fused experts (--expert-format fused) for fp8 only. Default: not quantized")
    init.add_argument("--group-size", type=int, default=None, metavar="G",
                      help="4-bit: input columns per scale (32, 64 or 128); default: the largest that divides every "
                      "quantized matrix's input size, at most 128")
    init.add_argument("--desc-act", action="store_true",
                      help="gptq-int4: group columns in activation order (g_idx), as desc_act checkpoints do")
    init.add_argument("--quiet", action="store_true", help="no progress bar")
    init.set_defaults(handler=_model_init)


def _model_init(args: argparse.Namespace) -> int:
    from faasmoe.model.quantize import quantize_checkpoint
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    if args.quantize and args.expert_format != "per_expert":
        raise SystemExit("--quantize needs --expert-format per_expert (quantized checkpoints store experts apart)")
    if args.group_size is not None and args.quantize not in ("gptq-int4", "awq-int4"):
        raise SystemExit("--group-size is for --quantize gptq-int4 or awq-int4")
    if args.desc_act and args.quantize != "gptq-int4":
        raise SystemExit("--desc-act is for --quantize gptq-int4")
    start = time.perf_counter()
    dense = args.out.parent / f".{args.out.name}.plain" if args.quantize else args.out
    out = init_checkpoint(
        dense, args.family, preset=args.preset, layers=args.layers, seed=args.seed, dtype=args.dtype,
        router_skew=args.router_skew, max_shard_bytes=args.max_shard_size, progress=not args.quiet,
        expert_format=args.expert_format, routing_locality=args.routing_locality,
    )
    if args.quantize:
        try:
            out = quantize_checkpoint(dense, args.out, args.quantize, group_size=args.group_size,
                                      desc_act=args.desc_act)
        finally:
            shutil.rmtree(dense, ignore_errors=True)
    weights = sorted(out.glob("model*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    print(f"wrote {args.family} ({args.preset}) checkpoint to {out}: {format_bytes(size)} in "
          f"{len(weights)} safetensors file(s), {time.perf_counter() - start:.1f}s")
    return 0


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate text with the in-process model (every expert resident)",
        description="Load MODEL_DIR in this process (trunk and all experts) and generate for each --prompt "
        "as one batch. This is the full-model reference path; `faasmoe serve` is the serverless one.",
    )
    gen.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="Hugging Face checkpoint directory")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt; default: 32")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; default: 1.0")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible samples")
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; default: cpu")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                     help="compute dtype; default: float32")
    gen.add_argument("--expert-block-size", type=int, default=None, metavar="K",
                     help="experts per expert function (block); default: all experts of a layer")
    gen.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from faasmoe.engine.offline import generate
    from faasmoe.engine.sampling import SamplingParams
    from faasmoe.model.moe_model import MoEModel

    model = MoEModel.from_pretrained(args.model_dir, device=args.device, dtype=args.dtype,
                                     expert_block_size=args.expert_block_size)
    if model.tokenizer is None:
        raise ValueError(f"{args.model_dir} has no tokenizer.json; text prompts need one")
    prompts = args.prompt
    if args.chat:
        prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=args.stop)
    start = time.perf_counter()
    results = generate(model, prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, result in zip(args.prompt, results):
        print(f"prompt: {prompt!r}\ncompletion ({len(result.token_ids)} tokens, {result.finish_reason}): "
              f"{result.text!r}\n")
    generated = sum(len(r.token_ids) for r in results)
    cfg = model.config
    print(f"{cfg.family}: {cfg.num_layers} layers, {cfg.num_experts} experts (top-{cfg.top_k}); "
          f"{generated} tokens in {elapsed:.2f}s ({generated / elapsed:.1f} tokens/s)")
    return 0
