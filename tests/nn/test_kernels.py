"""Kernels vs the reference path, the dispatch table, and what repacking must not change.

Tolerances (max |kernel - exact| / max |exact|, with "exact" = float64 matmul on the oracle's
dequantized weight): float32 1e-5; float16 2e-3; bfloat16 2e-2. The 16-bit bounds are a few times
the reference path's own error in that dtype (its weight and output are rounded the same way).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfquant
import hfquant.formats
from affine_reference import decode as reference_decode
from hfquant.formats.affine import IntAffine
from hfquant.nn import kernels
from hfquant.nn.qlinear import QuantLinear, prepare_for_inference
from hfquant.schemes import LayerScheme

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOLERANCE)
X_SHAPES = [(1,), (7,), (2, 5)]  # leading dims of the input: 1 token, 7 tokens, a 3-D batch
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fmt(bits: int, group_size: int = 128, sym: bool = False) -> IntAffine:
    return IntAffine(bits=bits, group_size=group_size, sym=sym)


# (format, in_features): per channel, groups of 32..256, ragged last groups, groups torch splits.
INT4_CASES = [(_fmt(4, g, sym), k) for (g, k), sym in itertools.product(
    [(32, 256), (64, 256), (128, 256), (256, 512), (-1, 256), (128, 576), (128, 200), (512, 1024), (-1, 200)],
    (False, True))]
WIDENED_CASES = [(_fmt(3, 128), 256), (_fmt(3, 64, sym=True), 200), (_fmt(2, 64), 256),
                 (_fmt(2, 32, sym=True), 96)]
INT8_CASES = [(_fmt(8, -1, sym), k) for sym, k in itertools.product((True, False), (256, 200, 33))]
KERNEL_CASES = {"int4pack": INT4_CASES + WIDENED_CASES, "int8pack": INT8_CASES}
EVERY_KERNEL_CASE = pytest.mark.parametrize(
    "kind, fmt, in_features", [(kind, f, k) for kind, cases in KERNEL_CASES.items() for f, k in cases],
    ids=lambda v: getattr(v, "name", str(v)))


def _stored(fmt: IntAffine, out_features: int, in_features: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05 + 0.01  # off-centre: asym zeros != mid
    return fmt.quantize(weight).stored()


def _relative_error(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    exact = x.double() @ weight.double().T
    return float((got.double() - exact).abs().max() / exact.abs().max())


def _check_kernel(kernel: kernels.Kernel, fmt: IntAffine, in_features: int, dtype: torch.dtype,
                  device: str, compute_dtype: torch.dtype | None = None) -> None:
    """The kernel, run as a route for ``dtype`` activations computing in ``compute_dtype``, vs exact maths."""
    route = kernels.Route(kernel.name, device, dtype, compute_dtype=compute_dtype)
    if not kernels.kernel_works(kernel.name, device, route.computes_in):
        pytest.skip(f"{kernel.name} does not run with {route.computes_in} in this torch build")
    out_features = 48
    layout = kernel.layout(fmt, in_features, out_features)
    assert layout is not None, f"{kernel.name} should take {fmt.name} with in_features={in_features}"
    stored = {k: v.to(device) for k, v in _stored(fmt, out_features, in_features).items()}
    tensors = kernel.pack(stored, fmt, layout, route.computes_in)
    weight = reference_decode({k: v.cpu() for k, v in stored.items()}, fmt, in_features)
    plan = kernels.Plan(kernel, route, layout)
    gen = torch.Generator().manual_seed(1)
    for lead in X_SHAPES:
        x = torch.randn(*lead, in_features, generator=gen).to(device=device, dtype=dtype)
        got = plan.linear(x, tensors, None)
        assert got.shape == (*lead, out_features) and got.dtype == dtype
        err = _relative_error(got.cpu().reshape(-1, out_features), x.cpu().reshape(-1, in_features), weight)
        assert err < TOLERANCE[route.computes_in], f"{kernel.name} {fmt.name} {route} x{lead}: error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@EVERY_KERNEL_CASE
def test_cpu_kernel_matches_exact(kind: str, fmt: IntAffine, in_features: int, dtype: torch.dtype) -> None:
    _check_kernel(kernels.KERNELS[f"{kind}-cpu"], fmt, in_features, dtype, "cpu")


@EVERY_KERNEL_CASE
def test_cpu_kernel_on_float32_through_bfloat16(kind: str, fmt: IntAffine, in_features: int) -> None:
    _check_kernel(kernels.KERNELS[f"{kind}-cpu"], fmt, in_features, torch.float32, "cpu", torch.bfloat16)


@CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@EVERY_KERNEL_CASE
def test_cuda_kernel_matches_exact(kind: str, fmt: IntAffine, in_features: int, dtype: torch.dtype) -> None:
    _check_kernel(kernels.KERNELS[f"{kind}-cuda"], fmt, in_features, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [_fmt(b, g, s) for b, g, s in itertools.product((2, 3, 4, 8), (-1, 32, 48, 128),
                                                                                        (True, False))],
                         ids=lambda f: f.name)
def test_fast_dequantize_is_bit_identical_to_oracle(fmt: IntAffine, dtype: torch.dtype) -> None:
    stored = _stored(fmt, 24, 200)  # 200 columns: the last group is short for every group size here
    assert torch.equal(fmt.decode(stored, 200, dtype), reference_decode(stored, fmt, 200, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_forward_matches_exact(dtype: torch.dtype) -> None:
    fmt = _fmt(3, 48)
    layer = QuantLinear(200, 40, LayerScheme(fmt), bias=True, dtype=dtype)
    layer.load_quantized(fmt.quantize(torch.randn(40, 200) * 0.05))
    layer.bias.data.normal_()
    x = torch.randn(2, 5, 200, dtype=dtype)
    weight = torch.cat([layer.dequantized_weight(torch.float64), layer.bias.double()[:, None]], dim=1)
    got = layer(x).reshape(10, 40)
    err = _relative_error(got, torch.cat([x.reshape(10, 200), torch.ones(10, 1, dtype=dtype)], dim=1), weight)
    assert err < TOLERANCE[dtype]


def test_reference_path_in_row_blocks_matches_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = _fmt(4, 32)
    stored = _stored(fmt, 40, 200)
    bias = torch.randn(40)
    x = torch.randn(2, 3, 200)
    whole = kernels.reference_linear(x, stored, fmt, 200, bias)
    monkeypatch.setattr(kernels, "REFERENCE_CHUNK", 1000)  # blocks of 16 output rows: 16 + 16 + 8
    torch.testing.assert_close(kernels.reference_linear(x, stored, fmt, 200, bias), whole, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Dispatch table
# ------------------------------------------------------------------------------------------------


def test_routes_name_known_kernels_of_their_device() -> None:
    for route in kernels.ROUTES:
        assert kernels.KERNELS[route.kernel].device_type == route.device_type


@pytest.mark.parametrize("fmt, out_features, in_features, dtype, widen, expected", [
    (_fmt(4, 128), 64, 256, torch.bfloat16, False, "int4pack-cpu"),
    (_fmt(4, -1, sym=True), 64, 200, torch.bfloat16, False, "int4pack-cpu"),
    (_fmt(8, -1, sym=True), 64, 256, torch.bfloat16, False, "int8pack-cpu"),
    (_fmt(3, 128), 64, 256, torch.bfloat16, False, None),  # no 3-bit kernel
    (_fmt(2, 64), 64, 256, torch.bfloat16, False, None),
    (_fmt(3, 128), 64, 256, torch.bfloat16, True, "int4pack-cpu"),  # unless widening is allowed
    (_fmt(8, 128, sym=True), 64, 256, torch.bfloat16, False, None),  # int8 kernel: per channel only
    (_fmt(4, 48), 64, 256, torch.bfloat16, False, None),  # 48 is no multiple of 32
    (_fmt(4, 16), 64, 256, torch.bfloat16, False, None),
    (_fmt(4, 128), 40, 256, torch.bfloat16, False, None),  # out_features % 16
    (_fmt(4, 128), 64, 256, torch.float32, False, "int4pack-cpu"),
    (_fmt(8, -1, sym=True), 64, 256, torch.float32, False, "int8pack-cpu"),
    (_fmt(8, -1, sym=True), 64, 256, torch.float16, False, "int8pack-cpu"),
    (_fmt(4, 128), 64, 256, torch.float16, False, "dequant-mm-cpu"),  # int4pack loses even at 1 token
    (_fmt(3, 128), 64, 256, torch.float32, False, "dequant-mm-cpu"),  # no 3-bit kernel: long inputs only
])
def test_plan_for_cpu(fmt: IntAffine, out_features: int, in_features: int, dtype: torch.dtype, widen: bool,
                      expected: str | None) -> None:
    plan = kernels.plan_for(fmt, in_features, out_features, "cpu", dtype, widen)
    assert (plan and plan.kernel.name) == expected


@pytest.mark.parametrize("bits, group_size", [(4, 128), (8, -1)])
def test_kernel_modes_choose_what_may_run(bits: int, group_size: int) -> None:
    fmt = _fmt(bits, group_size, sym=True)
    auto = kernels.plan_for(fmt, 256, 64, "cpu", torch.float32, mode="auto")
    assert auto.route.computes_in == torch.bfloat16 and auto.route.max_tokens > 1  # fast, bf16 rounding
    exact = kernels.plan_for(fmt, 256, 64, "cpu", torch.float32, mode="exact")
    assert exact.route.computes_in == torch.float32 and exact.route.max_tokens == 1
    assert kernels.plan_for(fmt, 256, 64, "cpu", torch.float32, mode="off") is None
    with pytest.raises(ValueError, match="kernels='fast'.*'auto', 'exact', 'off'"):
        kernels.plan_for(fmt, 256, 64, "cpu", torch.float32, mode="fast")


def test_token_limit_routes_large_inputs_to_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = _fmt(4, 32)
    layer = QuantLinear(64, 32, LayerScheme(fmt), bias=False)
    layer.load_quantized(fmt.quantize(torch.randn(32, 64)))
    assert layer.prepare_kernel(torch.bfloat16) == "int4pack-cpu"
    limit = layer.kernel_plan.route.max_tokens
    calls = []
    real = kernels.reference_linear
    monkeypatch.setattr(kernels, "reference_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    layer(torch.randn(1, limit, 64, dtype=torch.bfloat16))
    assert calls == []
    layer(torch.randn(1, limit + 1, 64, dtype=torch.bfloat16))
    layer(torch.randn(3, 64, dtype=torch.float16))  # not the dtype prepared for
    assert calls == [(1, limit + 1, 64), (3, 64)]


# ------------------------------------------------------------------------------------------------
# Module state: buffers, state_dict, moves
# ------------------------------------------------------------------------------------------------


def _layer(in_features: int = 64, out_features: int = 32) -> QuantLinear:
    fmt = _fmt(4, 32)
    layer = QuantLinear(in_features, out_features, LayerScheme(fmt), bias=True)
    layer.load_quantized(fmt.quantize(torch.randn(out_features, in_features)))
    return layer


def test_kernel_tensors_stay_out_of_state_dict() -> None:
    layer = _layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.prepare_kernel(torch.bfloat16) == "int4pack-cpu"
    assert layer.kernel_tensors() and all(n.startswith("kernel_") for n, _ in layer.named_buffers())
    after = layer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    layer.release_kernel()
    assert not list(layer.named_buffers()) and layer.kernel_plan is None


def test_moving_or_casting_repacks() -> None:
    layer = _layer()
    assert layer.prepare_kernel(torch.float16) == "dequant-mm-cpu"  # long inputs only: nothing repacked
    assert not layer.kernel_tensors()
    layer.to(torch.bfloat16)  # activations become bfloat16, which has a CPU kernel
    assert layer.kernel_plan is not None and layer.kernel_plan.route.dtype == torch.bfloat16
    assert layer.kernel_tensors()["scales_and_zeros"].dtype == torch.bfloat16
    layer.to(torch.float16)
    assert layer.kernel_names() == "dequant-mm-cpu" and not layer.kernel_tensors()


def test_meta_layers_stay_on_reference() -> None:
    layer = QuantLinear(64, 32, LayerScheme(_fmt(4, 32)), device="meta")
    assert layer.prepare_kernel(torch.bfloat16) == "reference"


# ------------------------------------------------------------------------------------------------
# Through transformers
# ------------------------------------------------------------------------------------------------

IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 120, 77, 1, 2, 31, 9]])


@pytest.fixture(scope="module")
def bf16_llama(tiny_checkpoints: dict) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.bfloat16,
                                                quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))


def test_loading_prepares_kernels(bf16_llama: torch.nn.Module) -> None:
    names = {m.kernel_plan.kernel.name if m.kernel_plan else None
             for m in bf16_llama.modules() if isinstance(m, QuantLinear)}
    assert names == {"int4pack-cpu"}  # every quantized layer of the tiny Llama fits the int4 CPU kernel


def test_prepare_for_inference_infers_the_activation_dtype(bf16_llama: torch.nn.Module) -> None:
    used = prepare_for_inference(bf16_llama)  # dtype from the embeddings: bfloat16
    assert len(used) == 14 and set(used.values()) == {"int4pack-cpu"}  # 2 layers x 7 projections


def test_save_reload_after_repacking_is_bit_exact(bf16_llama: torch.nn.Module, tmp_path: Path) -> None:
    layers = {n: m for n, m in bf16_llama.named_modules() if isinstance(m, QuantLinear)}
    with torch.no_grad():
        logits = bf16_llama(IDS).logits
    bf16_llama.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("kernel_" in k for k in saved)
    for name, layer in layers.items():
        for key, tensor in layer.stored().items():
            assert torch.equal(saved[f"{name}.{key}"], tensor), f"{name}.{key}"
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(m.kernel_plan is not None for m in again.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, logits)
    # And repacking changed no answer beyond the kernel's tolerance: compare with the reference path.
    for layer in (m for m in again.modules() if isinstance(m, QuantLinear)):
        layer.release_kernel()
    with torch.no_grad():
        reference = again(IDS).logits
    assert float((reference - logits).abs().max() / reference.abs().max()) < 0.05


@pytest.mark.parametrize("mode, kernel, computes_in", [("auto", "int4pack-cpu", torch.bfloat16),
                                                        ("exact", "int4pack-cpu", torch.float32),
                                                        ("off", None, None)])
def test_config_kernels_mode_reaches_the_layers(tiny_checkpoints: dict, mode: str, kernel: str | None,
                                                computes_in: torch.dtype | None) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], dtype=torch.float32,
        quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32, kernels=mode))
    plans = {m.kernel_plan for m in model.modules() if isinstance(m, QuantLinear)}
    assert {p and p.kernel.name for p in plans} == {kernel}
    assert {p and p.route.computes_in for p in plans} == {computes_in}
    assert "kernels" not in model.config.quantization_config.to_dict()  # a runtime choice, never saved
    if mode == "off":
        hfquant.prepare_for_inference(model, kernels="auto")  # the switch for a reloaded model
        assert all(m.kernel_plan for m in model.modules() if isinstance(m, QuantLinear))


# ------------------------------------------------------------------------------------------------
# float8: torch._scaled_mm with per-token activation scales (W8A8)
# ------------------------------------------------------------------------------------------------


FP8_CASES = [(out_features, in_features) for out_features, in_features in ((48, 256), (64, 576), (16, 16))]


def _fp8_expected(x: torch.Tensor, stored: dict[str, torch.Tensor], fmt) -> torch.Tensor:  # noqa: ANN001
    """What the kernel computes, written out: activations rounded to e4m3 per token, float64 matmul."""
    x = x.double()
    scale = x.abs().amax(dim=1, keepdim=True) / 448
    x_rounded = (x / scale).to(torch.float8_e4m3fn).double() * scale
    return x_rounded @ fmt.decode(stored, x.shape[1], torch.float64).T


@pytest.mark.parametrize("out_features, in_features", FP8_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp8_kernel_maths_through_cpu_scaled_mm(out_features: int, in_features: int, dtype: torch.dtype) -> None:
    """The CUDA kernel's pack and matmul, run on torch's CPU ``_scaled_mm``: the W8A8 maths it claims."""
    kernel, fmt = kernels.FP8_CUDA, hfquant.formats.make_format("fp8")
    if not kernels.kernel_works(kernel.name, "cpu", dtype):
        pytest.skip("this torch build has no CPU _scaled_mm")
    gen = torch.Generator().manual_seed(0)
    stored = fmt.quantize(torch.randn(out_features, in_features, generator=gen) * 0.05).stored()
    layout = kernel.layout(fmt, in_features, out_features)
    tensors = kernel.pack(stored, fmt, layout, dtype)
    assert tensors["weight"].untyped_storage().data_ptr() == stored["weight"].untyped_storage().data_ptr()  # a view
    x = torch.randn(7, in_features, generator=gen).to(dtype)
    got = kernel.matmul(x, tensors, layout)
    assert got.dtype == dtype
    expected = _fp8_expected(x, stored, fmt)
    assert float((got.double() - expected).abs().max() / expected.abs().max()) < TOLERANCE[dtype]
    # against the weight-only reference: the extra error is the activations' e4m3 rounding (2**-4 relative)
    assert _relative_error(got, x, fmt.decode(stored, in_features, torch.float32)) < 0.05


@pytest.mark.parametrize("name, group_size, in_features, takes", [
    ("fp8", -1, 256, True), ("fp8-e4m3", -1, 4096, True),
    ("fp8", 128, 256, False),  # the kernel scales whole output rows
    ("fp8-e5m2", -1, 256, False), ("fp8", -1, 200, False),  # e5m2 codes; in_features % 16
    ("int8", -1, 256, False), ("nf4", 64, 256, False),
])
def test_fp8_kernel_takes_per_channel_e4m3_only(name: str, group_size: int, in_features: int, takes: bool) -> None:
    fmt = hfquant.formats.make_format(name, group_size=group_size)
    kernel = kernels.FP8_CUDA
    assert (kernel.takes(fmt, widen=True) and kernel.layout(fmt, in_features, 64) is not None) == takes


def test_fp8_route_is_never_exact() -> None:
    (route,) = [r for r in kernels.ROUTES if r.kernel == kernels.FP8_CUDA.name]
    assert route.computes_in == route.dtype and not route.exact  # kernels="exact" keeps fp8 on the reference path


@CUDA
@pytest.mark.parametrize("out_features, in_features", FP8_CASES)
def test_fp8_kernel_on_cuda(out_features: int, in_features: int) -> None:
    fmt = hfquant.formats.make_format("fp8")
    if not kernels.kernel_works(kernels.FP8_CUDA.name, "cuda", torch.bfloat16):
        pytest.skip("this GPU has no float8 GEMM (needs compute capability 8.9+)")
    gen = torch.Generator().manual_seed(0)
    layer = QuantLinear(in_features, out_features, LayerScheme(fmt), bias=False)
    layer.load_quantized(fmt.quantize(torch.randn(out_features, in_features, generator=gen) * 0.05))
    layer = layer.cuda()
    assert layer.prepare_kernel(torch.bfloat16) == kernels.FP8_CUDA.name
    assert layer.prepare_kernel(torch.bfloat16, mode="exact") == "reference"
    layer.prepare_kernel(torch.bfloat16)
    x = torch.randn(7, in_features, generator=gen).to("cuda", torch.bfloat16)
    stored = {k: v.cpu() for k, v in layer.stored().items()}
    expected = _fp8_expected(x.cpu(), stored, fmt)
    assert float((layer(x).cpu().double() - expected).abs().max() / expected.abs().max()) < TOLERANCE[torch.bfloat16]


# ------------------------------------------------------------------------------------------------
# dequant-mm-cpu: the long-input route (decode in bfloat16, dense bfloat16 matmul)
# ------------------------------------------------------------------------------------------------

# Every registered format, at odd shapes: ragged last groups, in_features no multiple of anything.
DEQUANT_CASES = [(hfquant.formats.make_format(name, **({} if name in ("fp16", "bf16") else {"group_size": g})), k)
                 for name in hfquant.formats.format_names() for g, k in ((32, 200), (-1, 77))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fmt, in_features", DEQUANT_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_dequant_route_matches_reference(fmt: hfquant.formats.WeightFormat, in_features: int,
                                         dtype: torch.dtype) -> None:
    """Within bfloat16's tolerance of exact maths, for every format; rows decoded in blocks like the reference."""
    kernel = kernels.KERNELS["dequant-mm-cpu"]
    out_features = 40
    gen = torch.Generator().manual_seed(0)
    stored = fmt.quantize(torch.randn(out_features, in_features, generator=gen) * 0.05).stored()
    lay = kernel.layout(fmt, in_features, out_features)
    plan = kernels.Plan(kernel, kernels.Route(kernel.name, "cpu", dtype, compute_dtype=torch.bfloat16), lay)
    weight = fmt.decode(stored, in_features, torch.float64)
    for lead in X_SHAPES + [(3, 70)]:
        x = torch.randn(*lead, in_features, generator=gen).to(dtype)
        got = plan.linear(x, stored, None)
        assert got.shape == (*lead, out_features) and got.dtype == dtype
        err = _relative_error(got.reshape(-1, out_features), x.reshape(-1, in_features), weight)
        assert err < TOLERANCE[torch.bfloat16], f"{fmt.name} x{lead}: error {err:.2e}"


def test_long_inputs_take_the_dequant_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 'auto': the int4 kernel up to its limit, then dequant-mm in bfloat16 (never the float32 reference)."""
    fmt = _fmt(4, 32)
    layer = QuantLinear(64, 32, LayerScheme(fmt), bias=True)
    layer.load_quantized(fmt.quantize(torch.randn(32, 64)))
    layer.bias.data.normal_()
    assert layer.prepare_kernel(torch.float32) == "int4pack-cpu+dequant-mm-cpu"
    short, long = layer.kernel_plans
    assert long.route.max_tokens is None and long.route.computes_in == torch.bfloat16
    calls = []
    real = kernels.reference_linear
    monkeypatch.setattr(kernels, "reference_linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    assert long.route.min_tokens <= short.route.max_tokens + 1  # no gap between the two routes
    x = torch.randn(2, short.route.max_tokens, 64)
    got = layer(x)
    assert calls == [torch.bfloat16]  # dequant-mm-cpu is the reference path computed in bfloat16
    weight = torch.cat([layer.dequantized_weight(torch.float64), layer.bias.double()[:, None]], dim=1)
    ones = torch.ones(x.shape[0] * x.shape[1], 1)
    assert _relative_error(got.reshape(-1, 32), torch.cat([x.reshape(-1, 64), ones], 1), weight) < 2e-2
    assert not layer.kernel_tensors().keys() - {"weight", "scales_and_zeros"}  # dequant-mm repacks nothing


def test_plans_for_skips_routes_that_never_run() -> None:
    fmt = _fmt(8, -1, sym=True)
    int8, dequant = "int8pack-cpu", "dequant-mm-cpu"
    routes = (kernels.Route(int8, "cpu", torch.float32, max_tokens=8, compute_dtype=torch.bfloat16),
              kernels.Route(int8, "cpu", torch.float32, max_tokens=1),  # shadowed: fewer tokens than the first
              kernels.Route("int4pack-cpu", "cpu", torch.float32, max_tokens=64),  # a second repacked copy
              kernels.Route(dequant, "cpu", torch.float32, compute_dtype=torch.bfloat16),
              kernels.Route(dequant, "cpu", torch.float32, max_tokens=4096))  # after "any number"
    plans = kernels.plans_for(fmt, 256, 64, "cpu", torch.float32, routes=routes)
    assert [(p.kernel.name, p.route.max_tokens) for p in plans] == [(int8, 8), (dequant, None)]
    exact = kernels.plans_for(fmt, 256, 64, "cpu", torch.float32, mode="exact", routes=routes)
    assert [(p.kernel.name, p.route.max_tokens) for p in exact] == [(int8, 1), (dequant, 4096)]


def test_min_tokens_leaves_short_inputs_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """3-bit codes have no kernel without widening: float32 inputs below the route's minimum stay float32."""
    fmt = _fmt(3, 32)
    layer = QuantLinear(64, 32, LayerScheme(fmt), bias=False)
    layer.load_quantized(fmt.quantize(torch.randn(32, 64)))
    assert layer.prepare_kernel(torch.float32) == "dequant-mm-cpu"
    first = layer.kernel_plan.route.min_tokens
    calls = []
    real = kernels.reference_linear
    monkeypatch.setattr(kernels, "reference_linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    layer(torch.randn(first - 1, 64))
    layer(torch.randn(first, 64))
    assert calls == [torch.float32, torch.bfloat16]


def test_long_prompt_through_a_model_matches_the_reference(tiny_checkpoints: dict) -> None:
    """A float32 int4 model on a prompt past the int4 kernel's limit: the dequant-mm route, close to the reference."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32,
                                                 quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {m.kernel_names() for m in layers} == {"int4pack-cpu+dequant-mm-cpu"}
    tokens = layers[0].kernel_plans[1].route.min_tokens + 9
    ids = torch.randint(0, 100, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(ids).logits
        hfquant.prepare_for_inference(model, kernels="off")
        reference = model(ids).logits
    assert float((fast - reference).abs().max() / reference.abs().max()) < 0.05
