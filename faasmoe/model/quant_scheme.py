"""The quantization a checkpoint declares (`quantization_config` in its config.json), checked once.

Three schemes, as the MoE checkpoints people download ship them:

* ``fp8``: fine-grained FP8 (DeepSeek-V3, Qwen3-*-FP8): e4m3 weights, one float32 `weight_scale_inv` per
  `weight_block_size` block (128x128); the weight is `fp8 * weight_scale_inv`.
* ``gptq``: 4-bit codes packed along the input dim (`qweight` [K/8, N] int32), per group of `group_size`
  input columns a fp16 scale and a 4-bit zero (`qzeros`, stored minus one in the original "gptq" format);
  `desc_act` groups columns by activation order (`g_idx`).
* ``awq``: the GEMM layout: codes packed along the output dim in AWQ's interleaved order (`qweight` [K, N/8]),
  zeros likewise, fp16 scales; always with zero points.

Anything else (another method, bit width or packing) is refused with its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED = "fp8 (with weight_block_size), gptq (4-bit), awq (4-bit, GEMM)"


class QuantizationError(ValueError):
    """A quantization_config we cannot serve: names the key and what is supported."""


@dataclass(frozen=True)
class QuantScheme:
    method: str  # "fp8" | "gptq" | "awq"
    bits: int = 8
    group_size: int = 0  # 4-bit: input columns per scale (-1 in a config: the whole row)
    block: tuple[int, int] = (0, 0)  # fp8: (output rows, input columns) per scale
    desc_act: bool = False  # gptq: columns grouped in activation order (g_idx)
    sym: bool = True
    zero_offset: int = 0  # added to a stored zero: 1 for the original gptq format (stored zero - 1)

    @classmethod
    def from_config(cls, raw: dict[str, Any] | None) -> QuantScheme | None:
        """The scheme a config.json's `quantization_config` names (None: an unquantized checkpoint)."""
        if not raw:
            return None
        if not isinstance(raw, dict):
            raise QuantizationError("quantization_config must be an object")
        method = str(raw.get("quant_method", "")).lower()
        if method == "fp8":
            block = raw.get("weight_block_size")
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise QuantizationError(f"fp8 needs weight_block_size [rows, cols] (fine-grained FP8), got {block!r}; "
                                        "per-tensor FP8 is not supported")
            fmt = str(raw.get("fmt", "e4m3")).lower()
            if fmt != "e4m3":
                raise QuantizationError(f"fp8 fmt {fmt!r} is not supported (only e4m3)")
            return cls("fp8", 8, block=(block[0], block[1]))
        if method in ("gptq", "awq"):
            bits = raw.get("bits", raw.get("w_bit"))
            if bits != 4:
                raise QuantizationError(f"{method} with bits={bits!r} is not supported (only 4-bit)")
            group = int(raw.get("group_size", raw.get("q_group_size", 128)))
            if group == 0 or group < -1:
                raise QuantizationError(f"{method} group_size {group} is not valid (-1 or a positive size)")
            if method == "awq":
                version = str(raw.get("version", "gemm")).lower()
                if version != "gemm":
                    raise QuantizationError(f"awq version {version!r} is not supported (only the GEMM layout)")
                if not raw.get("zero_point", True):
                    raise QuantizationError("awq without zero_point is not supported")
                return cls("awq", 4, group, sym=False)
            fmt = str(raw.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise QuantizationError(f"gptq checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
            return cls("gptq", 4, group, desc_act=bool(raw.get("desc_act", False)), sym=bool(raw.get("sym", True)),
                       zero_offset=1 if fmt == "gptq" else 0)
        raise QuantizationError(f"quant_method {method!r} is not supported (supported: {SUPPORTED})")

    def group_of(self, in_features: int) -> int:
        """Input columns per scale for a matrix of `in_features` columns."""
        return in_features if self.group_size == -1 else self.group_size

    def matrix_bytes(self, out_features: int, in_features: int, dtype: torch.dtype, scale_rows: int | None = None,
                     words: bool = False) -> int:
        """Bytes one [out, in] matrix holds once read (`faasmoe.model.quantized`): what a worker's budget counts.
        `scale_rows`: fp8 scale rows when they differ from one per block (a fused gate_up of odd size). `words`:
        4-bit matrices are held in their checkpoint's words (faasmoe.model.quantized.words_held)."""
        if self.method == "fp8":
            rows = math.ceil(out_features / self.block[0]) if scale_rows is None else scale_rows
            return out_features * in_features + rows * math.ceil(in_features / self.block[1]) * 4
        group = self.group_of(in_features)
        groups = in_features // group
        if words:  # qweight, qzeros and (fp16) scales as stored
            return out_features * in_features // 2 + groups * out_features // 2 + 2 * groups * out_features
        perm = in_features * 8 if self.desc_act and groups > 1 else 0  # one group has no order to keep
        return out_features * in_features // 2 + 2 * groups * out_features * dtype.itemsize + perm

    def expert_bytes(self, hidden: int, inter: int, dtype: torch.dtype, words: bool = False) -> int:
        """Bytes of one routed expert as held: gate and up fused in one [2I, H] matrix, down [H, I]."""
        scale_rows = None
        if self.method == "fp8" and inter % self.block[0]:  # the fused rows keep one scale row each
            scale_rows = 2 * inter
        return (self.matrix_bytes(2 * inter, hidden, dtype, scale_rows, words)
                + self.matrix_bytes(hidden, inter, dtype, words=words))
