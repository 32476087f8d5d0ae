"""int8-static and fp8-dynamic inside QuantLinear: reference paths against written-out float64 oracles,
kernels against the reference, stored-tensor checks, and modes that cannot run on a device."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from hfquant.activations import FP8_DYNAMIC, INT8_STATIC, int8_scale_for_range
from hfquant.formats.affine import IntAffine
from hfquant.formats.fp8 import FP8
from hfquant.nn import kernels
from hfquant.nn.qlinear import QuantLinear
from hfquant.schemes import LayerScheme

W8 = IntAffine(bits=8, group_size=-1, sym=True)
E4M3 = FP8(group_size=-1, variant="e4m3")
SHAPES = [((1, 1, 21), 13), ((1, 7), 5), ((3, 5, 33), 17), ((40, 64), 48)]  # (input shape, out_features)


def _layer(in_features: int, out_features: int, mode, fmt, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = QuantLinear(in_features, out_features, LayerScheme(fmt, mode), bias=True)
    layer.load_quantized(fmt.quantize(torch.randn(out_features, in_features, generator=gen)))
    layer.bias.data.copy_(torch.randn(out_features, generator=gen))
    return layer


def _static_layer(in_features: int, out_features: int, clip: float = 1.5) -> QuantLinear:
    layer = _layer(in_features, out_features, INT8_STATIC, W8)
    layer.load_input_params(int8_scale_for_range(clip))  # N(0, 1) inputs: values beyond 1.5 are clipped
    return layer


def _static_oracle(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """Straightforward float64 W8A8 static: one scale for the tensor, round, clip, integer matmul, dequantize."""
    s = layer.input_scale.double()
    q = torch.clamp(torch.round(x.double() / s), -127, 127)
    w_scale = layer.weight_scale.double().reshape(1, -1)
    w_int = torch.round(layer.dequantized_weight(torch.float64) / w_scale.T)
    return (q @ w_int.T) * s * w_scale[0] + layer.bias.double()


@pytest.mark.parametrize(("shape", "out_features"), SHAPES)
def test_static_reference_equals_float64_oracle(shape: tuple, out_features: int) -> None:
    layer = _static_layer(shape[-1], out_features)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x).double(), _static_oracle(x, layer), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(("shape", "out_features"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_int_mm_kernel_equals_reference(shape: tuple, out_features: int, dtype: torch.dtype) -> None:
    layer = _static_layer(shape[-1], out_features)
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    reference = layer(x)
    assert layer.prepare_kernel(dtype) == "int8-static-int-mm-cpu"
    assert torch.equal(layer(x), reference)


def test_static_error_is_small_within_range_and_clips_outside() -> None:
    layer = _static_layer(64, 32, clip=4.0)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    exact = x @ layer.dequantized_weight().T + layer.bias
    assert 0 < (layer(x) - exact).norm() / exact.norm() < 0.02
    big = torch.zeros(1, 64)
    big[0, 0] = 100.0  # 25x the calibrated range: clipped to 4
    clipped = torch.zeros(1, 64)
    clipped[0, 0] = 4.0
    assert torch.equal(layer(big), layer(clipped))


def test_static_kernel_is_only_for_static_layers() -> None:
    assert kernels.plan_for(W8, 64, 32, "cpu", torch.float32, activations="int8-static").kernel.name == \
        "int8-static-int-mm-cpu"
    assert kernels.plan_for(W8, 64, 32, "cpu", torch.float32, activations="int8-dynamic").kernel.name == "int8-int-mm-cpu"


def _fp8_oracle(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """Per-row scale max|x| / 448, cast to e4m3, products of the decoded values in float64, dequantize."""
    rows = x.reshape(-1, x.shape[-1]).double()
    w = layer.dequantized_weight(torch.float64)
    out = []
    for row in rows:
        amax = row.abs().max()
        scale = amax / 448 if amax > 0 else torch.tensor(1.0, dtype=torch.float64)
        q = (row / scale).float().to(torch.float8_e4m3fn).double()
        out.append((q @ w.T) * scale + layer.bias.double())
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize(("shape", "out_features"), SHAPES)
def test_fp8_dynamic_reference_equals_float64_oracle(shape: tuple, out_features: int) -> None:
    layer = _layer(shape[-1], out_features, FP8_DYNAMIC, E4M3)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    rows = x.reshape(-1, shape[-1])
    if len(rows) > 1:
        rows[0] = 0  # a zero row: scale 1, codes 0, the bias
    got = layer(x)
    torch.testing.assert_close(got.double(), _fp8_oracle(x, layer), rtol=1e-5, atol=1e-5)
    exact = x @ layer.dequantized_weight().T + layer.bias
    assert 0 < (got - exact).norm() / exact.norm() < 0.1


def test_fp8_dynamic_scaled_mm_matches_reference_on_cpu() -> None:
    """The CUDA kernel's maths through torch's CPU ``_scaled_mm`` (multiples of 16, as cuBLASLt wants)."""
    layer = _layer(64, 48, FP8_DYNAMIC, E4M3)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    lay = kernels._fp8_layout(E4M3, 64, 48)
    tensors = kernels.FP8_DYNAMIC_CUDA.pack(layer.stored(), E4M3, lay, torch.float32)
    got = kernels.FP8_DYNAMIC_CUDA.matmul(x, tensors, lay) + layer.bias
    torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the fp8-dynamic "
                                                          "_scaled_mm route (sm89+) is not run here")
def test_fp8_dynamic_cuda_route_matches_reference() -> None:
    layer = _layer(256, 128, FP8_DYNAMIC, E4M3).to("cuda", torch.bfloat16)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(6)).to("cuda", torch.bfloat16)
    reference = layer(x).float()
    if layer.prepare_kernel(torch.bfloat16) != "fp8-dynamic-scaled-mm-cuda":
        pytest.skip("this GPU has no float8 GEMM (compute capability below 8.9)")
    torch.testing.assert_close(layer(x).float(), reference, rtol=0.02, atol=0.02 * float(reference.abs().max()))


def test_modes_refuse_weights_they_cannot_run_with() -> None:
    with pytest.raises(ValueError, match="'int8-static' takes symmetric per-channel int8"):
        LayerScheme(IntAffine(bits=8, group_size=-1, sym=False), INT8_STATIC)
    with pytest.raises(ValueError, match="'fp8-dynamic' takes per-channel fp8-e4m3"):
        LayerScheme(FP8(group_size=-1, variant="e5m2"), FP8_DYNAMIC)
    with pytest.raises(ValueError, match="'fp8-dynamic' takes"):
        LayerScheme(FP8(group_size=32, variant="e4m3"), FP8_DYNAMIC)


def test_a_mode_on_a_device_it_cannot_run_on_says_so_when_prepared() -> None:
    cuda_only = dataclasses.replace(INT8_STATIC, devices=("cuda",))
    layer = QuantLinear(16, 8, LayerScheme(W8, cuda_only))
    with pytest.raises(ValueError, match=r"int8-static.*cannot run on device 'cpu'; it runs on \['cuda'\]"):
        layer.prepare_kernel(torch.float32)
    assert INT8_STATIC.check_device("mps") is not None and INT8_STATIC.check_device("cuda:1") is None


@pytest.mark.parametrize(("value", "match"), [
    (torch.zeros(1), "input_scale has non-finite or non-positive values"),
    (torch.tensor([-0.1]), "non-positive"),
    (torch.tensor([float("nan")]), "non-finite"),
    (torch.ones(2), r"tensor 'input_scale' is float32 \(2,\), activations='int8-static' stores float32 \(1,\)"),
    (torch.ones(1, dtype=torch.float16), "is float16"),
])
def test_stored_input_scale_is_checked(value: torch.Tensor, match: str) -> None:
    assert INT8_STATIC.check_stored({"input_scale": torch.ones(1)}) is None
    assert "missing" in INT8_STATIC.check_stored({})
    problem = INT8_STATIC.check_stored({"input_scale": value})
    assert problem is not None and re.search(match, problem), problem


def test_input_scale_is_stored_moves_and_keeps_its_dtype() -> None:
    layer = _static_layer(16, 8)
    assert set(layer.state_dict()) == {"weight", "weight_scale", "input_scale", "bias"}
    layer.to(torch.bfloat16)
    assert layer.input_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
