"""Routing statistics of a checkpoint on a token sequence: temporal locality and load balance.

`python -m faasmoe.model.synthetic.routing_stats MODEL_DIR [--tokens N] [--seed S]` runs the
model over a seeded Zipf-distributed token sequence (natural text's word frequencies) and
prints, per MoE layer, how often consecutive tokens pick the same first expert, how often their
top-k sets overlap, and the busiest expert's load over the mean, beside chance and what
Mixtral-8x7B measured (arXiv 2401.04088, Table 5).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from faasmoe.model.moe_model import MoEModel, PackedStep, decoder_layers

# Mixtral-8x7B (8 experts, top-2), Table 5 of arXiv 2401.04088, ranges over its datasets: the same
# first expert for consecutive tokens per layer (%), and their first-or-second overlap over all layers.
MIXTRAL_SAME_FIRST = {0: (13.6, 14.9), 15: (23.6, 28.4), 31: (19.7, 26.3)}
MIXTRAL_OVERLAP = (44.9, 67.0)


@dataclass(frozen=True)
class LayerRouting:
    layer: int
    same_first: float  # share of consecutive token pairs whose first expert is the same
    overlap: float  # share of consecutive pairs whose top-k sets share an expert
    load_ratio: float  # busiest expert's top-k selections over the mean


def chance(num_experts: int, top_k: int) -> tuple[float, float]:
    """(same first, any overlap) of two independent uniform top-k choices."""
    disjoint = math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return 1 / num_experts, 1 - disjoint


def zipf_tokens(vocab_size: int, n: int, seed: int = 0, exponent: float = 1.0) -> list[int]:
    """A seeded token sequence with Zipf word frequencies (the first 16 ids, special, left out)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab_size - 16 + 1, dtype=torch.float64)
    order = torch.randperm(vocab_size - 16, generator=gen) + 16
    picks = torch.multinomial(ranks.pow(-exponent), n, replacement=True, generator=gen)
    return order[picks].tolist()


@torch.inference_mode()
def routing_statistics(model: MoEModel, tokens: list[int]) -> list[LayerRouting]:
    """Run `tokens` as one sequence through `model` and measure each MoE layer's routing."""
    cache = model.new_cache(len(tokens))
    step = PackedStep.build(model.config, [tokens], [cache], model.device)
    layers = decoder_layers(model.trunk, step.ids, step.batch)
    chosen: dict[int, torch.Tensor] = {}
    request = next(layers)
    try:
        while True:
            layer, state = request
            chosen[layer] = state.routing.experts.cpu()
            request = layers.send(model.executor.run_layer(layer, state.moe_input, state.routing))
    except StopIteration:
        pass
    out = []
    for layer, experts in chosen.items():
        same = (experts[1:, 0] == experts[:-1, 0]).float().mean().item()
        overlap = (experts[1:, :, None] == experts[:-1, None, :]).any(-1).any(-1).float().mean().item()
        load = torch.bincount(experts.reshape(-1), minlength=model.config.num_experts).double()
        out.append(LayerRouting(layer, same, overlap, (load.max() / load.mean()).item()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=2048, help="length of the token sequence; default: 2048")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = MoEModel.from_pretrained(args.model_dir)
    cfg = model.config
    stats = routing_statistics(model, zipf_tokens(cfg.vocab_size, args.tokens, args.seed))
    first, overlap = chance(cfg.num_experts, cfg.top_k)
    print(f"{args.model_dir}: {cfg.num_experts} experts, top-{cfg.top_k}, {args.tokens} Zipf tokens; "
          f"chance: same first {100 * first:.1f}%, overlap {100 * overlap:.1f}%")
    print("| layer | same first % | first-or-second overlap % | busiest/mean load |")
    print("|---|---|---|---|")
    for s in stats:
        print(f"| {s.layer} | {100 * s.same_first:.1f} | {100 * s.overlap:.1f} | {s.load_ratio:.2f} |")
    print("Mixtral-8x7B (Table 5), same first: " + ", ".join(
        f"layer {layer} {lo}-{hi}%" for layer, (lo, hi) in MIXTRAL_SAME_FIRST.items())
        + f"; overlap {MIXTRAL_OVERLAP[0]}-{MIXTRAL_OVERLAP[1]}% (8 experts, top-2; chance 12.5% / 46.4%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
