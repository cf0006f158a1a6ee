"""Offline batched generation over `MoEModel.step`: every prompt prefilled together, then decoded
together; each sequence leaves the batch when it hits EOS, a stop string or its token budget."""

from __future__ import annotations

from faasmoe.engine.sampling import SamplingParams
from faasmoe.engine.sequence import GenerationResult, Sequence
from faasmoe.model.moe_model import MoEModel


def generate(
    model: MoEModel,
    prompts: list[list[int]] | list[str],
    params: SamplingParams | None = None,
    **kwargs: object,
) -> list[GenerationResult]:
    """Generate for every prompt (token ids, or strings when the model has a tokenizer)."""
    params = params or SamplingParams(**kwargs)  # type: ignore[arg-type]
    tokenizer = model.tokenizer
    token_prompts: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer (no tokenizer.json in the model directory)")
            token_prompts.append(tokenizer.encode(prompt))
        else:
            token_prompts.append(list(prompt))
    eos_ids = tokenizer.eos_token_ids if tokenizer is not None else frozenset(model.config.eos_token_ids)
    sequences = [
        Sequence(p, params, model.new_cache(len(p) + params.max_tokens), tokenizer, eos_ids) for p in token_prompts
    ]
    running = list(sequences)
    while running:
        logits = model.step([s.pending for s in running], [s.cache for s in running])
        for seq, row in zip(running, logits):
            seq.accept(row)
        running = [s for s in running if not s.finished]
    return [s.result() for s in sequences]
