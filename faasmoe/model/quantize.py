"""Write a quantized copy of a checkpoint in the formats users download: fine-grained FP8, GPTQ and AWQ 4-bit.

What `faasmoe model init --quantize` runs, so tests and demos need no download. Like the published
checkpoints, every linear of the decoder layers is quantized (attention projections, routed and shared
experts, dense MLPs); embeddings, norms, routers and the LM head stay as they were. The quantizers are the
plain round-to-nearest ones (GPTQ's and AWQ's error-correcting searches change which codes are written, not
the format); `desc_act` orders GPTQ's groups by column norm, as act-order does by the Hessian's diagonal.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from faasmoe.model.checkpoint import CheckpointReader
from faasmoe.model.quantized import AWQ_ORDER

METHODS = ("fp8", "gptq-int4", "awq-int4")
FP8_MAX = 448.0  # largest finite e4m3 value
FP8_BLOCK = (128, 128)
GROUP_SIZES = (128, 64, 32)  # the first that divides every quantized matrix's input size is used

_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_expert\.)?(gate|up|down)_proj"
                     r"|mlp\.experts\.\d+\.(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight$")
_FUSED = ("experts.gate_up_proj", "experts.down_proj")
# Linears that read the same input (so GPTQ's act order, from that input's Hessian, is the same for them).
_INPUT = re.compile(r"^(.*\.)(?:[qkv]_proj|gate_proj|up_proj|w1|w3)$")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt",
           "special_tokens_map.json", "chat_template.jinja")


def quantized_linears(names: list[str], method: str = "fp8") -> list[str]:
    """The weights a quantized checkpoint stores quantized. Fused expert tensors ([E, 2I, H] gate_up_proj and
    [E, H, I] down_proj) only for fp8, as transformers' fine-grained FP8 stores them (each expert's matrix in
    128x128 blocks, `<name>_scale_inv` [E, row blocks, column blocks]); GPTQ and AWQ have no fused layout."""
    fused = [n for n in names if n.endswith(_FUSED)]
    if fused and method != "fp8":
        raise ValueError(f"{method} has no fused expert layout; this checkpoint fuses its experts ({fused[0]})")
    return [n for n in names if _LINEAR.match(n)] + fused


def quantize_checkpoint(src: str | Path, dst: str | Path, method: str, group_size: int | None = None,
                        desc_act: bool = False, sym: bool = True) -> Path:
    """Write `src` quantized with `method` (one of METHODS) into `dst`; returns dst. group_size None: the
    largest of 128, 64, 32 that divides every quantized matrix's input size (4-bit only)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    src, dst = Path(src), Path(dst)
    reader = CheckpointReader(src)
    try:
        names = reader.names()
        linears = set(quantized_linears(names, method))
        if method != "fp8":
            group_size = group_size or _common_group(reader, linears)
            uneven = sorted({k for k in (reader.shape(n)[1] for n in linears) if k % group_size})
            if uneven:
                raise ValueError(f"group size {group_size} does not divide the input sizes {uneven}")
        out: dict[str, torch.Tensor] = {}
        orders: dict[str, torch.Tensor] = {}  # act order per input: q/k/v alike, gate/up alike (one Hessian)
        for name in sorted(names):
            tensor = reader.tensor(name)
            if name not in linears:
                out[name] = tensor
                continue
            prefix = name.removesuffix(".weight")
            if name.endswith(_FUSED):  # fp8 only: each expert's matrix quantized alone
                quantized = [quantize_fp8(expert.float()) for expert in tensor]
                out[name] = torch.stack([weight for weight, _ in quantized])
                out[f"{name}_scale_inv"] = torch.stack([scale for _, scale in quantized])
            elif method == "fp8":
                weight, scale = quantize_fp8(tensor.float())
                out[name], out[f"{prefix}.weight_scale_inv"] = weight, scale
            else:
                order = None
                if desc_act and method == "gptq-int4":
                    key = _INPUT.sub(r"\1", prefix)
                    order = orders.setdefault(key, torch.argsort(tensor.float().norm(dim=0), descending=True,
                                                                 stable=True))
                q, scale, zero, g_idx = quantize_int4(tensor.float(), group_size, sym=sym and method == "gptq-int4",
                                                      order=order, min_zero=1 if method == "gptq-int4" else 0)
                if method == "gptq-int4":
                    out[f"{prefix}.qweight"] = pack_words(q.t(), along_rows=True)
                    out[f"{prefix}.qzeros"] = pack_words(zero - 1)  # the original gptq format stores zero - 1
                    out[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
                else:
                    out[f"{prefix}.qweight"] = pack_words(q.t(), order=AWQ_ORDER)
                    out[f"{prefix}.qzeros"] = pack_words(zero, order=AWQ_ORDER)
                out[f"{prefix}.scales"] = scale
    finally:
        reader.close()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(method, group_size, desc_act, sym)
    dst.mkdir(parents=True, exist_ok=True)
    for stale in list(dst.glob("*.safetensors")) + list(dst.glob("*.safetensors.index.json")):
        stale.unlink()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for file in _COPIED:
        if (src / file).exists():
            shutil.copyfile(src / file, dst / file)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # last: marks a complete checkpoint
    return dst


def quantization_config(method: str, group_size: int | None, desc_act: bool, sym: bool) -> dict:
    """The `quantization_config` each format's checkpoints carry."""
    if method == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(FP8_BLOCK)}
    if method == "gptq-int4":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True, "static_groups": False}
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def _common_group(reader: CheckpointReader, linears: set[str]) -> int:
    sizes = {reader.shape(n)[1] for n in linears}
    for group in GROUP_SIZES:
        if all(k % group == 0 for k in sizes):
            return group
    raise ValueError(f"no group size of {GROUP_SIZES} divides every input size {sorted(sizes)}")


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale per block) with w ~= weight * scale, each block scaled to e4m3's range."""
    n, k = w.shape
    rows, cols = -(-n // block[0]), -(-k // block[1])
    padded = torch.zeros(rows * block[0], cols * block[1])
    padded[:n, :k] = w
    blocks = padded.view(rows, block[0], cols, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:n, :k].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.float()


def quantize_int4(w: torch.Tensor, group: int, sym: bool, order: torch.Tensor | None = None, min_zero: int = 0):
    """Round-to-nearest 4-bit codes of w [N, K] per group of input columns: (codes [N, K], fp16 scales
    [K/g, N], zeros [K/g, N] (int), g_idx [K]). `order`: the columns' order of grouping (act order)."""
    n, k = w.shape
    order = torch.arange(k) if order is None else order
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[order] = torch.arange(k) // group
    grouped = w[:, order].view(n, k // group, group)
    if sym:
        top = grouped.abs().amax(-1)
        scale = (2 * top / 15).clamp(min=1e-8).half()
        zero = torch.full_like(top, 8, dtype=torch.long)
    else:
        low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=1e-8).half()
        zero = torch.round(-low / scale.float()).long().clamp(min_zero, 15)
    codes = torch.clamp(torch.round(grouped / scale.float()[..., None]) + zero[..., None], 0, 15).long()
    codes = torch.empty_like(codes.view(n, k)).index_copy_(1, order, codes.view(n, k))
    return codes, scale.t().contiguous(), zero.t().contiguous(), g_idx


def pack_words(values: torch.Tensor, along_rows: bool = False, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """4-bit values [R, C] into int32 words of eight: along rows ([R/8, C], word [r, c] = rows 8r.. of c), else
    along columns ([R, C/8]), nibble i = column 8c + order[i] (order: 0..7 unless given)."""
    v = values.long() & 0xF
    if along_rows:
        v = v.view(-1, 8, v.shape[1]).transpose(1, 2)  # [R/8, C, 8]
    else:
        v = v.view(v.shape[0], -1, 8)
        if order is not None:
            v = v[..., list(order)]
    words = (v << (4 * torch.arange(8))).sum(-1)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)
