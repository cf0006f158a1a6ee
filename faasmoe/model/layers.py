"""Stateless math of the trunk: RMSNorm, rotary embeddings, SwiGLU, attention over a KV cache.

Written to reproduce the Hugging Face reference operation for operation (norms in fp32 then
cast back, RoPE tables from fp32 positions), so logits match it to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from faasmoe.model.kernels import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 like the reference."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [N, head_dim] for token positions [N]."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim] by the per-token tables (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) with gate and up fused in one [2I, H] matrix."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


# Grouped-query attention without copying k/v per query head (torch >= 2.5).
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """One sequence: q [heads, t, d] attends to k/v [kv_heads, past + t, d] causally.

    Inputs go to SDPA as contiguous [1, heads, t, d]: with 3-D or strided inputs the CPU backend
    takes its math path and materialises the t x t scores (13x slower at 4000 tokens).
    """
    t, total = q.shape[1], k.shape[1]
    gqa = q.shape[0] != k.shape[0]
    if gqa and not _SDPA_GQA:  # repeat kv heads as the reference does
        groups = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        gqa = False
    q, k, v = q.unsqueeze(0).contiguous(), k.unsqueeze(0).contiguous(), v.unsqueeze(0).contiguous()
    extra = {"enable_gqa": True} if gqa else {}
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, **extra)[0]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)[0]
    # Chunked prefill on top of a cache: query i sees keys up to past + i.
    allowed = torch.arange(total, device=q.device)[None, :] <= (past + torch.arange(t, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **extra)[0]
