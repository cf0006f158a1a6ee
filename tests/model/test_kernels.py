"""CPU `linear`: every path equals F.linear up to summation order; the half-precision choice follows the ISA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from faasmoe.model import kernels


def test_half_precision_is_widened_only_without_native_instructions() -> None:
    assert kernels.native_half_dtypes({"avx2", "fma"}, "") == frozenset()
    assert kernels.native_half_dtypes({"avx512f", "avx512_bf16"}, "") == {torch.bfloat16}
    assert kernels.native_half_dtypes({"amx_bf16", "amx_fp16"}, "") == {torch.bfloat16, torch.float16}
    assert kernels.native_half_dtypes({"avx2"}, "native") == {torch.bfloat16, torch.float16}
    assert kernels.native_half_dtypes({"avx512_bf16"}, "widen") == frozenset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("native", [frozenset(), frozenset({torch.bfloat16})])
def test_every_path_matches_f_linear(monkeypatch, dtype, rows, native) -> None:
    monkeypatch.setattr(kernels, "NATIVE_HALF", native)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=g).to(dtype)
    w = torch.randn(4 * kernels.CHUNK_ROWS + 8, 256, generator=g).to(dtype)
    bias = torch.randn(w.shape[0], generator=g).to(dtype)
    reference = F.linear(x.float(), w.float(), bias.float())
    got = kernels.linear(x, w, bias).float()
    assert got.shape == reference.shape
    assert torch.allclose(got, reference, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=0.5 if dtype ==
                          torch.bfloat16 else 1e-4)


@pytest.mark.skipif(not kernels._MKLDNN_LINEAR, reason="this torch has no oneDNN packed linear")
@pytest.mark.parametrize("rows", [1, 4, 33])
def test_a_packed_weight_computes_what_f_linear_does(monkeypatch, rows) -> None:
    monkeypatch.setattr(kernels, "NATIVE_HALF", frozenset({torch.bfloat16}))
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 128, generator=g).to(torch.bfloat16)
    bias = torch.randn(300, generator=g).to(torch.bfloat16)
    packed = kernels.pack_weight(w)
    assert isinstance(packed, kernels.PackedWeight) and packed.nbytes == w.nbytes and packed.shape == (300, 128)
    x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
    assert torch.allclose(kernels.linear(x, packed, bias).float(), F.linear(x, w, bias).float(), rtol=2e-2, atol=0.25)
    assert kernels.pack_weight(w.float()) is not None and not isinstance(kernels.pack_weight(w.float()), kernels.PackedWeight)
    monkeypatch.setattr(kernels, "NATIVE_HALF", frozenset())
    assert kernels.pack_weight(w) is w  # no native bf16: the plain layout
