"""Quantized weight matrices: read from a checkpoint's tensors, held quantized, multiplied from that form.

A matrix W [N, K] (y = x @ W.T) of a quantized checkpoint (`faasmoe.model.quant_scheme`) becomes one of:

* `Fp8Matrix`: the e4m3 bytes and the checkpoint's block scales, as they lie in the file (1 byte a weight).
* `Int4Words`: a GPTQ or AWQ matrix as the file holds it (qweight, qzeros, scales: 0.5 byte a weight and its
  group's scale and zero), multiplied from those words by csrc/int4_linear.c: a cold start converts nothing.
  A gate and an up projection of an expert stay two such matrices under one `StackedMatrix`.
* `Int4Matrix`: GPTQ and AWQ alike, unpacked from their layouts into one: two 4-bit codes a byte, and per
  group of input columns a scale and a zero in the float domain, W = (q - 8) * scale + zero (0.5 byte a
  weight). GPTQ's activation order becomes a permutation of x's columns, so groups are contiguous. The form of
  an act-order matrix, and of every 4-bit matrix where the C kernel cannot be built (no compiler,
  FAASMOE_NATIVE=0).
* `Int4PackedMatrix`: an Int4Matrix in the layout of torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`),
  the same bytes; made by `pack_int4` where the kernel takes the shape.

Every form multiplies without a dense copy of the whole matrix on the CPU: `Fp8Matrix` and `Int4Matrix`
dequantize one cache-sized chunk of rows at a time into fp32 (as `kernels.linear` widens bf16 on CPUs without
native bf16), rounded to the compute dtype first, so they multiply exactly the weights a dequantized checkpoint
holds; the int4 kernel reads the codes directly, with scale and zero in the compute dtype (in bf16 one rounding
more than the reference's). The C kernels use the checkpoint's weights unrounded: `Int4Words` (q - z) * s in
fp32, `Fp8Matrix` at decode sizes fp8 * scale (one block's sums scaled at once) - within one bf16 rounding of a
bf16 reference's weights, and nearer the checkpoint's own. Other devices dequantize the matrix per call and use
F.linear.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from faasmoe.model.quant_scheme import QuantizationError, QuantScheme

CHUNK_ROWS = 512  # rows dequantized at once: 512 x 2048 fp32 = 4 MiB, stays in cache
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel takes


@dataclass(frozen=True)
class Fp8Matrix:
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [ceil(N / block[0]), ceil(K / block[1])]: the checkpoint's weight_scale_inv
    block: tuple[int, int]
    dtype: torch.dtype  # the compute dtype

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale.nbytes

    def to(self, device: torch.device | str) -> Fp8Matrix:
        return Fp8Matrix(self.weight.to(device), self.scale.to(device), self.block, self.dtype)

    @cached_property
    def kernel_scale(self) -> torch.Tensor | None:
        """The scales times 2^120 as csrc/fp8_linear.c takes them, made once; None where one cannot take it."""
        up = (self.scale * _E4M3_SHIFT).contiguous()
        return up if torch.isfinite(up).all() else None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop dequantized, in fp32, rounded to the compute dtype's precision."""
        rows, cols = self.block
        k = self.weight.shape[1]
        scale = self.scale[start // rows: (stop - 1) // rows + 1]
        w, scale = widen_e4m3(self.weight[start:stop], scale)
        if start % rows == 0 and (stop - start) % rows == 0 and k % cols == 0:  # whole blocks: scale in place
            w.view(-1, rows, k // cols, cols).mul_(scale[:, None, :, None])
        else:
            scale = scale.repeat_interleave(rows, 0)[start % rows:][: stop - start]
            w.mul_(scale.repeat_interleave(cols, 1)[:, :k])
        return w if self.dtype == torch.float32 else w.to(self.dtype).float()

    def dequantize(self) -> torch.Tensor:
        return self.rows(0, self.weight.shape[0]).to(self.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if x.device.type == "cpu" and flat.shape[0] <= FP8_KERNEL_ROWS:
            out = _fp8_kernel_matmul(self, flat)
            if out is not None:
                return out.to(x.dtype).reshape(*x.shape[:-1], self.shape[0])
        return _chunked_matmul(x, self.shape[0], self.rows, self.dequantize)


@dataclass(frozen=True)
class Int4Matrix:
    codes: torch.Tensor  # uint8 [N, K / 2]: column 2j in the low nibble, 2j + 1 in the high one
    scales: torch.Tensor  # [K / group, N], compute dtype
    zeros: torch.Tensor  # [K / group, N], compute dtype: W = (q - 8) * scale + zero
    group_size: int
    perm: torch.Tensor | None  # [K] int64: the codes' column j is x's column perm[j] (GPTQ act order)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], 2 * self.codes.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes + (0 if self.perm is None else self.perm.nbytes)

    def to(self, device: torch.device | str) -> Int4Matrix:
        perm = None if self.perm is None else self.perm.to(device)
        return Int4Matrix(self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.group_size, perm)

    def unpacked_codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Codes of rows start..stop as uint8 [rows, K]."""
        packed = self.codes[start:stop]
        return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        q = self.unpacked_codes(start, stop).float() - 8
        scale = self.scales[:, start:stop].t().float().repeat_interleave(self.group_size, 1)
        zero = self.zeros[:, start:stop].t().float().repeat_interleave(self.group_size, 1)
        w = q * scale + zero
        return w if self.dtype == torch.float32 else w.to(self.dtype).float()

    def dequantize(self) -> torch.Tensor:
        """W [N, K] in the compute dtype, columns in x's order."""
        w = self.rows(0, self.shape[0]).to(self.dtype)
        return w if self.perm is None else torch.empty_like(w).index_copy_(1, self.perm, w)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        xs = x if self.perm is None else x.index_select(-1, self.perm)
        return _chunked_matmul(xs, self.shape[0], self.rows, lambda: self.rows(0, self.shape[0]).to(self.dtype))


@dataclass(frozen=True)
class Int4PackedMatrix:
    packed: torch.Tensor  # torch's CPU int4 layout, uint8 [N, K / 2]
    scales_zeros: torch.Tensor  # [K / group, N, 2], compute dtype
    group_size: int
    perm: torch.Tensor | None
    shape: tuple[int, int]

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_zeros.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes + (0 if self.perm is None else self.perm.nbytes)

    def to(self, device: torch.device | str) -> Int4PackedMatrix:
        if torch.device(device).type != "cpu":
            raise ValueError("a matrix packed for the CPU's int4 kernel cannot move to another device")
        return self

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        xs = x if self.perm is None else x.index_select(-1, self.perm)
        flat = xs.reshape(-1, xs.shape[-1]).to(self.dtype).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_zeros)
        return out.reshape(*x.shape[:-1], self.shape[0]).to(x.dtype)


@dataclass(frozen=True)
class Int4Words:
    """A GPTQ or AWQ matrix held in the words its checkpoint stores: qweight, qzeros and scales as read, nothing
    converted at load (a cold start costs the read alone), multiplied from them by csrc/int4_linear.c. Elsewhere
    (another device) it is unpacked into an Int4Matrix per call."""

    words: torch.Tensor  # int32: GPTQ [K / 8, N], AWQ [K, N / 8]
    qzeros: torch.Tensor  # int32 [K / group, N / 8]
    scales: torch.Tensor  # [K / group, N], fp16 as stored (fp32 and bf16 are taken too)
    scheme: QuantScheme
    dtype: torch.dtype  # the compute dtype
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.qzeros.nbytes + self.scales.nbytes

    def to(self, device: torch.device | str) -> Int4Words:
        return Int4Words(self.words.to(device), self.qzeros.to(device), self.scales.to(device), self.scheme,
                         self.dtype, self.shape)

    def codes(self) -> Int4Matrix:
        return _int4_codes(self.scheme, self.words, self.qzeros, self.scales, None, self.shape, self.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.codes().dequantize()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = _words_matmul((self,), x)
        return self.codes().matmul(x) if out is None else out

    def matmul_into(self, flat: torch.Tensor, out: torch.Tensor, column: int) -> bool:
        """out[:, column:column + N] = flat @ W.T (flat contiguous fp32 on the CPU, out fp32 with unit column
        stride); False where the kernel is not built here."""
        fn = _int4_linear()
        if fn is None:
            return False
        (n, k), group = self.shape, self.scheme.group_of(self.shape[1])
        code = fn(flat.data_ptr(), flat.shape[0], k, self.words.data_ptr(), int(self.scheme.method == "awq"),
                  self.qzeros.data_ptr(), self.scheme.zero_offset if self.scheme.method == "gptq" else 0,
                  self.scales.data_ptr(), _KERNEL_SCALES[self.scales.dtype], group, 0, n, n,
                  out.data_ptr() + column * out.element_size(), out.stride(0))
        return code == 0


@dataclass(frozen=True)
class StackedMatrix:
    """Matrices stacked along their output rows without copying them (a gate and an up projection held as
    their checkpoint's words): one output, each part's columns written in place."""

    parts: tuple[Int4Words, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def to(self, device: torch.device | str) -> StackedMatrix:
        return StackedMatrix(tuple(p.to(device) for p in self.parts))

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = _words_matmul(self.parts, x)
        return torch.cat([p.matmul(x) for p in self.parts], dim=-1) if out is None else out


def _words_matmul(parts: tuple[Int4Words, ...], x: torch.Tensor) -> torch.Tensor | None:
    """x @ [W_1; W_2; ...].T by csrc/int4_linear.c, each part's columns written in place into one output; None
    off the CPU or where the kernel is not built."""
    if x.device.type != "cpu":
        return None
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    n = sum(p.shape[0] for p in parts)
    out, column = torch.empty(flat.shape[0], n, dtype=torch.float32), 0
    for part in parts:
        if not part.matmul_into(flat, out, column):
            return None
        column += part.shape[0]
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


QuantizedMatrix = Fp8Matrix | Int4Matrix | Int4PackedMatrix | Int4Words | StackedMatrix

# scale dtypes csrc/int4_linear.c reads, and its code for each
_KERNEL_SCALES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _int4_linear():
    from faasmoe.model import native

    p, i = ctypes.c_void_p, ctypes.c_int
    return native.kernel("int4_linear", "int4_linear", [p, i, i, p, i, p, i, p, i, i, i, i, i, p, i])


def words_held(scheme: QuantScheme) -> bool:
    """Whether this scheme's 4-bit matrices are held as their checkpoint's words (Int4Words): GPTQ without
    activation order and AWQ, where csrc/int4_linear.c builds. Else they are unpacked at load into an Int4Matrix
    and packed for torch's int4 kernel. The one rule the loader, the budget and `from_stored` follow."""
    return scheme.method in ("gptq", "awq") and not scheme.desc_act and _int4_linear() is not None


_E4M3_SHIFT = 2.0**120  # fp32's exponent bias (127) less e4m3's (7)
_FP32_SIGN_EXP_MANT = -0x78100000  # 0x87F00000 as int32: the sign bit and the 7 bits an e4m3 value moves into


def widen_e4m3(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weights as fp32 and the scales to multiply them by, the product exactly weight.float() * scale.

    torch converts float8 to float one element at a time (~7 ns each on an AVX2 core); this moves the bits
    instead, in three vectorised passes: the byte read as int8 and widened to int32 (the sign fills the top
    bits), shifted so that e4m3's exponent and mantissa bits sit where fp32 keeps them, the bits between
    masked off. That reads as 2^-120 times the value (subnormals too, as fp32 subnormals), and 2^120 goes
    into the scales, a power of two that changes no rounding. Where a scale is too large to take it (never
    in a real checkpoint: scales are max|W| / 448), the slow exact conversion. e4m3fn's NaN (0x7F, 0xFF)
    would read as 480: no weight is one."""
    up = scale * _E4M3_SHIFT
    if not torch.isfinite(up).all() or weight.device.type != "cpu":
        return weight.float(), scale.clone()
    bits = weight.view(torch.int8).to(torch.int32)
    bits.bitwise_left_shift_(20).bitwise_and_(_FP32_SIGN_EXP_MANT)  # s eeee mmm -> s 0000 eeee mmm, 20 zero bits
    return bits.view(torch.float32), up


# up to here the kernel (a 2816x2048 matrix on one AVX2 core: 1 row 0.7 ms, 17 rows 5.1, 64 rows 18.9 against 17.6
# dequantized by chunks)
FP8_KERNEL_ROWS = 48


def _fp8_kernel_matmul(m: Fp8Matrix, flat: torch.Tensor) -> torch.Tensor | None:
    """x [rows, K] @ W.T through csrc/fp8_linear.c (a byte a weight read, widened in registers), or None
    where the kernel cannot be built here or does not take this matrix."""
    fn = _fp8_linear()
    if fn is None or m.kernel_scale is None or not m.weight.is_contiguous():
        return None
    (n, k), (rows, cols) = m.shape, m.block
    x = flat.float().contiguous()
    out = torch.empty(flat.shape[0], n, dtype=torch.float32)
    if fn(x.data_ptr(), x.shape[0], k, m.weight.data_ptr(), 0, n, n, m.kernel_scale.data_ptr(), rows, cols,
          int(m.dtype != torch.float32), out.data_ptr()) != 0:  # -1: a block wider than the kernel takes
        return None
    return out


def _fp8_linear():
    from faasmoe.model import native

    p, i = ctypes.c_void_p, ctypes.c_int
    return native.kernel("fp8_linear", "fp8_linear", [p, i, i, p, i, i, i, p, i, i, i, p])


def _chunked_matmul(x: torch.Tensor, n: int, rows, whole) -> torch.Tensor:
    """x @ W.T with W's rows made `CHUNK_ROWS` at a time by `rows(start, stop)` (fp32) on the CPU; elsewhere
    the whole matrix once (`whole()`, compute dtype) and F.linear."""
    if x.device.type != "cpu":
        return F.linear(x, whole().to(x.dtype))
    flat = x.reshape(-1, x.shape[-1]).float()
    out = torch.empty(flat.shape[0], n, dtype=torch.float32)
    for start in range(0, n, CHUNK_ROWS):
        stop = min(n, start + CHUNK_ROWS)
        torch.mm(flat, rows(start, stop).t(), out=out[:, start:stop])
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def packable(m: QuantizedMatrix) -> bool:
    """Whether `pack_int4` changes m: an Int4Matrix on the CPU of a shape and dtype the int4 kernel takes."""
    if not isinstance(m, Int4Matrix) or m.codes.device.type != "cpu":
        return False
    n, k = m.shape
    return (n % 16 == 0 and m.group_size in INT4_KERNEL_GROUPS and k % m.group_size == 0
            and m.dtype in (torch.float32, torch.bfloat16, torch.float16))


def pack_int4(m: QuantizedMatrix) -> QuantizedMatrix:
    """An Int4Matrix in the CPU int4 kernel's layout where the kernel takes its shape and dtype (else itself)."""
    if not packable(m):
        return m
    n, k = m.shape
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(m.unpacked_codes().to(torch.int32).contiguous(), 2)
    return Int4PackedMatrix(packed, torch.stack((m.scales, m.zeros), dim=-1).contiguous(), m.group_size, m.perm,
                            (n, k))


def fuse_rows(first: QuantizedMatrix, second: QuantizedMatrix) -> QuantizedMatrix:
    """[first; second] stacked along the output rows (a gate and an up projection: one matmul for both)."""
    if isinstance(first, Fp8Matrix) and isinstance(second, Fp8Matrix):
        a, b = first, second
        if a.shape[0] % a.block[0]:  # a partial last block: give every row its own scale row
            a, b = per_row_scales(a), per_row_scales(b)
        return Fp8Matrix(_stacked(a.weight, b.weight), torch.cat((a.scale, b.scale)), a.block, a.dtype)
    if isinstance(first, Int4Words) and isinstance(second, Int4Words):
        return StackedMatrix((first, second))
    if isinstance(first, Int4Matrix) and isinstance(second, Int4Matrix):
        if (first.perm is None) != (second.perm is None) or (first.perm is not None and
                                                             not torch.equal(first.perm, second.perm)):
            raise QuantizationError("a gate and an up projection quantized in different column orders (g_idx) "
                                    "cannot be fused")
        return Int4Matrix(_stacked(first.codes, second.codes), torch.cat((first.scales, second.scales), 1),
                          torch.cat((first.zeros, second.zeros), 1), first.group_size, first.perm)
    raise TypeError(f"cannot fuse {type(first).__name__} with {type(second).__name__}")


def _stacked(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """[top; bottom]: one tensor over their bytes when they lie next to each other in one buffer (read there
    by `rows_buffer`'s halves), else a copy."""
    if top.dtype == bottom.dtype and top.is_contiguous() and bottom.is_contiguous() and top.device == bottom.device \
            and top.shape[1:] == bottom.shape[1:] \
            and top.untyped_storage().data_ptr() == bottom.untyped_storage().data_ptr() \
            and top.data_ptr() + top.nbytes == bottom.data_ptr():
        shape = (top.shape[0] + bottom.shape[0], *top.shape[1:])
        return torch.empty(0, dtype=top.dtype, device=top.device).set_(top.untyped_storage(), top.storage_offset(),
                                                                       shape)
    return torch.cat((top, bottom))


def rows_buffer(scheme: QuantScheme, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """One buffer for the codes of matrices stacked along their rows (a gate and an up projection), cut
    into each one's `out` for `from_stored`: they are read or converted into place and `fuse_rows` takes
    the whole without copying them again."""
    cols = shapes[0][1] if scheme.method == "fp8" else shapes[0][1] // 2
    whole = torch.empty(sum(n for n, _ in shapes), cols, dtype=torch.uint8)
    return list(whole.split([n for n, _ in shapes]))


def per_row_scales(m: Fp8Matrix) -> Fp8Matrix:
    n = m.weight.shape[0]
    return Fp8Matrix(m.weight, m.scale.repeat_interleave(m.block[0], 0)[:n].contiguous(), (1, m.block[1]), m.dtype)


# --- reading a checkpoint's tensors -------------------------------------------------------

def stored_suffixes(scheme: QuantScheme) -> tuple[str, ...]:
    """The tensors one quantized linear `P` is stored as: `P.<suffix>` each."""
    return {"fp8": ("weight", "weight_scale_inv"), "gptq": ("qweight", "qzeros", "scales", "g_idx"),
            "awq": ("qweight", "qzeros", "scales")}[scheme.method]


def stored_names(has, scheme: QuantScheme | None, weight_name: str) -> list[str]:
    """The checkpoint tensors that hold the weight `P.weight`: itself when stored plain, else its quantized
    parts (a GPTQ checkpoint may lack g_idx). `has(name)` says whether the checkpoint holds a tensor."""
    if scheme is None or not weight_name.endswith(".weight"):
        return [weight_name]
    prefix = weight_name.removesuffix(".weight")
    if scheme.method == "fp8":
        return [weight_name, f"{prefix}.weight_scale_inv"] if has(f"{prefix}.weight_scale_inv") else [weight_name]
    if not has(f"{prefix}.qweight"):
        return [weight_name]
    return [f"{prefix}.{s}" for s in stored_suffixes(scheme) if has(f"{prefix}.{s}")]


def from_stored(scheme: QuantScheme, tensors: dict[str, torch.Tensor], shape: tuple[int, int],
                dtype: torch.dtype, name: str = "", out: torch.Tensor | None = None) -> QuantizedMatrix:
    """The matrix [N, K] = `shape` from its stored tensors (suffix -> tensor as the file holds it), checked.
    Its codes go into `out` (uint8 [N, K] for fp8, [N, K / 2] for 4 bits) when given; an fp8 weight may
    already be there (read into it)."""
    n, k = shape
    if scheme.method == "fp8":
        weight, scale = tensors["weight"], tensors["weight_scale_inv"]
        rows, cols = scheme.block
        expect = (math.ceil(n / rows), math.ceil(k / cols))
        if weight.dtype != torch.float8_e4m3fn or tuple(weight.shape) != shape or tuple(scale.shape) != expect:
            raise QuantizationError(f"{name}: fp8 weight {weight.dtype} {list(weight.shape)} with scales "
                                    f"{list(scale.shape)}; expected float8_e4m3fn {list(shape)} and {list(expect)}")
        if out is not None:
            out = out.view(torch.float8_e4m3fn)
            if out.data_ptr() != weight.data_ptr():
                out.copy_(weight)
            weight = out
        return Fp8Matrix(weight, scale.float(), scheme.block, dtype)
    group = scheme.group_of(k)
    if k % group or k % 8 or n % 8:
        raise QuantizationError(f"{name}: a [{n}, {k}] matrix does not split in groups of {group} and words of 8")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or not scales.dtype.is_floating_point:
        raise QuantizationError(f"{name}: {scheme.method} wants int32 qweight and qzeros and float scales, got "
                                f"{qweight.dtype}, {qzeros.dtype}, {scales.dtype}")
    packed_shape = (k // 8, n) if scheme.method == "gptq" else (k, n // 8)
    if tuple(qweight.shape) != packed_shape or tuple(qzeros.shape) != (k // group, n // 8) or \
            tuple(scales.shape) != (k // group, n):
        raise QuantizationError(f"{name}: {scheme.method} tensors qweight {list(qweight.shape)}, qzeros "
                                f"{list(qzeros.shape)}, scales {list(scales.shape)} do not fit a [{n}, {k}] matrix "
                                f"in groups of {group}")
    perm = _act_order(tensors.get("g_idx"), k, group, name)
    if perm is None and qweight.device.type == "cpu" and words_held(scheme) and group >= 8 and group % 8 == 0 \
            and scales.dtype in _KERNEL_SCALES:
        return Int4Words(qweight, qzeros, scales, scheme, dtype, (n, k))
    return _int4_codes(scheme, qweight, qzeros, scales, perm, (n, k), dtype, out)


def _act_order(g_idx: torch.Tensor | None, k: int, group: int, name: str) -> torch.Tensor | None:
    """GPTQ's g_idx as the permutation of x's columns that makes groups contiguous; None where they already are."""
    if g_idx is None:
        return None
    if tuple(g_idx.shape) != (k,):
        raise QuantizationError(f"{name}: g_idx has shape {list(g_idx.shape)}, expected [{k}]")
    if g_idx.device.type == "cpu" and torch.equal(g_idx, _groups_in_order(k, group, g_idx.dtype)):
        return None  # the common case, checked in one op (a cold load checks hundreds)
    g_idx = g_idx.long()
    if torch.equal(g_idx, torch.arange(k) // group):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(k) // group):
        raise QuantizationError(f"{name}: g_idx does not put {group} columns in each group")
    return perm


@functools.lru_cache(maxsize=16)
def _groups_in_order(k: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(k) // group).to(dtype)


def _int4_codes(scheme: QuantScheme, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                perm: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype,
                out: torch.Tensor | None = None) -> Int4Matrix:
    """The words of a GPTQ or AWQ matrix unpacked into an Int4Matrix (its codes into `out` when given)."""
    n, k = shape
    if scheme.method == "gptq":
        nibbles = _gptq_nibbles(qweight, out)  # act order permutes them below, back into out
        zero = _unpack_words(qzeros).float() + scheme.zero_offset
    else:
        nibbles = _awq_nibbles(qweight, out)
        zero = _unpack_words(qzeros, order=AWQ_ORDER).float()
    if perm is not None:
        codes = torch.stack((nibbles & 0xF, nibbles >> 4), dim=-1).view(n, k).index_select(1, perm)
        nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    if out is not None and nibbles.data_ptr() != out.data_ptr():
        nibbles = out.copy_(nibbles)
    scale = scales.float()
    zeros_float = ((8 - zero) * scale).to(dtype)
    return Int4Matrix(nibbles, scale.to(dtype), zeros_float, scheme.group_of(k), perm)


def _gptq_nibbles(qweight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's qweight [K/8, N] as codes [N, K/2]: a word holds rows 8r..8r+7 of a column, nibble i at bits 4i, so
    its little-endian bytes are already pairs of consecutive rows, low nibble first: a transpose is all it takes
    (into `out` when given)."""
    if out is None:
        return qweight.t().contiguous().view(torch.uint8)
    out.view(torch.int32).copy_(qweight.t())
    return out


def _awq_nibbles(qweight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """AWQ's qweight [K, N/8] as codes [N, K/2] (into `out` when given). Word nibble i holds column
    AWQ_ORDER[i] of its eight; codes pair rows 2j and 2j + 1 of a column in a byte. So: the words
    transposed (one row per group of eight columns), the pairing done on whole words (the even nibbles
    of rows 2j and 2j + 1 interleaved make four bytes, columns 0, 4, 1, 5; the odd ones four more, 2, 6,
    3, 7), then the bytes put in column order. A byte-wise transpose would cost torch 3x more."""
    words = qweight.t()  # [N/8, K]
    low_row, high_row = words[:, 0::2], words[:, 1::2]
    even = ((low_row & 0x0F0F0F0F) | ((high_row & 0x0F0F0F0F) << 4)).contiguous().view(torch.uint8)
    odd = (((low_row >> 4) & 0x0F0F0F0F) | (high_row & _HIGH_NIBBLES)).contiguous().view(torch.uint8)
    groups, half_k = even.shape[0], even.shape[1] // 4
    even, odd = even.view(groups, half_k, 4), odd.view(groups, half_k, 4)
    if out is None:
        out = torch.empty(groups * 8, half_k, dtype=torch.uint8)
    torch.stack((even[..., 0], even[..., 2], odd[..., 0], odd[..., 2], even[..., 1], even[..., 3], odd[..., 1],
                 odd[..., 3]), dim=1, out=out.view(groups, 8, half_k))
    return out


_HIGH_NIBBLES = -0x0F0F0F10  # 0xF0F0F0F0 as int32


def _unpack_words(words: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """uint8 4-bit codes [R, C] from int32 words [R, C/8] of eight along the columns: word [r, c] holds columns
    8c.., nibble i column 8c + order[i] (order: 0..7 unless given). The zeros of both formats."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)  # Int4Words unpack on their device
    nibbles = ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)  # [R, C, 8]
    if order is not None:
        nibbles = torch.empty_like(nibbles).index_copy_(-1, torch.tensor(order, device=words.device), nibbles)
    return nibbles.reshape(words.shape[0], -1)
