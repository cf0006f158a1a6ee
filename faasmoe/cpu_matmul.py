"""A CPU matmul for the one shape BLAS handles badly: few rows times a very tall weight.

The lm_head is [vocab, hidden] (151936 x 2048 for Qwen): with a decode batch of 4-64 rows,
MKL's sgemm spends most of its time packing the whole weight, and a second OpenMP thread
makes it slower, not faster. Cutting the weight into cache-sized row chunks and giving
each core its own half (one intra-op thread per pool thread) measured 2.5-3.4x faster on
2 cores for batches of 4-64 rows; every output is still one full-length dot product.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK_ROWS = 512  # 512 x 2048 fp32 = 4 MiB: a chunk and its packed copy stay in cache
MIN_WEIGHT_ELEMENTS = 8_000_000  # below ~32 MiB fp32, plain F.linear is as fast
MAX_INPUT_ROWS = 128  # above this (prefill), the GEMM is compute-bound and BLAS does well

_pool: ThreadPoolExecutor | None = None


def _single_threaded() -> None:
    torch.set_num_threads(1)  # per thread: the caller keeps its own setting


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(1, torch.get_num_threads()), "faasmoe-matmul", initializer=_single_threaded)
    return _pool


@torch.inference_mode()  # grad mode is per thread; these are never differentiated
def _rows(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, start: int, stop: int) -> None:
    for s in range(start, stop, CHUNK_ROWS):
        e = min(s + CHUNK_ROWS, stop)
        torch.mm(x, weight[s:e].t(), out=out[:, s:e])


def tall_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [M, K], weight [N, K], bias) for any shape; chunked and parallel when it pays.

    Measured on 2 cores (M=16): lm_head 151936x2048 2.9x, 11264x2048 1.5x, 6144x2048 1.8x
    faster; at 2048 rows or fewer it loses, so those keep F.linear.
    """
    use_chunks = (
        x.device.type == "cpu"
        and x.dim() == 2
        and weight.numel() >= MIN_WEIGHT_ELEMENTS
        and weight.shape[0] >= 4 * CHUNK_ROWS
        and x.shape[0] <= MAX_INPUT_ROWS
    )
    if not use_chunks:
        return torch.nn.functional.linear(x, weight, bias)
    rows = weight.shape[0]
    out = torch.empty(x.shape[0], rows, dtype=x.dtype)
    pool = _get_pool()
    parts = pool._max_workers
    step = -(-rows // parts)
    futures = [pool.submit(_rows, x, weight, out, i * step, min(rows, (i + 1) * step)) for i in range(parts)]
    for future in futures:
        future.result()
    return out if bias is None else out.add_(bias)
