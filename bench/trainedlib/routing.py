"""Routing statistics of a checkpoint on held-out text per domain, beside a uniform random router and the
published numbers of trained MoEs (../shared/WORKLOADS.md): what per-expert scale to zero can exploit.

* coverage at N tokens: the share of a layer's experts the first N tokens of one request touch;
* consecutive overlap: the share of a token's top-k that the next token's top-k repeats;
* top-8 share: per domain, the assignments to a layer's 8 most used experts;
* cold tail: per domain, a layer's experts under 0.1% of its assignments.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

COVERAGE_AT = (8, 32, 64, 256)
PUBLISHED = {  # DeepSeek-V2-Lite (64 experts, top-6) from ESFT's expert scores; OLMoE-1B-7B (64, top-8)
    "coverage": {8: "~44%", 32: "66-82%", 64: "75-92%", 256: ">=95%"},
    "overlap": "26-29% (random 9%)",
    "top8": "22-51% (web 22%, code/arXiv ~50%)",
    "cold_tail": "7-8 of 64 in a late layer, none in layer 0",
}


def _requests(tokenizer, docs: list[str], count: int, length: int) -> list[list[int]]:
    """Up to `count` requests of `length` tokens: the start of one held-out document each (short documents
    are joined), so that requests are separate texts, not one text cut up."""
    out, short = [], []
    for doc in docs:
        ids = tokenizer.encode(doc).ids
        if len(ids) >= length:
            out.append(ids[:length])
        else:
            short += ids
            if len(short) >= length:
                out.append(short[:length])
                short = []
        if len(out) >= count:
            break
    return out


def _topk_per_layer(model, ids: list[int], k: int) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    return [logits.float().topk(k, dim=-1).indices for logits in out.router_logits]  # per layer: [tokens, k]


def _stats(routes: list[list[torch.Tensor]], experts: int, k: int) -> dict:
    """routes[request][layer] = [tokens, k] expert ids."""
    layers = len(routes[0])
    coverage = {n: statistics.mean(len(torch.unique(r[layer][:n])) / experts for r in routes for layer in range(layers))
                for n in COVERAGE_AT if all(len(r[0]) >= n for r in routes)}
    overlaps = []
    for r in routes:
        for layer in range(layers):
            sets = r[layer]
            same = (sets[1:, :, None] == sets[:-1, None, :]).any(-1).sum(-1).float() / k
            overlaps.append(float(same.mean()))
    per_layer_top8, per_layer_cold = [], []
    for layer in range(layers):
        counts = torch.bincount(torch.cat([r[layer].reshape(-1) for r in routes]), minlength=experts).float()
        share = counts / counts.sum()
        per_layer_top8.append(float(share.sort(descending=True).values[:8].sum()))
        per_layer_cold.append(int((share < 0.001).sum()))
    return {"coverage": coverage, "overlap": statistics.mean(overlaps), "top8_per_layer": per_layer_top8,
            "cold_per_layer": per_layer_cold}


def _random_routes(shape: list[list[int]], experts: int, k: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]) for tokens in layers]
            for layers in shape]


def measure(path: Path, held_out: dict[str, list[str]], requests: int = 24, length: int = 256) -> dict:
    """Per domain and over all of them: the checkpoint's routing statistics, and a random router's."""
    import transformers
    from tokenizers import Tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = model.config
    experts, k = config.num_experts, config.num_experts_per_tok
    tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    out: dict = {"experts": experts, "top_k": k, "domains": {}}
    everything = []
    for name, docs in held_out.items():
        reqs = _requests(tokenizer, docs, requests, length)
        if not reqs:
            continue
        routes = [_topk_per_layer(model, ids, k) for ids in reqs]
        everything += routes
        out["domains"][name] = {"requests": len(reqs), **_stats(routes, experts, k)}
    out["all"] = _stats(everything, experts, k)
    shape = [[len(r[layer]) for layer in range(len(r))] for r in everything]
    out["random"] = _stats(_random_routes(shape, experts, k), experts, k)
    return out


def print_table(stats: dict) -> None:
    e, k = stats["experts"], stats["top_k"]
    print(f"\nrouting on held-out text ({e} experts, top-{k}); published: DeepSeek-V2-Lite (64, top-6), OLMoE (64, top-8)")
    head = "".join(f"{f'cov@{n}':>9}" for n in COVERAGE_AT)
    print(f"{'':14}{head}{'overlap':>9}{'top-8 (min-max layer)':>24}{'cold tail (last layer)':>24}")

    def row(label: str, s: dict) -> None:
        cov = "".join(f"{s['coverage'][n] * 100:>8.0f}%" if n in s["coverage"] else f"{'-':>9}" for n in COVERAGE_AT)
        top8, cold = s["top8_per_layer"], s["cold_per_layer"]
        top8_text = f"{min(top8) * 100:.0f}-{max(top8) * 100:.0f}%"
        cold_text = f"{cold[-1]} of {e} ({cold[0]} in layer 0)"
        print(f"{label:14}{cov}{s['overlap'] * 100:>8.0f}%{top8_text:>24}{cold_text:>24}")

    for name, s in stats["domains"].items():
        row(name, s)
    row("all domains", stats["all"])
    row("random router", stats["random"])
    pub = PUBLISHED
    print(f"{'published':14}" + "".join(f"{pub['coverage'][n]:>9}" for n in COVERAGE_AT)
          + f"{'26-29%':>9}{'22-51%':>24}{'7-8 of 64 (late)':>24}")
