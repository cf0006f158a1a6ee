"""Write a complete random MoE checkpoint in the real Hugging Face on-disk format.

`init_checkpoint` writes config.json, generation_config.json, a tokenizer and safetensors
weights (one file, or `model-0000i-of-0000N.safetensors` shards plus
`model.safetensors.index.json`) with each family's real tensor names, so every reader of real
checkpoints -- ours and transformers' -- reads these too. Weights are initialised like HF
(normal(0, initializer_range) matrices, ones for norms, zeros for biases) from a generator
seeded per tensor name: the same arguments give the same bytes, a tensor's values do not
depend on the shard size, the expert format or the number of layers kept, and tensors are
streamed to disk one at a time, so peak memory is about one tensor.

Router skew. Random routers spread tokens almost uniformly over experts, unlike trained
models, where a few experts of each layer take most of the load. `router_skew=S > 0` makes
each MoE layer's expert popularity Zipf-like: the expert of popularity rank r gets a share
of the top-k selections proportional to r**-S (S=0: plain HF init, about uniform), with a
different random order of popular experts in every layer. Mechanism: E+1 hidden dimensions
form a routing channel that no layer writes (the channel rows of every residual writer --
o_proj and the experts' down projections -- are zero), so there the residual stream keeps the
token embedding at every depth. One channel dimension holds the same constant for every token;
the router reads only the channel: an orthonormal read of the E random embedding coordinates
gives each token i.i.d. standard-normal noise per expert, and the constant coordinate adds a
per-expert offset. The top-k of (noise + offset) is thus the same mechanism at every layer and
position, and the offsets are solved (quadrature + fixed point) so that the selection shares
follow the Zipf target, capped where an expert would need more than every token. Routing then
depends on the token, not its context, as it largely does in trained MoE models; attention and
experts still read the whole hidden state. Measured on tiny qwen2_moe (16 experts, top-2), the
busiest expert's load over the mean is ~1.2-1.5 at S=0, 2.3 at 0.5, 4.7 at 1, 7.5 at 1.5.

Routing locality. Token-only routing has no temporal locality: consecutive tokens of a text
pick the same first expert at chance (1/E), while trained models repeat it more, most in the
middle layers (Mixtral-8x7B, arXiv 2401.04088 Table 5: 14% at layer 0, 24-28% at layer 15,
20-26% at layer 31 against 12.5% at random). `routing_locality=L > 0` adds a context part to
every router: layer 0's first attention head becomes a recency window. Its query and key read
only the constant channel coordinate, on the two halves of one rotary pair of frequency theta,
so its score is -A*sin((i-j)*theta) with A*theta = 0.35: weights exp(-0.35*(i-j)) over the last
few tokens (theta is the highest frequency with pi/theta >= max_position_embeddings, so no
older token ever scores near the newest). Its value reads the E routing-noise coordinates, its output goes to E
more channel dimensions (no other writer touches them; embeddings are zero there and every
row has the same norm, so the window does not depend on the token). Each router then mixes
token noise and this moving average: logits = sqrt(1-b)*token + sqrt(b)*context (+ the skew
offsets), with b = L * depth(layer) and depth rising from 0.1 at the first layer to 1 at the
middle and 0.75 at the last, the shape of Table 5. L=0.4 comes close to it (measured on a
tiny mixtral over Zipf text: see tests/model/test_routing_locality.py and `python -m
faasmoe.model.synthetic.routing_stats`); the busiest/mean expert load stays that of token-only
routing on the same text, 1.4-1.8 (use router_skew for more). It needs a family without q/k norms
(qwen2_moe, mixtral) and float32 attention (the default compute dtype): the window lives in
score differences of 0.35 on scores of ~1e4, which bf16 rounds away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from faasmoe.model.synthetic.presets import PRESETS, Preset, get_preset
from faasmoe.model.synthetic.tokenizer_files import write_tokenizer_files

__all__ = ["PRESETS", "TensorSpec", "init_checkpoint", "tensor_specs", "zipf_offsets", "zipf_targets"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_MIN_BYTES = 256 * 1024**2  # a tiny checkpoint writes in a blink; no bar for it
_CHANNEL_BIAS = 4.0  # the constant channel coordinate, in units of the embedding std
_ROUTER_LOGIT_STD = 1.0  # router logit noise at the embedding's own scale
_LOCALITY_DECAY = 0.35  # per token: the recency window's weights are exp(-decay * lag)
# Share of a router's logit variance from the context, over depth (0 = first layer, 1 = last), times L.
_LOCALITY_DEPTH = ((0.0, 0.1), (0.5, 1.0), (1.0, 0.75))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint; `parts` are the per-name generated pieces, concatenated.

    A per-expert or dense tensor has one part (its own name). A fused expert stack has one part
    per expert matrix, named as in the per-expert format, so both formats hold the same values.
    """

    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "ones" | "zeros"
    parts: tuple[tuple[str, tuple[int, ...]], ...]

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()


def _spec(name: str, shape: tuple[int, ...], init: str = "normal") -> TensorSpec:
    return TensorSpec(name, shape, init, ((name, shape),))


def _moe_specs(p: Preset, layer: int, expert_format: str) -> list[TensorSpec]:
    H, I, E = p.hidden_size, p.moe_intermediate_size, p.num_experts  # noqa: E741 (the papers' names)
    pre = f"model.layers.{layer}."
    block = pre + ("block_sparse_moe." if p.family == "mixtral" else "mlp.")
    gate, up, down = ("w1", "w3", "w2") if p.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    expert = [{k: f"{block}experts.{e}.{n}.weight" for k, n in (("gate", gate), ("up", up), ("down", down))}
              for e in range(E)]
    if expert_format == "per_expert":
        specs = [_spec(block + "gate.weight", (E, H))]
        for names in expert:
            specs += [_spec(names["gate"], (I, H)), _spec(names["up"], (I, H)), _spec(names["down"], (H, I))]
    else:  # transformers' own layout: always under mlp., gate rows then up rows per expert
        router = _spec(block + "gate.weight", (E, H))
        specs = [
            TensorSpec(pre + "mlp.gate.weight", (E, H), "normal", router.parts),
            TensorSpec(pre + "mlp.experts.gate_up_proj", (E, 2 * I, H), "normal",
                       tuple((n[k], (I, H)) for n in expert for k in ("gate", "up"))),
            TensorSpec(pre + "mlp.experts.down_proj", (E, H, I), "normal",
                       tuple((n["down"], (H, I)) for n in expert)),
        ]
    if p.shared_expert_intermediate_size:
        S = p.shared_expert_intermediate_size
        specs += [_spec(f"{pre}mlp.shared_expert.gate_proj.weight", (S, H)),
                  _spec(f"{pre}mlp.shared_expert.up_proj.weight", (S, H)),
                  _spec(f"{pre}mlp.shared_expert.down_proj.weight", (H, S)),
                  _spec(f"{pre}mlp.shared_expert_gate.weight", (1, H))]
    return specs


def tensor_specs(p: Preset, expert_format: str = "per_expert") -> list[TensorSpec]:
    """Every tensor of the checkpoint of preset `p`, in module order, with its real HF name."""
    if expert_format not in ("per_expert", "fused"):
        raise ValueError(f"expert_format must be 'per_expert' or 'fused', got {expert_format!r}")
    H, V, d = p.hidden_size, p.vocab_size, p.dim_per_head
    q, kv = p.num_heads * d, p.num_kv_heads * d
    specs = [_spec("model.embed_tokens.weight", (V, H))]
    for layer in range(p.num_layers):
        attn = f"model.layers.{layer}.self_attn."
        specs += [_spec(attn + "q_proj.weight", (q, H)), _spec(attn + "k_proj.weight", (kv, H)),
                  _spec(attn + "v_proj.weight", (kv, H)), _spec(attn + "o_proj.weight", (H, q))]
        if p.qkv_bias:
            specs += [_spec(attn + f"{n}_proj.bias", (s,), "zeros") for n, s in (("q", q), ("k", kv), ("v", kv))]
        if p.qk_norm != "none":
            qn, kn = (q, kv) if p.qk_norm == "full" else (d, d)
            specs += [_spec(attn + "q_norm.weight", (qn,), "ones"), _spec(attn + "k_norm.weight", (kn,), "ones")]
        specs += _moe_specs(p, layer, expert_format)
        specs += [_spec(f"model.layers.{layer}.input_layernorm.weight", (H,), "ones"),
                  _spec(f"model.layers.{layer}.post_attention_layernorm.weight", (H,), "ones")]
    specs.append(_spec("model.norm.weight", (H,), "ones"))
    if not p.tie_word_embeddings:
        specs.append(_spec("lm_head.weight", (V, H)))
    return specs


def _seed_of(seed: int, name: str) -> int:
    # A stable per-name seed (Python's hash() is salted per process).
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def zipf_targets(num_experts: int, top_k: int, exponent: float, cap: float = 0.97) -> torch.Tensor:
    """P(expert of rank r is in a token's top-k), proportional to r**-exponent, summing to top_k.

    Water-filled at `cap`: no expert can be picked by more than every token.
    """
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    target = top_k * ranks.pow(-exponent) / ranks.pow(-exponent).sum()
    for _ in range(num_experts):
        if target.max() <= cap + 1e-9:
            break
        capped = target >= cap
        target = torch.where(capped, cap, target * (top_k - cap * capped.sum()) / target[~capped].sum())
    return target


def _selection_probs(offsets: torch.Tensor, top_k: int, points: int = 192) -> torch.Tensor:
    """P(e in top-k of offsets + N(0, 1) noise) for every e, by quadrature over e's own score z.

    Given z, the others that beat it are independent Bernoullis; a small dynamic programme over
    them gives P(fewer than k beat z).
    """
    E = len(offsets)
    z = torch.linspace(offsets.min().item() - 6, offsets.max().item() + 6, points, dtype=torch.float64)
    density = torch.exp(-0.5 * (z - offsets[:, None]) ** 2) * (z[1] - z[0]) / math.sqrt(2 * math.pi)
    beats = 0.5 * torch.erfc((z - offsets[:, None]) / math.sqrt(2))  # P(score_j > z), [E, points]
    count = torch.zeros(E, points, top_k, dtype=torch.float64)  # P(c others beat z), c < k, per e
    count[..., 0] = 1.0
    for j in range(E):
        q = beats[j].expand(E, points).clone()
        q[j] = 0.0  # e does not compete with itself
        q = q[..., None]
        count = count * (1 - q) + torch.nn.functional.pad(count[..., :-1], (1, 0)) * q
    return (density * count.sum(-1)).sum(-1)


def zipf_offsets(num_experts: int, top_k: int, exponent: float, steps: int = 100) -> torch.Tensor:
    """Per-rank logit offsets (descending) such that the top-k of offsets + N(0, 1) noise picks
    the expert of rank r with the probabilities of `zipf_targets`."""
    if exponent == 0 or top_k >= num_experts:
        return torch.zeros(num_experts)
    target = zipf_targets(num_experts, top_k, exponent)
    offsets = target.log()
    for _ in range(steps):
        # A damped fixed point in logit space: it stays sensitive where a share nears 1 (capped).
        step = torch.logit(target) - torch.logit(_selection_probs(offsets, top_k).clamp(1e-12, 1 - 1e-12))
        offsets = offsets + 0.6 * step
        offsets -= offsets.mean()
        if step.abs().max() < 1e-4:
            break
    return offsets.float()


def locality_depth(layer: int, num_layers: int) -> float:
    """The depth profile of routing locality at `layer` (module docstring); a lone layer gets the peak."""
    t = 0.5 if num_layers == 1 else layer / (num_layers - 1)
    (x0, y0), *rest = _LOCALITY_DEPTH
    for x1, y1 in rest:
        if t <= x1:
            return y0 + (y1 - y0) * (t - x0) / (x1 - x0)
        x0, y0 = x1, y1
    return y0


class _RouterSkew:
    """Rewrites the embedding, residual writers, routers (and with locality layer 0's first
    attention head) for `router_skew` and `routing_locality` (module docstring)."""

    def __init__(self, p: Preset, exponent: float, seed: int, locality: float = 0.0) -> None:
        E, H = p.num_experts, p.hidden_size
        ctx = E if locality > 0 else 0
        if E + 1 + ctx > H:
            raise ValueError(f"router_skew / routing_locality need hidden_size > {E + ctx} (it is {H})")
        if locality > 0 and p.qk_norm != "none":
            raise ValueError(f"routing_locality needs a family without q/k norms (qwen2_moe, mixtral), not {p.family}")
        if locality > 0 and p.dim_per_head < E:
            raise ValueError(f"routing_locality needs head_dim >= num_experts ({p.dim_per_head} < {E})")
        gen = torch.Generator().manual_seed(_seed_of(seed, "router_skew"))
        channel = torch.randperm(H, generator=gen)[: E + 1 + ctx]
        self.bias_dim, self.noise_dims, self.ctx_dims = int(channel[0]), channel[1:E + 1], channel[E + 1:]
        self.channel = channel
        self.std, self.seed, self.num_experts, self.num_layers = p.initializer_range, seed, E, p.num_layers
        self.bias_value = _CHANNEL_BIAS * self.std
        # Logits scale as sqrt(H)/|h|, and attention grows |h| past the embedding's std*sqrt(H) by
        # about max(1, std*H): this keeps router logits O(1) (selection itself is scale-free).
        self.scale = _ROUTER_LOGIT_STD * max(1.0, self.std * H)
        self.offsets = zipf_offsets(E, p.top_k, exponent)
        self.locality = locality
        if locality > 0:
            self._plan_window(p, gen)

    def _plan_window(self, p: Preset, gen: torch.Generator) -> None:
        """Layer 0, head 0: score -A*sin((i-j)*theta) on one rotary pair = an exponential recency window.

        Rotary pair f turns (e_f, e_f+d/2) by position*theta: with q on e_f+d/2 and k on e_f, q_i.k_j is
        -|q||k| sin((i-j)*theta), about -|q||k|*theta*(i-j) while (i-j)*theta < pi/2.
        """
        d = p.dim_per_head
        freqs = 1.0 / p.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        slow = [f for f in range(d // 2) if math.pi / freqs[f] >= p.max_position_embeddings]
        self.pair = slow[0] if slow else d // 2 - 1
        theta = float(freqs[self.pair])
        amplitude = _LOCALITY_DECAY / theta
        # Every embedding row has norm std*sqrt(H), so after the input norm the constant coordinate is this:
        normed = math.sqrt(self.std**2 + p.rms_norm_eps)
        self.qk_weight = math.sqrt(amplitude * math.sqrt(d)) / (self.bias_value / normed)  # |q||k| / sqrt(d) = A
        self.value_basis, _ = torch.linalg.qr(torch.randn(self.num_experts, self.num_experts, generator=gen))
        w = torch.exp(-_LOCALITY_DECAY * torch.arange(0, 256, dtype=torch.float64))
        # The window averages values of std std/normed: this gain gives the context the embedding's std again.
        self.out_gain = float(w.sum() / w.pow(2).sum().sqrt() * normed)
        self.head_dim = d

    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        head0 = self.locality > 0 and layer == 0
        d = getattr(self, "head_dim", 0)
        if name == "model.embed_tokens.weight":
            t[:, self.bias_dim] = self.bias_value
            if self.locality > 0:  # no context in the embedding, and one norm for every row
                t[:, self.ctx_dims] = 0.0
                norm = self.std * math.sqrt(t.shape[1])
                free = torch.ones(t.shape[1], dtype=torch.bool)
                free[self.channel[: self.num_experts + 1]] = False
                fixed = t[:, ~free].pow(2).sum(1, keepdim=True)
                t[:, free] *= ((norm**2 - fixed).clamp_min(0) / t[:, free].pow(2).sum(1, keepdim=True)).sqrt()
        elif name.endswith(("o_proj.weight", "down_proj.weight", ".w2.weight")):
            t[self.channel, :] = 0.0
            if head0 and name.endswith("o_proj.weight"):
                t[:, :d] = 0.0  # head 0 writes the context and nothing else
                t[self.ctx_dims, torch.arange(self.num_experts)] = self.out_gain
        elif head0 and name.endswith(("q_proj.weight", "k_proj.weight")):
            t[:d] = 0.0
            t[self.pair + (d // 2 if name.endswith("q_proj.weight") else 0), self.bias_dim] = self.qk_weight
        elif head0 and name.endswith("v_proj.weight"):
            t[:d] = 0.0
            t[: self.num_experts, self.noise_dims] = self.value_basis
        elif name.endswith(".gate.weight"):  # a router (not shared_expert_gate)
            gen = torch.Generator().manual_seed(_seed_of(self.seed, name + ":skew"))
            rank = torch.randperm(self.num_experts, generator=gen)
            basis, _ = torch.linalg.qr(torch.randn(self.num_experts, self.num_experts, generator=gen))
            t.zero_()
            # Orthonormal rows read the N(0, std^2) embedding coordinates: i.i.d. noise of std
            # scale*std per expert; the constant coordinate adds offsets in units of that noise.
            share = self.locality * locality_depth(layer, self.num_layers) if self.locality > 0 else 0.0
            t[:, self.noise_dims] = self.scale * math.sqrt(1 - share) * basis
            if share:
                context, _ = torch.linalg.qr(torch.randn(self.num_experts, self.num_experts, generator=gen))
                t[:, self.ctx_dims] = self.scale * math.sqrt(share) * context
            t[:, self.bias_dim] = self.scale * self.std * self.offsets[rank] / self.bias_value
        return t


def _make_part(name: str, shape: tuple[int, ...], init: str, std: float, seed: int,
               skew: _RouterSkew | None) -> torch.Tensor:
    if init == "ones":
        return torch.ones(shape)
    if init == "zeros":
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(_seed_of(seed, name))
    t = torch.empty(shape).normal_(0.0, std, generator=gen)
    return skew.apply(name, t) if skew is not None else t


def _plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy in order, as HF shards: a shard closes before the tensor that would overflow it."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = spec.nbytes(dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def _write_safetensors(path: Path, specs: list[TensorSpec], dtype: torch.dtype,
                       make: Callable[[str, tuple[int, ...], str], torch.Tensor], bar: tqdm) -> None:
    """Stream tensors into one safetensors file: header first (shapes are known), then bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        n = spec.nbytes(dtype)
        header[spec.name] = {"dtype": _ST_DTYPES[dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header so tensor data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec in specs:
            for part_name, shape in spec.parts:
                t = make(part_name, shape, spec.init).to(dtype).reshape(-1)
                f.write(t.view(torch.uint8).numpy().data)
                bar.update(t.numel() * t.element_size())


def _clear_old_checkpoint(out: Path) -> None:
    # Like save_pretrained, a rewrite replaces the weights: stale shards the new index does not
    # name must go, and so does config.json until the new checkpoint is complete.
    for old in [*out.glob("model*.safetensors"), out / INDEX_FILE, out / "config.json"]:
        old.unlink(missing_ok=True)


def init_checkpoint(
    out_dir: str | Path,
    family: str,
    preset: str | Preset = "tiny",
    layers: int | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    router_skew: float = 0.0,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
    expert_format: str = "per_expert",
    routing_locality: float = 0.0,
) -> Path:
    """Write a random checkpoint of `family`/`preset` into out_dir (replacing one there) and return it.

    dtype None takes the preset's (tiny: float32, real shapes: bfloat16); layers keeps the first
    N layers; router_skew is the Zipf exponent of expert popularity, routing_locality in [0, 1) the
    share of router logits that follows the last few tokens at the most local layer (module docstring). `preset` may
    also be a Preset of `family` (a custom shape).
    """
    if isinstance(preset, Preset):
        if preset.family != family:
            raise ValueError(f"preset of family {preset.family!r} given for family {family!r}")
        p, preset = preset.with_layers(layers), "custom"
    else:
        p = get_preset(family, preset).with_layers(layers)
    dtype_name = _dtype_name(dtype or p.dtype)
    torch_dtype = DTYPES[dtype_name]
    if router_skew < 0 or not math.isfinite(router_skew):
        raise ValueError(f"router_skew must be a finite number >= 0, got {router_skew}")
    if not 0 <= routing_locality < 1:
        raise ValueError(f"routing_locality must be in [0, 1), got {routing_locality}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if sys.byteorder != "little":
        raise RuntimeError("safetensors is little-endian; writing on a big-endian host is not supported")
    specs = tensor_specs(p, expert_format)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_old_checkpoint(out)

    skew = _RouterSkew(p, router_skew, seed, routing_locality) if router_skew > 0 or routing_locality > 0 else None

    def make(name: str, shape: tuple[int, ...], init: str) -> torch.Tensor:
        return _make_part(name, shape, init, p.initializer_range, seed, skew)

    shards = _plan_shards(specs, torch_dtype, max_shard_bytes)
    total = sum(s.nbytes(torch_dtype) for s in specs)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {out.name}",
              disable=not progress or total < PROGRESS_MIN_BYTES) as bar:
        for file, shard in zip(names, shards):
            _write_safetensors(out / file, shard, torch_dtype, make, bar)
    if len(shards) > 1:
        weight_map = {spec.name: file for file, shard in zip(names, shards) for spec in shard}
        params = sum(math.prod(s.shape) for s in specs)
        index = {"metadata": {"total_parameters": params, "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / INDEX_FILE, index)

    ids = write_tokenizer_files(out, p.vocab_size)
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    bos = None if family == "olmoe" else eot  # OLMoE ships no bos; the Qwen-style vocab's bos is endoftext
    _write_json(out / "generation_config.json",
                {"bos_token_id": bos, "eos_token_id": [im_end, eot], "pad_token_id": eot})
    # config.json last: its presence marks a complete checkpoint (the Makefile keys on it).
    _write_json(out / "config.json", p.hf_config(dtype_name, bos=bos, eos=im_end, pad=eot))
    logger.info("wrote %s %s (%d layers, %.1f MiB, %d file(s)) to %s",
                family, preset, p.num_layers, total / 2**20, len(shards), out)
    return out


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return name


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
