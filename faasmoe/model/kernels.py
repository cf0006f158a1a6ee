"""`linear` for the CPU shapes that BLAS handles badly; everything else goes to F.linear.

Two cases, measured on 2-core VMs (see bench/decode.py):

* fp32, a few rows against a tall weight (the 151936x2048 lm_head at decode batch 4-64):
  MKL's sgemm packs the whole weight per call and a second OpenMP thread makes it slower.
  Cache-sized row chunks, split across cores (one intra-op thread per pool thread): 2.5-3.4x.
* bf16/fp16 weights with 8+ rows (4+ for big weights) on a CPU WITHOUT native half-precision
  dot products (AVX2 only): there the half-precision GEMM cost grows linearly with the rows (x3 at
  16 rows, x5.5 at 64), and widening one cache-sized chunk of the weight at a time to run an fp32
  GEMM on it is 3-5x faster, with the same fp32 accumulation. CPUs with avx512_bf16 / amx_bf16
  (or avx512_fp16 / amx_fp16) run oneDNN's native kernels, which stream the weight at the memory
  bandwidth: widening there is 2-3x slower, so it is skipped (detected from /proc/cpuinfo;
  FAASMOE_CPU_HALF=native|widen overrides).

* bf16 weights with up to 8 rows on those CPUs: `csrc/bf16_linear.c` (built on first use, faasmoe.model.native)
  widens each weight in registers and uses it for four rows at a time, reading the weight once: torch's bf16
  GEMM there costs about as much again per row (see BF16_KERNEL_ROWS).

Every output element stays one full-length dot product, so results match F.linear up to
summation order.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from faasmoe.model.quantized import Fp8Matrix, Int4Matrix, Int4PackedMatrix, Int4Words, StackedMatrix

CHUNK_ROWS = 512  # 512 x 2048 fp32 = 4 MiB: a chunk (and its packed copy) stays in cache
MIN_PARALLEL_ELEMENTS = 8_000_000  # below ~32 MiB fp32 a single GEMM call is as fast
MAX_FP32_CHUNKED_ROWS = 128  # above this (prefill) the fp32 GEMM is compute-bound and BLAS does well
MIN_WIDENED_ROWS = 8  # half-precision: below this the native kernel wins (it is bandwidth-bound)
MIN_WIDENED_ROWS_BIG = 4
# bf16 without native dot products: up to this many rows csrc/bf16_linear.c (a 151936x2048 lm_head on 2 AVX2
# cores: 1 row 33 against 38 ms, 4 rows 48 against 95-118, 8 rows 82 against 121; 16 rows even)
BF16_KERNEL_ROWS = 8

_HALF = (torch.bfloat16, torch.float16)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# What each ceiling of oneDNN's ISA (ONEDNN_MAX_CPU_ISA) or ATen's kernels (ATEN_CPU_CAPABILITY) hides of
# the CPU's flags: a masked run (CI repeats the kernel tests under AVX2) takes the paths that CPU would.
_HIDDEN_ABOVE = {
    "avx2": ("avx512", "amx", "avx10"),
    "avx512_core": ("avx512_bf16", "avx512_fp16", "amx", "avx10"),
    "avx512_core_bf16": ("avx512_fp16", "amx", "avx10"),
    "avx512_core_fp16": ("amx",),
    "avx512_core_amx": ("amx_fp16",),
}
_CEILINGS = {  # ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY value (lower case) -> its row above
    "sse41": "avx2", "avx": "avx2", "avx2": "avx2", "avx2_vnni": "avx2", "avx2_vnni_2": "avx2", "default": "avx2",
    "avx512_core": "avx512_core", "avx512_core_vnni": "avx512_core", "avx512": "avx512_core",
    "avx512_core_bf16": "avx512_core_bf16", "avx512_core_fp16": "avx512_core_fp16", "avx10_1_512": "avx512_core_fp16",
    "avx512_core_amx": "avx512_core_amx", "avx10_1_512_amx": "avx512_core_amx",
}


def visible_cpu_flags(flags: set[str] | None = None, environ: dict[str, str] | None = None) -> set[str]:
    """The CPU's flags as far as torch and oneDNN may use them: /proc/cpuinfo's, less what
    ONEDNN_MAX_CPU_ISA or ATEN_CPU_CAPABILITY masks (the lower ceiling wins)."""
    environ = os.environ if environ is None else environ
    flags = _cpu_flags() if flags is None else set(flags)
    for variable in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        ceiling = _CEILINGS.get(environ.get(variable, "").strip().lower())
        if ceiling is not None:
            flags = {f for f in flags if not f.startswith(_HIDDEN_ABOVE[ceiling])}
    return flags


def cpu_isa(flags: set[str] | None = None) -> str:
    """The vector ISA the kernels run on, as benchmarks name it: AMX, AVX-512 bf16, AVX-512 or AVX2."""
    flags = visible_cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 bf16"
    return "AVX-512" if "avx512f" in flags else "AVX2"


def native_half_dtypes(flags: set[str] | None = None, override: str | None = None) -> frozenset[torch.dtype]:
    """The half-precision dtypes this CPU multiplies natively (no widening to fp32 needed)."""
    override = os.environ.get("FAASMOE_CPU_HALF", "") if override is None else override
    if override in ("native", "widen"):
        return frozenset(_HALF) if override == "native" else frozenset()
    flags = visible_cpu_flags() if flags is None else flags
    native = set()
    if flags & {"avx512_bf16", "amx_bf16"}:
        native.add(torch.bfloat16)
    if flags & {"avx512_fp16", "amx_fp16"}:
        native.add(torch.float16)
    return frozenset(native)


NATIVE_HALF = native_half_dtypes()
_MKLDNN_LINEAR = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@dataclass(frozen=True)
class PackedWeight:
    """A bf16 weight in oneDNN's blocked layout for x @ W.T. On CPUs with native bf16 its kernel
    streams the weight 1.1-4x faster than F.linear's at decode rows (lm_head, 1 row: 11.9 -> 23.4
    GB/s on the avx512_bf16 VM). Holds the same bytes as the plain weight, which it replaces."""

    packed: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    nbytes: int


@functools.cache
def onednn_packs_bf16() -> bool:
    """Whether oneDNN reorders a bf16 weight on this CPU. It refuses without avx512bw/vl/dq or avx_ne_convert
    (an AVX2-only CPU, or ONEDNN_MAX_CPU_ISA set below them), even where FAASMOE_CPU_HALF=native asks."""
    flags = visible_cpu_flags()  # a masked ISA (ONEDNN_MAX_CPU_ISA=AVX2) counts as that CPU
    if not _MKLDNN_LINEAR or not ({"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor | PackedWeight:
    """The weight in the layout `linear` runs fastest on this CPU (itself where packing does not help)."""
    if not (_MKLDNN_LINEAR and weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype == torch.bfloat16
            and torch.bfloat16 in NATIVE_HALF and os.environ.get("FAASMOE_CPU_PACK", "1") != "0"
            and onednn_packs_bf16()):
        return weight
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    return PackedWeight(packed, tuple(weight.shape), weight.dtype, weight.nbytes)
_pool: ThreadPoolExecutor | None = None


def _single_threaded() -> None:
    torch.set_num_threads(1)  # per thread: the caller keeps its own setting


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(1, torch.get_num_threads()), "faasmoe-matmul", initializer=_single_threaded)
    return _pool


def _in_pool() -> bool:
    return threading.current_thread().name.startswith("faasmoe-matmul")


def run_parallel(tasks: list[Callable[[], None]]) -> None:
    """Run independent tasks on the per-core pool and wait (inline when already on it)."""
    if len(tasks) < 2 or _in_pool():
        for task in tasks:
            task()
        return
    for future in [_get_pool().submit(_inference, task) for task in tasks]:
        future.result()


@torch.inference_mode()
def _inference(task: Callable[[], None]) -> None:
    task()


_QUANTIZED = (Fp8Matrix, Int4Matrix, Int4PackedMatrix, Int4Words, StackedMatrix)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [M, K], weight [N, K], bias), faster on CPU for the two shapes above and for packed weights;
    a quantized weight (faasmoe.model.quantized) multiplies from its quantized form."""
    if isinstance(weight, _QUANTIZED):
        out = weight.matmul(x)
        return out if bias is None else out + bias
    if isinstance(weight, PackedWeight):
        flat = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        out = torch.ops.mkldnn._linear_pointwise(flat, weight.packed, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight, bias)
    rows = x.shape[0]
    # On a pool thread already (experts run in parallel): no nested fan-out, one core each.
    big = weight.numel() >= MIN_PARALLEL_ELEMENTS and weight.shape[0] >= 4 * CHUNK_ROWS and not _in_pool()
    if weight.dtype in _HALF and weight.dtype not in NATIVE_HALF:
        if weight.dtype == torch.bfloat16 and rows <= BF16_KERNEL_ROWS:
            out = _bf16_kernel_linear(x, weight, big)
            if out is not None:
                return out if bias is None else out.add_(bias)
        if rows >= (MIN_WIDENED_ROWS_BIG if big else MIN_WIDENED_ROWS):
            return _chunked(x, weight, bias, widen=True, parallel=big)
    elif big and rows <= MAX_FP32_CHUNKED_ROWS:
        return _chunked(x, weight, bias, widen=False, parallel=True)
    return F.linear(x, weight, bias)


def _bf16_kernel_linear(x: torch.Tensor, weight: torch.Tensor, parallel: bool) -> torch.Tensor | None:
    """x @ W.T through csrc/bf16_linear.c (each weight widened in registers, read once for up to four rows),
    the columns split over the pool when `parallel`; None where the kernel is not built here."""
    fn = _bf16_linear()
    if fn is None or not weight.is_contiguous():
        return None
    n, k = weight.shape
    xs = x.float().contiguous()
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    codes = _over_columns(n, parallel, lambda start, stop: fn(xs.data_ptr(), xs.shape[0], k, weight.data_ptr(),
                                                              start, stop, n, out.data_ptr()))
    return None if any(codes) else out.to(x.dtype)


def _bf16_linear():
    from faasmoe.model import native

    p, i = ctypes.c_void_p, ctypes.c_int
    return native.kernel("bf16_linear", "bf16_linear", [p, i, i, p, i, i, i, p])


def _over_columns(n: int, parallel: bool, work: Callable[[int, int], object]) -> list:
    """work(start, stop) over output columns 0..n: in one call, or split evenly over the pool's threads."""
    if not parallel:
        return [work(0, n)]
    pool = _get_pool()
    step = -(-n // pool._max_workers)
    return [f.result() for f in [pool.submit(work, start, min(n, start + step)) for start in range(0, n, step)]]


@torch.inference_mode()  # grad mode is per thread; these are never differentiated
def _rows(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, start: int, stop: int, widen: bool) -> None:
    for s in range(start, stop, CHUNK_ROWS):
        e = min(s + CHUNK_ROWS, stop)
        chunk = weight[s:e]
        if widen:
            out[:, s:e] = torch.mm(x, chunk.float().t())
        else:
            torch.mm(x, chunk.t(), out=out[:, s:e])


def _chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, widen: bool,
             parallel: bool) -> torch.Tensor:
    n = weight.shape[0]
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    xs = x.float() if widen else x
    _over_columns(n, parallel, lambda start, stop: _rows(xs, weight, out, start, stop, widen))
    return out if bias is None else out.add_(bias)
