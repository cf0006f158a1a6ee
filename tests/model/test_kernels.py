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


def test_a_masked_isa_hides_the_flags_above_it() -> None:
    amx = {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"}
    assert kernels.visible_cpu_flags(amx, {}) == amx
    assert kernels.visible_cpu_flags(amx, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == {"avx2", "fma"}
    assert kernels.visible_cpu_flags(amx, {"ATEN_CPU_CAPABILITY": "avx2"}) == {"avx2", "fma"}
    assert kernels.cpu_isa(kernels.visible_cpu_flags(amx, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})) == "AVX-512 bf16"
    assert kernels.cpu_isa(kernels.visible_cpu_flags(amx, {"ONEDNN_MAX_CPU_ISA": "avx512_core"})) == "AVX-512"
    assert kernels.cpu_isa(amx) == "AMX"
    lowest = {"ONEDNN_MAX_CPU_ISA": "ALL", "ATEN_CPU_CAPABILITY": "avx2"}  # the lower ceiling wins
    assert kernels.visible_cpu_flags(amx, lowest) == {"avx2", "fma"}


def test_the_masked_run_takes_the_avx2_paths() -> None:
    import os

    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() != "AVX2":
        pytest.skip("only in the masked run (make test repeats the kernel tests with ONEDNN_MAX_CPU_ISA=AVX2)")
    assert kernels.NATIVE_HALF == frozenset() and kernels.cpu_isa() == "AVX2"
    w = torch.randn(64, 32).to(torch.bfloat16)
    assert kernels.pack_weight(w) is w  # no oneDNN bf16 packing below AVX-512


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
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


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("parallel", [False, True])
def test_the_bf16_kernel_reads_each_weight_exactly(rows, parallel) -> None:
    if kernels._bf16_linear() is None:
        pytest.skip("no C compiler here: torch's path serves (test_every_path_matches_f_linear)")
    g = torch.Generator().manual_seed(rows)
    # 200: the AVX2 loop and the scalar tail both; 3001 columns: blocks of 4 or 2 and a column left over
    w = torch.randn(3001, 200, generator=g).to(torch.bfloat16)
    one_hot = torch.zeros(rows, 200, dtype=torch.bfloat16)
    columns = [0, 15, 16, 199, 100, 17, 3, 64][:rows]
    one_hot[range(rows), columns] = 1.0
    assert torch.equal(kernels._bf16_kernel_linear(one_hot, w, parallel), w[:, columns].t())  # each weight itself
    x = torch.randn(rows, 200, generator=g).to(torch.bfloat16)
    got = kernels._bf16_kernel_linear(x, w, parallel).float()
    reference = F.linear(x.float(), w.float()).to(torch.bfloat16).float()
    assert torch.allclose(got, reference, rtol=2**-7, atol=1e-6)  # one bf16 rounding of the same fp32 sums


def test_bf16_decode_rows_take_the_kernel_without_native_bf16(monkeypatch) -> None:
    if kernels._bf16_linear() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(kernels, "NATIVE_HALF", frozenset())
    called = []
    monkeypatch.setattr(kernels, "_bf16_kernel_linear", lambda x, w, parallel: called.append(x.shape[0]))
    x, w = torch.randn(9, 64).to(torch.bfloat16), torch.randn(32, 64).to(torch.bfloat16)
    kernels.linear(x[:kernels.BF16_KERNEL_ROWS], w)
    kernels.linear(x, w)  # past the kernel's rows: the widened chunks
    assert called == [kernels.BF16_KERNEL_ROWS]


@pytest.mark.skipif(not kernels.onednn_packs_bf16(), reason="oneDNN packs no bf16 weight on this CPU (AVX2 only)")
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


def test_a_cpu_that_cannot_pack_bf16_keeps_the_plain_layout_even_when_told_native(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "NATIVE_HALF", frozenset({torch.bfloat16}))  # FAASMOE_CPU_HALF=native
    monkeypatch.setattr(kernels, "onednn_packs_bf16", lambda: False)  # what an AVX2-only CPU answers
    w = torch.randn(32, 16).to(torch.bfloat16)
    assert kernels.pack_weight(w) is w
    x = torch.randn(3, 16).to(torch.bfloat16)
    assert torch.allclose(kernels.linear(x, kernels.pack_weight(w)).float(), F.linear(x, w).float(), rtol=2e-2, atol=0.1)


def _block(first: int, count: int, dtype: torch.dtype, seed: int):
    from faasmoe.model.checkpoint import ExpertWeights
    from faasmoe.model.experts import ExpertBlock

    g = torch.Generator().manual_seed(seed)
    weights = ExpertWeights(torch.randn(count, 2 * 96, 64, generator=g).to(dtype) * 0.1,
                            torch.randn(count, 64, 96, generator=g).to(dtype) * 0.1)
    return ExpertBlock(0, first, weights)


@pytest.mark.skipif(not kernels.onednn_packs_bf16(), reason="oneDNN packs no bf16 weight on this CPU (AVX2 only)")
def test_a_packed_expert_block_computes_what_the_plain_one_does(monkeypatch) -> None:
    from faasmoe.model.experts import PackedExpertWeights

    monkeypatch.setattr(kernels, "NATIVE_HALF", frozenset({torch.bfloat16}))
    plain = _block(0, 4, torch.bfloat16, seed=3)
    packed = plain.packed()
    assert isinstance(packed.weights, PackedExpertWeights)
    assert (packed.nbytes, packed.count, packed.hidden_size, packed.dtype) == (plain.nbytes, 4, 64, torch.bfloat16)
    x = torch.randn(9, 64).to(torch.bfloat16)
    local = torch.tensor([3, 0, 0, 2, 3, 1, 0, 2, 2])  # unsorted: the block sorts and unsorts
    assert torch.allclose(packed.forward(x, local).float(), plain.forward(x, local).float(), rtol=2e-2, atol=2e-2)
    assert packed.packed() is packed and packed.to("cpu") is packed
    assert _block(0, 2, torch.float32, seed=4).packed().weights.gate_up.dtype == torch.float32  # fp32 stays plain
    monkeypatch.setattr(kernels, "NATIVE_HALF", frozenset())
    assert not isinstance(plain.packed().weights, PackedExpertWeights)  # no native bf16: the plain layout


def test_several_blocks_run_together_give_each_block_s_own_result(monkeypatch) -> None:
    from faasmoe.model import experts

    monkeypatch.setattr(experts, "PARALLEL_MIN_BYTES", 0)  # these small experts go to the per-core pool too
    blocks = [_block(4 * i, 4, torch.float32, seed=i) for i in range(3)]
    x = [torch.randn(n, 64) for n in (1, 5, 3)]
    local = [torch.tensor([2]), torch.tensor([0, 0, 1, 3, 3]), torch.tensor([1, 0, 1])]
    together = experts.run_blocks(list(zip(blocks, x, local)))
    for block, xi, li, got in zip(blocks, x, local, together):
        assert torch.allclose(got, block.forward(xi, li), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_adds_in_expert_order_as_the_reference_does(dtype) -> None:
    from faasmoe.model.experts import DispatchPlan, Routing

    g = torch.Generator().manual_seed(7)
    experts = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(6)])  # 6 tokens, top-4 of 16
    routing = Routing(experts, torch.rand(6, 4, generator=g))
    plan = DispatchPlan(routing, block_size=4)  # a token may hit two experts of one block
    outputs = [torch.randn(c.local_experts.numel(), 32, generator=g).to(dtype) for c in plan.calls]
    reference = torch.zeros(6, 32, dtype=dtype)  # transformers: index_add_ expert by expert
    for call, y in zip(plan.calls, outputs):
        for e in call.local_experts.unique().tolist():
            rows = call.local_experts == e
            tokens, weights = plan.tokens[call.rows], plan.weights[call.rows]
            reference.index_add_(0, tokens[rows], y[rows] * weights[rows].to(dtype)[:, None])
    assert torch.equal(plan.combine(outputs, torch.empty(6, 32, dtype=dtype)), reference)


@pytest.mark.parametrize("tokens", [1, 2, 4, 7, 31, 32, 33, 64])
def test_small_plans_sorted_in_python_equal_the_tensor_path(tokens, monkeypatch) -> None:
    from faasmoe.model import experts

    g = torch.Generator().manual_seed(tokens)
    for block_size in (1, 4, 60):
        for _ in range(5):
            routing = experts.route(torch.randn(tokens, 60, generator=g), torch.eye(60), 4, False)
            monkeypatch.setattr(experts, "SMALL_PLAN_PAIRS", 1 << 20)
            small = experts.DispatchPlan(routing, block_size)
            monkeypatch.setattr(experts, "SMALL_PLAN_PAIRS", 0)
            big = experts.DispatchPlan(routing, block_size)
            assert [(c.block, c.rows) for c in small.calls] == [(c.block, c.rows) for c in big.calls]
            assert torch.equal(small.tokens, big.tokens) and torch.equal(small.weights, big.weights)
            for a, b in zip(small.calls, big.calls):
                assert torch.equal(a.local_experts, b.local_experts)
            outputs = [torch.randn(c.local_experts.numel(), 16, generator=g) for c in big.calls]
            like = torch.empty(tokens, 16)
            assert torch.equal(small.combine(outputs, like), big.combine(outputs, like))


def test_a_block_refuses_negative_expert_indices() -> None:
    from faasmoe.model.checkpoint import ExpertWeights
    from faasmoe.model.experts import ExpertBlock

    block = ExpertBlock(0, 0, ExpertWeights(torch.randn(2, 8, 4), torch.randn(2, 4, 4)))
    with pytest.raises(ValueError, match=">= 0"):
        block.forward(torch.randn(2, 4), torch.tensor([0, -1]))
