"""Are the outputs right? Each tenant's first request, greedy, against transformers on the tenant's own
checkpoint; and every run's tokens against always-on's, request by request."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from bench.paperlib.workload import Request
from bench.payofflib.tenants import Deployment


@functools.lru_cache(maxsize=4)
def _reference_model(model_dir: Path):
    """transformers' model of a checkpoint, loaded once (the shared base serves several tenants)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def transformers_greedy(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by transformers, EOS not special (the benchmark's requests ignore it)."""
    model = _reference_model(model_dir)
    ids, past, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(new_tokens):
            result = model(ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


def _name(run: dict) -> str:
    return (run["label"] + ("" if run["page_cache"] == "kept" else " (dropped)")
            + (f" #{run['repeat']}" if run.get("repeat") else ""))


def check_outputs(deployment: Deployment, trace: list[Request], runs: list[dict]) -> dict:
    firsts = {}
    for r in trace:
        firsts.setdefault(r.tenant, r)
    reference = {t: transformers_greedy(deployment.models[deployment.model_of(t)], list(r.prompt), r.max_tokens)
                 for t, r in firsts.items()}
    vs_transformers = {}
    for run in runs:
        tokens = run["token_ids"]
        vs_transformers[_name(run)] = sum(
            tokens.get(r.key) == reference[t] for t, r in firsts.items())
    always = next((r["token_ids"] for r in runs if r["setup"] == "always-on"), None)
    vs_always = {}
    if always is not None:
        for run in runs:
            same = sum(run["token_ids"].get(k) == v for k, v in always.items() if v)
            vs_always[_name(run)] = same
    worst = min(vs_transformers.values(), default=0)
    summary = (f"each tenant's first request equals transformers' greedy tokens on the tenant's own checkpoint in "
               f"{worst}/{len(firsts)} tenants in the worst run (all runs: {sorted(set(vs_transformers.values()))}); "
               f"requests with tokens identical to always-on's, per run: "
               f"{min(vs_always.values(), default=0)}..{max(vs_always.values(), default=0)} of "
               f"{sum(1 for v in (always or {}).values() if v)}")
    return {"tenants": len(firsts), "vs_transformers": vs_transformers, "vs_always_on": vs_always, "summary": summary}
