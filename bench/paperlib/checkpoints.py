"""The benchmark's checkpoints: a real-shaped preset cut to a few layers, with router skew.

Built once with `faasmoe.model_init.init_checkpoint` under models/ and reused. One change to what
`faasmoe model init` writes: its byte-level BPE tokenizer is trained on a few sentences, so most
of a 151936-id vocabulary is unused and decodes to "". A random model generates mostly such ids,
and the server streams no chunk for a token without text, so a client could not see when each
token was produced. The benchmark model gets a word-level tokenizer naming every id (`t1234`), the
special tokens kept at their ids: each generated token then streams as its own chunk. The weights
(and so every cost the benchmark measures) are untouched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint, tensor_specs, zipf_targets
from faasmoe.model.synthetic.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ModelSize:
    """A benchmark model: family, preset, layers kept, storage dtype."""

    name: str
    family: str
    preset: str
    layers: int | None
    dtype: str

    def describe(self) -> str:
        layers = f"{self.layers} layer{'s' if self.layers != 1 else ''}" if self.layers else "all layers"
        return f"{self.family} `{self.preset}` ({layers}, {self.dtype})"


SIZES = {
    # 6 full models must fit next to each other in 24 GiB: one layer of Qwen1.5-MoE-A2.7B is
    # ~2.2 GiB on disk (embeddings and lm_head 1.2 GiB, 60 experts 1.0 GiB).
    "full": ModelSize("full", "qwen2_moe", "qwen1.5-moe-a2.7b", 1, "bfloat16"),
    "quick": ModelSize("quick", "qwen2_moe", "qwen1.5-moe-a2.7b", 1, "bfloat16"),
    "toy": ModelSize("toy", "qwen2_moe", "tiny", None, "float32"),
}


def checkpoint_dir(size: ModelSize, skew: float, models_root: Path, seed: int = 0) -> Path:
    layers = f"{size.layers}l" if size.layers else "all"
    return models_root / (f"paper-{size.preset}-{layers}-{size.dtype}-s{skew:g}" + (f"-seed{seed}" if seed else ""))


def ensure_checkpoint(size: ModelSize, skew: float, models_root: Path, log=print, seed: int = 0) -> Path:
    """The checkpoint of `size` with router skew `skew`, built on first use; another `seed` is another
    fine-tune of the same architecture (the private-models workload: one per tenant)."""
    path = checkpoint_dir(size, skew, models_root, seed)
    if not (path / "config.json").exists():
        log(f"building {size.describe()} with router skew {skew:g}, seed {seed} in {path} ...")
        init_checkpoint(path, size.family, preset=size.preset, layers=size.layers, seed=seed, dtype=size.dtype,
                        router_skew=skew, progress=False)
    if not streaming_tokenizer_installed(path):
        install_streaming_tokenizer(path)
    return path


def streaming_tokenizer_installed(path: Path) -> bool:
    return json.loads((path / "tokenizer.json").read_text()).get("model", {}).get("type") == "WordLevel"


def install_streaming_tokenizer(path: Path) -> None:
    """Replace tokenizer.json by a word-level one that names every id; specials keep their ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    old = json.loads((path / "tokenizer.json").read_text())
    vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
    specials = {t["id"]: t["content"] for t in old.get("added_tokens", [])}
    tok = Tokenizer(models.WordLevel({specials.get(i, f"t{i}"): i for i in range(vocab_size)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in specials.values()])
    tmp = path / "tokenizer.json.tmp"
    tmp.write_text(tok.to_str())
    tmp.replace(path / "tokenizer.json")


def special_ids(path: Path) -> list[int]:
    old = json.loads((path / "tokenizer.json").read_text())
    return sorted(t["id"] for t in old.get("added_tokens", []))


def token_id(text: str) -> int | None:
    """The id of a streamed token: `token_id:1234` (return_tokens_as_token_ids), or the word-level tokenizer's
    `t1234`; None for anything else (specials)."""
    text = text.strip()
    if text.startswith("token_id:") and text[9:].isdigit():
        return int(text[9:])
    return int(text[1:]) if text.startswith("t") and text[1:].isdigit() else None


@dataclass(frozen=True)
class ModelFacts:
    """Sizes the report needs: layers measured, and the full-depth model they stand for."""

    name: str
    layers: int
    full_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int  # one expert, in the checkpoint dtype
    layer_trunk_bytes: int  # non-expert bytes one decoder layer adds
    fixed_trunk_bytes: int  # embeddings, final norm, lm_head
    busiest_over_mean_target: float  # the Zipf target of the router skew

    @property
    def layer_expert_bytes(self) -> int:
        return self.num_experts * self.expert_bytes


def model_facts(size: ModelSize, skew: float, dtype: str | None = None) -> ModelFacts:
    """Sizes in the compute dtype (default: the checkpoint's)."""
    full = get_preset(size.family, size.preset)
    itemsize = torch.empty((), dtype=getattr(torch, dtype or size.dtype)).element_size()

    def bytes_of(pred) -> int:
        return sum(math.prod(s.shape) for s in tensor_specs(full) if pred(s.name)) * itemsize

    layer0 = "model.layers.0."
    expert = bytes_of(lambda n: n.startswith((layer0 + "mlp.experts.0.", layer0 + "block_sparse_moe.experts.0.")))
    layer_trunk = bytes_of(lambda n: n.startswith(layer0) and ".experts." not in n)
    fixed = bytes_of(lambda n: not n.startswith("model.layers."))
    targets = zipf_targets(full.num_experts, full.top_k, skew)
    return ModelFacts(size.describe(), size.layers or full.num_layers, full.num_layers, full.num_experts, full.top_k,
                      expert, layer_trunk, fixed, float(targets.max() / targets.mean()))
