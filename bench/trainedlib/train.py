"""Train a small fine-grained qwen2_moe on the mixed-domain corpus, on this machine's CPU, and write it as a
real Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

The model is shaped like Qwen1.5-MoE-A2.7B in miniature: many small routed experts (top-4 of 32), a shared
expert, and most of the parameters in the experts. The router is trained with transformers' load-balancing
loss, which counts tokens per expert over the whole batch (a global batch of all domains): balancing per
sequence would force every request to spread over all experts and erase the specialisation that makes
per-expert scale to zero pay. Built once per spec and cached under models/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bench.trainedlib.corpus import documents, domains
from faasmoe.model.synthetic.tokenizer_files import write_tokenizer_files

log = logging.getLogger(__name__)

DONE = "training.json"  # written last: a directory without it is an interrupted build


@dataclass(frozen=True)
class TrainSpec:
    """What to build: the model's shape, the corpus and the training budget."""

    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 96
    shared_expert_intermediate_size: int = 128
    seq_len: int = 256
    batch_size: int = 16
    seconds: float = 720.0  # the training budget (the corpus and tokenizer come first, ~1 min)
    max_steps: int = 1_000_000
    lr: float = 3e-3
    aux_loss_coef: float = 0.02
    domain_bytes: int = 3_000_000  # of each domain's text
    eval_fraction: float = 0.05  # of each domain's documents, held out (routing statistics)
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def corpus(spec: TrainSpec) -> dict[str, tuple[list[str], list[str]]]:
    """Domain -> (training documents, held-out documents)."""
    out = {}
    for domain in domains():
        docs = documents(domain, spec.domain_bytes, spec.seed)
        held = max(1, int(len(docs) * spec.eval_fraction))
        out[domain.name] = (docs[held:], docs[:held])
    return out


def hf_config(spec: TrainSpec, special: dict[str, int]):
    import transformers

    return transformers.Qwen2MoeConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=4 * spec.hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        num_experts=spec.num_experts, num_experts_per_tok=spec.top_k, moe_intermediate_size=spec.moe_intermediate_size,
        shared_expert_intermediate_size=spec.shared_expert_intermediate_size, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=spec.aux_loss_coef,
        bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"], use_sliding_window=False, dtype="float32")


def build(out: Path, spec: TrainSpec) -> Path:
    """The trained checkpoint for `spec` in `out` (built now unless it is there already)."""
    if (out / DONE).exists():
        return out
    import transformers

    started = time.monotonic()
    torch.manual_seed(spec.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    texts = corpus(spec)
    out.mkdir(parents=True, exist_ok=True)
    special = write_tokenizer_files(out, spec.vocab_size, (t for train, _ in texts.values() for t in train))
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    separator = special["<|endoftext|>"]
    streams = {}
    for name, (train, _) in texts.items():
        ids: list[int] = []
        for enc in tokenizer.encode_batch(train):
            ids += enc.ids + [separator]
        streams[name] = torch.tensor(ids)
    log.info("corpus: %s tokens", {k: len(v) for k, v in streams.items()})
    model = transformers.Qwen2MoeForCausalLM(hf_config(spec, special))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(spec.seed)
    names = sorted(streams)
    losses: list[tuple[int, float, float]] = []  # (step, loss, seconds)
    train_start = time.monotonic()
    step = 0
    model.train()
    while step < spec.max_steps and time.monotonic() - train_start < spec.seconds:
        batch = torch.stack([_window(streams[rng.choice(names)], spec.seq_len, rng) for _ in range(spec.batch_size)])
        progress = (time.monotonic() - train_start) / spec.seconds
        for group in optimizer.param_groups:  # warm up, then a cosine over the time budget
            group["lr"] = spec.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        last = step >= spec.max_steps or time.monotonic() - train_start >= spec.seconds
        if step % 10 == 0 or step == 1 or last:
            losses.append((step, loss.item(), round(time.monotonic() - train_start, 1)))
            log.info("step %d loss %.3f (%.0fs)", step, losses[-1][1], time.monotonic() - train_start)
    model.eval()
    model.config.output_router_logits = False  # a served checkpoint, as published ones are
    model.save_pretrained(out, safe_serialization=True)
    (out / DONE).write_text(json.dumps({
        "spec": asdict(spec), "steps": step, "losses": losses, "domains": {k: len(v) for k, v in streams.items()},
        "train_seconds": round(time.monotonic() - train_start, 1), "total_seconds": round(time.monotonic() - started, 1),
        "torch": torch.__version__, "transformers": transformers.__version__}, indent=1))
    return out


def _window(stream: torch.Tensor, length: int, rng: random.Random) -> torch.Tensor:
    start = rng.randrange(max(1, len(stream) - length))
    window = stream[start:start + length]
    if len(window) < length:  # a domain shorter than a window: pad by repeating it
        window = stream.repeat(length // max(1, len(stream)) + 1)[:length]
    return window


def default_dir(root: Path, spec: TrainSpec) -> Path:
    return root / "models" / f"trained-qwen2_moe-{spec.key()}"
