"""Quantized checkpoints (FP8 blocks, GPTQ and AWQ 4-bit) against transformers on a dequantized copy.

The reference dequantizes each stored matrix by the formats' published formulas, element by element
(`reference_weight`), independently of faasmoe.model.quantized, writes a plain checkpoint and lets
transformers compute the logits. The formats' own bytes, not a round trip through our reader, are the spec.
"""

from __future__ import annotations

import ctypes
import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from faasmoe.engine.functions import block_content_at
from faasmoe.engine.offline import generate
from faasmoe.model import native
from faasmoe.model.checkpoint import CheckpointError, CheckpointReader, ExpertLayout, QuantizedExpertWeights
from faasmoe.model.config import ConfigError, MoEConfig
from faasmoe.model.kernels import _cpu_flags
from faasmoe.model.moe_model import MoEModel
from faasmoe.model.quant_scheme import QuantizationError, QuantScheme
from faasmoe.model.quantize import quantize_checkpoint
from faasmoe.model.quantized import (
    FP8_KERNEL_ROWS,
    Fp8Matrix,
    Int4PackedMatrix,
    Int4Words,
    _fp8_kernel_matmul,
    _fp8_linear,
    from_stored,
    fuse_rows,
    rows_buffer,
    widen_e4m3,
)
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

from ..processes import faasmoe
from .conftest import load_reference, relative_error

TOLERANCE = 1e-4  # fp32 compute: the dequantized weights are the same numbers up to one fp32 rounding
AWQ_COLUMN_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # column 8c + j of an AWQ word sits in nibble AWQ_COLUMN_NIBBLE[j]
METHODS = ("fp8", "gptq-int4", "awq-int4")


def nibble(words: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    return (words.long() >> (4 * position)) & 0xF


def reference_weight(method: str, tensors: dict[str, torch.Tensor], prefix: str, config: dict) -> torch.Tensor:
    """W [N, K] of the linear `prefix`, by the format's formula."""
    q = config["quantization_config"]
    if method == "fp8":
        weight, scale = tensors[f"{prefix}.weight"].float(), tensors[f"{prefix}.weight_scale_inv"]
        rows, cols = q["weight_block_size"]
        n, k = weight.shape
        r, c = torch.arange(n)[:, None] // rows, torch.arange(k)[None, :] // cols
        return weight * scale[r, c]
    qweight, qzeros, scales = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"]
    n = scales.shape[1]
    group = q["group_size"]
    if method == "gptq-int4":
        k = qweight.shape[0] * 8
        kk, nn = torch.arange(k)[:, None], torch.arange(n)[None, :]
        g = tensors[f"{prefix}.g_idx"].long()[:, None]
        codes = nibble(qweight[kk // 8, nn], kk % 8)
        zeros = nibble(qzeros[g, nn // 8], nn % 8) + 1  # the "gptq" format stores zero - 1
        return ((codes - zeros) * scales[g, nn].float()).t()
    k = qweight.shape[0]
    kk, nn = torch.arange(k)[:, None], torch.arange(n)[None, :]
    where = torch.tensor(AWQ_COLUMN_NIBBLE)[nn % 8]
    codes = nibble(qweight[kk, nn // 8], where)
    zeros = nibble(qzeros[kk // group, nn // 8], where)
    return ((codes - zeros) * scales[kk // group, nn].float()).t()


def dequantized_copy(path: Path, out: Path, method: str) -> Path:
    """A plain checkpoint holding the weights `path` encodes (the reference transformers runs)."""
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    dtype = getattr(torch, config.get("torch_dtype") or config.get("dtype"))
    parts = ("weight", "weight_scale_inv") if method == "fp8" else ("qweight", "qzeros", "scales", "g_idx")
    prefixes = {n.removesuffix(f".{parts[1]}") for n in tensors if n.endswith(f".{parts[1]}")}
    plain = {n: t for n, t in tensors.items() if n.rsplit(".", 1)[0] not in prefixes or n.rsplit(".", 1)[1] not in parts}
    for prefix in prefixes:
        plain[f"{prefix}.weight"] = reference_weight(method, tensors, prefix, config).to(dtype).contiguous()
    for name in [n for n in plain if n.endswith("_proj_scale_inv")]:  # fused FP8 experts: expert by expert
        fused, scale = name.removesuffix("_scale_inv"), plain.pop(name)
        experts = [reference_weight(method, {"e.weight": w, "e.weight_scale_inv": s}, "e", config)
                   for w, s in zip(plain[fused], scale)]
        plain[fused] = torch.stack(experts).to(dtype).contiguous()
    out.mkdir(parents=True)
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    built = {}

    def get(family: str, method: str, expert_format: str = "per_expert", **options) -> tuple[Path, Path]:
        key = (family, method, expert_format, tuple(sorted(options.items())))
        if key not in built:
            dense = root / f"{family}-{expert_format}"
            if not dense.exists():
                init_checkpoint(dense, family, seed=5, progress=False, expert_format=expert_format)
            name = f"{family}-{method}-{len(built)}"
            path = quantize_checkpoint(dense, root / name, method, **options)
            built[key] = path, dequantized_copy(path, root / f"{name}-reference", method)
        return built[key]

    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "qwen3_moe", "olmoe"])
def test_logits_equal_transformers_on_the_dequantized_weights(checkpoints, family, method):
    path, reference = checkpoints(family, method)
    ids = torch.tensor([[5, 17, 42, 8, 61, 300, 9, 77]])
    with torch.no_grad():
        expected = load_reference(reference)(ids).logits
    model = MoEModel.from_pretrained(path)
    assert isinstance(model.executor.blocks[model.config.moe_layers[0]][0].weights, QuantizedExpertWeights)
    assert relative_error(model(ids), expected) < TOLERANCE


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_fused_fp8_experts_equal_transformers_on_the_dequantized_weights(checkpoints, family):
    # transformers' fine-grained FP8 layout of fused experts: gate_up_proj [E, 2I, H] in e4m3, its scale_inv
    # [E, 2I / 128, H / 128], the same for down_proj
    path, reference = checkpoints(family, "fp8", expert_format="fused")
    reader = CheckpointReader(path)
    fused = [n for n in reader.names() if n.endswith("experts.gate_up_proj")]
    assert fused and reader.entry(fused[0]).dtype == torch.float8_e4m3fn and reader.has(f"{fused[0]}_scale_inv")
    ids = torch.tensor([[5, 17, 42, 8, 61, 300, 9, 77]])
    with torch.no_grad():
        expected = load_reference(reference)(ids).logits
    model = MoEModel.from_pretrained(path)
    block = model.executor.blocks[model.config.moe_layers[0]][0].weights
    assert isinstance(block, QuantizedExpertWeights) and isinstance(block.gate_up[0], Fp8Matrix)
    assert block.nbytes == len(block.gate_up) * model.config.expert_bytes(torch.float32)
    assert relative_error(model(ids), expected) < TOLERANCE
    # a worker loads a block under the digest its function id names: every piece, scales too, as block_parts says
    layout = ExpertLayout(reader, MoEConfig.from_pretrained(path))
    digest = block_content_at(path, 0, 1, 2, "float32")
    assert layout.load_block(0, 1, 2, torch.float32, expect=digest).nbytes == 2 * model.config.expert_bytes(torch.float32)
    assert digest not in {block_content_at(path, 0, 0, 2, "float32"), block_content_at(path, 0, 2, 2, "float32")}


def test_four_bit_formats_refuse_fused_experts(tmp_path):
    dense = init_checkpoint(tmp_path / "dense", "qwen2_moe", seed=5, progress=False, expert_format="fused")
    with pytest.raises(ValueError, match="gptq-int4 has no fused expert layout"):
        quantize_checkpoint(dense, tmp_path / "q", "gptq-int4")


@pytest.mark.parametrize("options", [{"desc_act": True}, {"sym": False}, {"group_size": 64}])
def test_gptq_act_order_asymmetric_and_group_sizes(checkpoints, options):
    path, reference = checkpoints("mixtral", "gptq-int4", **options)  # its expert size 128 takes groups of 64
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert all(config[k] == v for k, v in options.items())
    ids = torch.tensor([[5, 17, 42, 8, 61, 300, 9, 77]])
    with torch.no_grad():
        expected = load_reference(reference)(ids).logits
    assert relative_error(MoEModel.from_pretrained(path)(ids), expected) < TOLERANCE


@pytest.mark.parametrize("method", METHODS)
def test_greedy_tokens_equal_transformers(checkpoints, method):
    path, reference = checkpoints("qwen2_moe", method)
    prompt = [5, 17, 42, 8, 61]
    with torch.no_grad():
        expected = load_reference(reference).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                                       eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(MoEModel.from_pretrained(path), [prompt], max_tokens=12, ignore_eos=True)[0].token_ids == expected


@pytest.mark.parametrize("method", METHODS)
def test_bf16_logits_are_as_close_to_the_reference_as_bf16_itself(checkpoints, method):
    # Served in bf16 as real checkpoints are, the 4-bit kernel works from bf16 scales and zeros (W = (q - 8) * s
    # + z, rounded once more than the reference's (q - z) * s) and every product in bf16: the tolerance is what
    # bf16 costs the reference itself, against its own fp32 run (x2 for the rounding of scales and zeros).
    path, reference = checkpoints("qwen2_moe", method)
    ids = torch.tensor([[5, 17, 42, 8, 61, 300, 9, 77]])
    ref = load_reference(reference)
    with torch.no_grad():
        exact = ref(ids).logits
        rounded = ref.to(torch.bfloat16)(ids).logits.float()
    got = MoEModel.from_pretrained(path, dtype="bfloat16")(ids).float()
    assert relative_error(got, rounded) <= 2 * relative_error(rounded, exact) + 1e-3


# At these tiny shapes (groups of 32 columns) scales and zeros weigh more than at real ones: bench/quantized.py
# measures the ratios on the Qwen1.5-MoE-A2.7B shape.
@pytest.mark.parametrize("native_kernels", ["1", "0"])
@pytest.mark.parametrize("method,ratio", [("fp8", 0.55), ("gptq-int4", 0.35), ("awq-int4", 0.35)])
def test_experts_stay_quantized_and_are_counted_as_such(checkpoints, method, ratio, native_kernels, monkeypatch):
    if native_kernels == "1" and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the kernels are not built")
    monkeypatch.setenv(native.NATIVE_ENV, native_kernels)
    path, _ = checkpoints("qwen2_moe", method)
    config = MoEConfig.from_pretrained(path)
    reader = CheckpointReader(path)
    layout = ExpertLayout(reader, config)
    weights = layout.load_block(0, 0, 4, torch.bfloat16)
    assert weights.nbytes == 4 * config.expert_bytes(torch.bfloat16)  # what a worker's budget reserves
    stored = sum(reader.entry(name).dtype.itemsize * torch.Size(shape).numel() for name, _, _, shape
                 in layout.block_parts(0, 0, 4))
    plain = 4 * 3 * config.hidden_size * config.moe_intermediate_size * 2
    assert stored <= ratio * plain and weights.nbytes <= ratio * plain
    packed = weights.packed()
    assert packed.nbytes == weights.nbytes
    if method != "fp8" and native.enabled():  # held as the file's words: nothing converted, nothing to pack
        g_idx = sum(reader.entry(name).dtype.itemsize * torch.Size(shape).numel()
                    for name, _, _, shape in layout.block_parts(0, 0, 4) if name.endswith("g_idx"))
        assert weights.nbytes == stored - g_idx and packed is weights  # g_idx in order says nothing to keep
        assert all(isinstance(m, Int4Words) for gate_up in weights.gate_up for m in gate_up.parts)
    elif method != "fp8":
        assert all(isinstance(m, Int4PackedMatrix) for m in packed.gate_up + packed.down)


def test_a_quantized_block_is_named_by_its_stored_bytes_and_scheme(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("FAASMOE_CACHE_DIR", str(tmp_path / "cache"))
    gptq, _ = checkpoints("qwen2_moe", "gptq-int4")
    layout = ExpertLayout(CheckpointReader(gptq), MoEConfig.from_pretrained(gptq))
    assert {n for n, _, _, _ in layout.block_parts(0, 0, 1)} == {
        f"model.layers.0.mlp.experts.0.{p}.{s}" for p in ("gate_proj", "up_proj", "down_proj")
        for s in ("qweight", "qzeros", "scales", "g_idx")}
    copy, v2 = tmp_path / "copy", tmp_path / "v2"
    shutil.copytree(gptq, copy)
    shutil.copytree(gptq, v2)
    raw = json.loads((v2 / "config.json").read_text())
    raw["quantization_config"]["checkpoint_format"] = "gptq_v2"  # the same codes, zeros read one lower
    (v2 / "config.json").write_text(json.dumps(raw))
    digest = {p: block_content_at(p, 0, 0, 2, "float32") for p in (gptq, copy, v2)}
    assert digest[gptq] == digest[copy]  # the same bytes in another checkpoint: one function
    assert digest[gptq] != digest[v2]  # the same bytes meaning other weights: another


def test_quantized_tensors_of_the_wrong_dtype_are_refused():
    scheme = QuantScheme.from_config({"quant_method": "gptq", "bits": 4, "group_size": 32})
    tensors = {"qweight": torch.zeros(4, 16, dtype=torch.int64), "qzeros": torch.zeros(1, 2, dtype=torch.int32),
               "scales": torch.ones(1, 16, dtype=torch.float16)}
    with pytest.raises(QuantizationError, match="wants int32 qweight and qzeros"):
        from_stored(scheme, tensors, (16, 32), torch.float32, "w")


@pytest.mark.parametrize("method", ["fp8", "gptq"])
def test_a_gate_and_up_converted_into_one_buffer_fuse_without_a_copy(method, monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "0")  # 4-bit words are converted only where their kernel is not built
    scheme = QuantScheme.from_config({"quant_method": "fp8", "weight_block_size": [128, 128]} if method == "fp8" else
                                     {"quant_method": "gptq", "bits": 4, "group_size": 64})
    n, k = 256, 128
    g = torch.Generator().manual_seed(0)

    def stored() -> dict[str, torch.Tensor]:
        if method == "fp8":
            return {"weight": torch.randn(n, k, generator=g).to(torch.float8_e4m3fn),
                    "weight_scale_inv": torch.rand(2, 1, generator=g)}
        return {"qweight": torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=g, dtype=torch.int32),
                "qzeros": torch.randint(-2**31, 2**31 - 1, (k // 64, n // 8), generator=g, dtype=torch.int32),
                "scales": torch.rand(k // 64, n, generator=g).half()}

    parts = [stored(), stored()]
    apart = [from_stored(scheme, p, (n, k), torch.float32) for p in parts]
    halves = rows_buffer(scheme, [(n, k), (n, k)])
    together = fuse_rows(*(from_stored(scheme, p, (n, k), torch.float32, out=h) for p, h in zip(parts, halves)))
    codes = together.weight if method == "fp8" else together.codes
    assert codes.data_ptr() == halves[0].data_ptr() and codes.shape[0] == 2 * n  # the buffer itself
    assert torch.equal(together.dequantize(), fuse_rows(*apart).dequantize())  # and the same weights as a copy


def random_words(method: str, n: int, k: int, group: int, scale_dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"qweight": torch.randint(-2**31, 2**31 - 1, (k // 8, n) if method == "gptq-int4" else (k, n // 8),
                                     generator=g, dtype=torch.int32),
            "qzeros": torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), generator=g, dtype=torch.int32),
            "scales": (torch.rand(k // group, n, generator=g) * 0.02 + 1e-3).to(scale_dtype),
            "g_idx": torch.arange(k, dtype=torch.int32) // group}


@pytest.mark.parametrize("method", ["gptq-int4", "awq-int4"])
@pytest.mark.parametrize("n,k,group,scale_dtype", [
    (1408, 2048, 128, torch.float16),  # the A2.7B shape: 22 tiles of 64 columns, in 11 pairs
    (200, 96, 32, torch.float32),  # a last tile of 8 columns, alone in its pair
    (136, 256, 8, torch.bfloat16),  # groups of 8 (unpacked 8 rows of K at a time)
])
def test_the_int4_kernel_multiplies_the_stored_words_as_the_formats_say(method, n, k, group, scale_dtype):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: 4-bit words are unpacked at load (tested by the other 4-bit tests)")
    stored = random_words(method, n, k, group, scale_dtype, seed=n + k)
    config = {"quantization_config": {"group_size": group}}
    weights = reference_weight(method, {f"w.{s}": t for s, t in stored.items()}, "w", config).double()
    scheme = QuantScheme.from_config({"quant_method": method.removesuffix("-int4"), "bits": 4, "group_size": group})
    m = from_stored(scheme, stored, (n, k), torch.float32)
    assert isinstance(m, Int4Words) and m.words is stored["qweight"]  # held as read
    g = torch.Generator().manual_seed(2)
    for rows in (1, 2, 3, 5, 17):  # in registers (1, 2), through the buffer (3, 5), two passes of 16 rows (17)
        x = torch.randn(rows, k, generator=g)
        expected = x.double() @ weights.t()
        # fp32 sums of K products: the error is that of any fp32 matmul, far below one weight's quantization step
        assert relative_error(m.matmul(x).double(), expected) < 1e-6
    assert torch.equal(m.dequantize(), m.codes().dequantize())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 256), (256, 200)])  # a partial row block; a K the AVX2 path does not take
def test_the_fp8_kernel_multiplies_the_checkpoints_weights(dtype, shape):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the torch path serves (tested by the other fp8 tests)")
    n, k = shape
    g = torch.Generator().manual_seed(1)
    m = Fp8Matrix((torch.randn(n, k, generator=g) * 30).to(torch.float8_e4m3fn),
                  torch.rand(-(-n // 128), -(-k // 128), generator=g) * 0.01 + 1e-5, (128, 128), dtype)
    weights = m.dequantize().float()  # rounded to the compute dtype, as a dequantized checkpoint holds them
    exact = Fp8Matrix(m.weight, m.scale, m.block, torch.float32).dequantize()  # fp8 * scale, one fp32 rounding
    # With AVX2 and K in sixteens the kernel scales each block's sums, not each weight: fp8 * scale unrounded
    # (within one bf16 rounding of a bf16 checkpoint's weight); elsewhere each weight is rounded as torch does.
    unrounded = k % 16 == 0 and "avx2" in _cpu_flags()
    for column in (0, 77, k - 1):  # one row at a time (decode), a one-hot x: its output is a column of W, exactly
        x = torch.zeros(1, k)
        x[0, column] = 1.0
        assert torch.equal(_fp8_kernel_matmul(m, x)[0], (exact if unrounded else weights)[:, column])
    assert torch.allclose(weights, exact, rtol=2**-8, atol=0)
    x = torch.randn(FP8_KERNEL_ROWS, k, generator=g)
    reference = exact if unrounded else weights
    assert torch.allclose(m.matmul(x), x @ reference.t(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(m.matmul(x[:1]), x[:1] @ reference.t(), rtol=1e-5, atol=1e-5)


def test_the_kernels_portable_paths_agree(tmp_path):
    """Built without AVX2 (x86-64's baseline, as on a CPU without it; ARM takes the same C), the FP8 and 4-bit
    kernels' plain C paths compute what the dequantized weights do."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.machine() != "x86_64":
        pytest.skip("needs an x86-64 C compiler")
    built = {}
    for source in ("fp8_linear", "int4_linear"):
        out = tmp_path / f"{source}.so"
        subprocess.run([compiler, "-O2", "-march=x86-64", "-fopenmp-simd", "-shared", "-fPIC", "-o", str(out),
                        str(native.SOURCES / f"{source}.c")], check=True, capture_output=True, timeout=120)
        built[source] = getattr(ctypes.CDLL(str(out)), source)
    p, i = ctypes.c_void_p, ctypes.c_int
    built["int4_linear"].argtypes = [p, i, i, p, i, p, i, p, i, i, i, i, i, p, i]
    built["fp8_linear"].argtypes = [p, i, i, p, i, i, i, p, i, i, i, p]
    g = torch.Generator().manual_seed(3)
    for method, (n, k, group) in [("gptq-int4", (200, 96, 32)), ("awq-int4", (136, 256, 64))]:
        stored = random_words(method, n, k, group, torch.float16, seed=k)
        scheme = QuantScheme.from_config({"quant_method": method.removesuffix("-int4"), "bits": 4, "group_size": group})
        m = from_stored(scheme, stored, (n, k), torch.float32)
        for rows in (1, 3, 17):
            x, y = torch.randn(rows, k, generator=g), torch.empty(rows, n)
            assert built["int4_linear"](x.data_ptr(), rows, k, m.words.data_ptr(), int(method == "awq-int4"),
                                        m.qzeros.data_ptr(), scheme.zero_offset, m.scales.data_ptr(), 1, group, 0, n,
                                        n, y.data_ptr(), n) == 0
            assert relative_error(y.double(), x.double() @ m.dequantize().double().t()) < 1e-6
    m = Fp8Matrix((torch.randn(300, 256, generator=g) * 30).to(torch.float8_e4m3fn),
                  torch.rand(3, 2, generator=g) * 0.01 + 1e-5, (128, 128), torch.bfloat16)
    x, y = torch.randn(5, 256, generator=g), torch.empty(5, 300)
    assert built["fp8_linear"](x.data_ptr(), 5, 256, m.weight.data_ptr(), 0, 300, 300, m.kernel_scale.data_ptr(),
                               128, 128, 1, y.data_ptr()) == 0
    assert relative_error(y, x @ m.dequantize().float().t()) < 1e-6  # each weight rounded to bf16 as torch does


def test_the_fp8_kernel_rounds_ties_to_even_as_torch_does_where_it_rounds():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    # 1 x (1 + 2^-7 + 2^-8) lies halfway between two bf16 values; ties go to the even one (up, here). K = 120
    # is not in sixteens: the kernel's path that widens, scales and rounds each weight
    weight = torch.tensor([[1.0, -1.0] * 60] * 128).to(torch.float8_e4m3fn)
    m = Fp8Matrix(weight, torch.tensor([[1 + 2**-7 + 2**-8]]), (128, 128), torch.bfloat16)
    assert m.dequantize()[0, 0].item() == 1 + 2**-6  # torch's rounding
    for column in (0, 1):
        x = torch.zeros(1, 120)
        x[0, column] = 1.0
        assert torch.equal(_fp8_kernel_matmul(m, x)[0], m.dequantize().float()[:, column])


def test_without_a_compiler_the_fp8_kernel_is_skipped_with_the_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    assert _fp8_linear() is None
    assert "building the fp8_linear kernel failed" in caplog.text
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert _fp8_linear() is None
    m = Fp8Matrix(torch.randn(128, 128).to(torch.float8_e4m3fn), torch.ones(1, 1), (128, 128), torch.float32)
    x = torch.randn(1, 128)
    assert torch.allclose(m.matmul(x), x @ m.dequantize().t(), rtol=1e-5, atol=1e-5)  # torch's path


@pytest.mark.parametrize("scale", [1e-4, 0.37, 3.0, 2.0**100])  # the last cannot take 2^120: the slow path
def test_e4m3_widened_by_its_bits_is_torchs_conversion_times_the_scale(scale):
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # e4m3fn's two NaNs (no real weight is one)
    weight = codes.view(torch.float8_e4m3fn).view(2, -1)
    scales = torch.tensor([[scale]], dtype=torch.float32)
    widened, up = widen_e4m3(weight, scales)
    product = widened * up
    assert torch.equal(product, weight.float() * scale)
    assert torch.equal(product.view(torch.int32), (weight.float() * scale).view(torch.int32))  # -0.0 stays -0.0
    # and inside a matrix whose row slices cut its 128-row blocks
    w = (torch.randn(300, 256) * 40).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2) * 0.01 + 1e-6
    m = Fp8Matrix(w, s, (128, 128), torch.float32)
    expect = w.float() * s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)
    for start, stop in [(0, 128), (128, 300), (50, 260), (0, 300)]:
        assert torch.equal(m.rows(start, stop), expect[start:stop])


@pytest.mark.parametrize("config,error", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "gptq with bits=8 is not supported"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq version 'gemv' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "fp8 needs weight_block_size"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
])
def test_an_unsupported_quantization_is_a_clear_error(tmp_path, config, error):
    path = init_checkpoint(tmp_path / "m", "qwen2_moe", progress=False)
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = config
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=error):
        MoEConfig.from_pretrained(path)


def test_schemes_read_as_the_published_configs_say():
    # Qwen3-30B-A3B-FP8 and Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4 ship these (abridged).
    fp8 = QuantScheme.from_config({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                   "weight_block_size": [128, 128]})
    assert (fp8.method, fp8.block) == ("fp8", (128, 128))
    gptq = QuantScheme.from_config({"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False,
                                    "static_groups": False, "sym": True, "true_sequential": True,
                                    "model_name_or_path": None, "model_file_base_name": "model",
                                    "quant_method": "gptq"})
    assert (gptq.method, gptq.group_size, gptq.zero_offset, gptq.desc_act) == ("gptq", 128, 1, False)
    awq = QuantScheme.from_config({"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4,
                                   "version": "gemm"})
    assert (awq.method, awq.group_size) == ("awq", 128)
    assert QuantScheme.from_config(None) is None


def test_model_init_quantize_writes_each_format(tmp_path):
    for method in METHODS:
        out = tmp_path / method
        proc = faasmoe("model", "init", str(out), "--family", "mixtral", "--quantize", method, "--quiet")
        assert proc.proc.wait(120) == 0, proc.output
        assert MoEConfig.from_pretrained(out).quantization is not None
        assert not list(tmp_path.glob(".*")), "the plain checkpoint it quantized was left behind"
    refused = faasmoe("model", "init", str(tmp_path / "x"), "--family", "mixtral", "--quantize", "fp8", "--desc-act")
    assert refused.proc.wait(60) != 0 and "--desc-act is for --quantize gptq-int4" in refused.output
    shutil.rmtree(tmp_path)


def test_fp8_weights_without_their_scales_are_refused(checkpoints, tmp_path):
    # A checkpoint whose config lost its quantization_config: casting e4m3 codes would serve other weights.
    path, _ = checkpoints("qwen2_moe", "fp8")
    copy = tmp_path / "no-config"
    shutil.copytree(path, copy)
    raw = json.loads((copy / "config.json").read_text())
    del raw["quantization_config"]
    (copy / "config.json").write_text(json.dumps(raw))
    config = MoEConfig.from_pretrained(copy)
    with pytest.raises(CheckpointError, match="float8_e4m3fn without the quantization_config"):
        ExpertLayout(CheckpointReader(copy), config).load_block(0, 0, 1, torch.float32)
    with pytest.raises(CheckpointError, match="float8_e4m3fn without the quantization_config"):
        MoEModel.from_pretrained(copy)
