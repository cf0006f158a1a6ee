"""Tenant fine-tunes as expert-specialised fine-tuning (ESFT, arXiv 2407.01906) makes them.

For a tenant's domain, each MoE layer's experts are ranked by their token selection ratio on that domain's
text (the share of the domain's tokens whose top-k picks the expert, over k), and the highest are taken
until their ratios add up to top_p (0.2, ESFT's setting). Only those experts are trained on the domain;
every other tensor, routers and trunk included, is written back byte for byte as the base holds it. The
result is a complete Hugging Face checkpoint, as a tenant would upload it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

DONE = "esft.json"


def selected_experts(model, ids: torch.Tensor, top_p: float = 0.2) -> dict[int, list[int]]:
    """Layer -> the experts ESFT's token selection ratio picks for text `ids` [requests, tokens]."""
    config = model.config
    k, experts = config.num_experts_per_tok, config.num_experts
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    chosen = {}
    for layer, logits in enumerate(router_logits):
        picks = logits.float().topk(k, dim=-1).indices.reshape(-1)
        ratio = torch.bincount(picks, minlength=experts).float() / picks.numel()
        order = ratio.argsort(descending=True)
        total, take = 0.0, []
        for e in order.tolist():
            take.append(e)
            total += float(ratio[e])
            if total >= top_p:
                break
        chosen[layer] = sorted(take)
    return chosen


def fine_tune(base: Path, out: Path, domain_ids: torch.Tensor, seconds: float, seq_len: int = 256,
              batch_size: int = 8, lr: float = 1e-3, max_steps: int = 1_000_000, seed: int = 0) -> Path:
    """ESFT of `base` on one domain's token stream `domain_ids`, written to `out` (kept if already there)."""
    if (out / DONE).exists():
        return out
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rng = random.Random(seed)

    def batch() -> torch.Tensor:
        starts = [rng.randrange(max(1, len(domain_ids) - seq_len)) for _ in range(batch_size)]
        return torch.stack([domain_ids[s:s + seq_len] for s in starts])

    model.eval()
    chosen = selected_experts(model, torch.cat([batch() for _ in range(4)]))  # the affinity of a sample of the domain
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad = ".mlp.experts." in name
        if param.requires_grad:
            layer = int(name.split(".layers.", 1)[1].split(".", 1)[0])
            mask = torch.zeros(param.shape[0], *([1] * (param.dim() - 1)))
            mask[chosen[layer]] = 1.0
            param.register_hook(lambda grad, mask=mask: grad * mask)  # only the chosen experts learn
            trainable.append(param)
    # No weight decay: it would move the frozen experts' bytes too (Adam's step is 0 where the grad is 0).
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    model.train()
    model.config.output_router_logits = False  # the routers stay the base's: no balancing loss to move them
    started, steps, losses = time.monotonic(), 0, []
    while steps < max_steps and time.monotonic() - started < seconds:
        x = batch()
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps == 1 or steps % 10 == 0:
            losses.append((steps, loss.item()))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((base / name).read_bytes())
    (out / DONE).write_text(json.dumps({"base": str(base), "experts": {str(k): v for k, v in chosen.items()},
                                        "steps": steps, "losses": losses}, indent=1))
    return out


def domain_stream(base: Path, docs: list[str]) -> torch.Tensor:
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    separator = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids += enc.ids + [separator]
    return torch.tensor(ids)
