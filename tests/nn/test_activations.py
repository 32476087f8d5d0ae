"""W8A8 dynamic activation quantization: the reference path against a written-out float64 oracle,
the ``torch._int_mm`` kernel against the reference, schemes and config validation."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hfquant
from hfquant.activations import INT8_DYNAMIC, get_activation_mode
from hfquant.formats.affine import IntAffine
from hfquant.nn import kernels
from hfquant.nn.qlinear import QuantLinear
from hfquant.schemes import LayerScheme

W8 = IntAffine(bits=8, group_size=-1, sym=True)
SHAPES = [((1, 1, 21), 13), ((1, 7), 5), ((3, 5, 33), 17), ((40, 64), 48)]  # (input shape, out_features)


def _layer(in_features: int, out_features: int, seed: int = 0) -> tuple[QuantLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    layer = QuantLinear(in_features, out_features, LayerScheme(W8, INT8_DYNAMIC), bias=True)
    layer.load_quantized(W8.quantize(weight))
    layer.bias.data.copy_(torch.randn(out_features, generator=gen))
    return layer, weight


def _oracle(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """Straightforward float64 W8A8: per-row scale max|x|/127, round, integer matmul, dequantize."""
    rows = x.reshape(-1, x.shape[-1]).double()
    w_scale = layer.weight_scale.double().reshape(1, -1)
    w_int = torch.round(layer.dequantized_weight(torch.float64) / w_scale.T)  # q - 128, integers
    out = []
    for row in rows:
        amax = row.abs().max()
        scale = amax / 127 if amax > 0 else torch.tensor(1.0, dtype=torch.float64)
        q = torch.clamp(torch.round(row / scale), -127, 127)
        out.append((q @ w_int.T) * scale * w_scale[0] + layer.bias.double())
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize(("shape", "out_features"), SHAPES)
def test_reference_path_equals_float64_oracle(shape: tuple, out_features: int) -> None:
    layer, _ = _layer(shape[-1], out_features)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = layer(x)
    want = _oracle(x, layer)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(("shape", "out_features"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_mm_kernel_equals_reference(shape: tuple, out_features: int, dtype: torch.dtype) -> None:
    layer, _ = _layer(shape[-1], out_features)
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    reference = layer(x)
    assert layer.prepare_kernel(dtype) == "int8-int-mm-cpu"
    assert torch.equal(layer(x), reference)  # same int sums, same float32 dequantization


def test_quantization_error_is_small_and_zero_rows_give_bias() -> None:
    layer, weight = _layer(64, 32)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    x[4] = 0
    y = layer(x)
    exact = x @ weight.T + layer.bias
    assert torch.equal(y[4], layer.bias.data)
    assert 0 < (y - exact).norm() / exact.norm() < 0.02


def test_weight_only_kernels_never_run_an_activation_quantized_layer_and_back() -> None:
    assert kernels.plan_for(W8, 64, 32, "cpu", torch.bfloat16, activations="int8-dynamic").kernel.name == "int8-int-mm-cpu"
    assert kernels.plan_for(W8, 64, 32, "cpu", torch.bfloat16).kernel.name == "int8pack-cpu"
    assert kernels.plan_for(W8, 64, 32, "cpu", torch.float32, activations="int8-dynamic", mode="off") is None


def test_scheme_saves_its_input_mode_and_old_schemes_still_load() -> None:
    scheme = LayerScheme(W8, INT8_DYNAMIC)
    assert scheme.to_dict()["input"] == "int8-dynamic" and LayerScheme.from_dict(scheme.to_dict()) == scheme
    assert scheme.name != LayerScheme(W8).name
    old = {"weight": W8.to_dict()}
    assert LayerScheme.from_dict(old) == LayerScheme(W8) and "input" not in LayerScheme(W8).to_dict()
    with pytest.raises(ValueError, match="input='int4-static'"):
        LayerScheme.from_dict({"weight": W8.to_dict(), "input": "int4-static"})
    with pytest.raises(ValueError, match="int8-dynamic"):
        LayerScheme(IntAffine(bits=4, group_size=32), INT8_DYNAMIC)
    with pytest.raises(ValueError, match="plan: scheme.*int8-dynamic.*not allowed with weight format"):
        hfquant.HfQuantConfig(format="int8", plan={
            "schemes": {"int4-g32-asym+int8-dynamic": {"weight": IntAffine(bits=4, group_size=32).to_dict(),
                                                        "input": "int8-dynamic"}},
            "layers": {"model.layers.0.mlp.up_proj": "int4-g32-asym+int8-dynamic"}})


@pytest.mark.parametrize("value", ["int4-static", "INT8-DYNAMIC", "", 8, True, ["int8-dynamic"]])
def test_bad_activation_values_name_the_field(value: object) -> None:
    with pytest.raises(ValueError, match=r"activations=.*not allowed.*int8-dynamic"):
        hfquant.HfQuantConfig(format="int8", group_size=-1, activations=value)
    with pytest.raises(ValueError, match="activations"):
        get_activation_mode(value)


@pytest.mark.parametrize("weights", [dict(format="int4"), dict(format="int8", sym=False),
                                     dict(format="int8", group_size=32), dict(format="fp8"), dict(format="nf4")])
def test_activations_refuse_weights_they_cannot_run_with(weights: dict) -> None:
    with pytest.raises(ValueError, match=r"activations='int8-dynamic' is not allowed with weight format.*int8"):
        hfquant.HfQuantConfig(**weights, activations="int8-dynamic")


def test_config_records_activations_and_rules_set_them_per_layer() -> None:
    cfg = hfquant.HfQuantConfig(format="int8", group_size=-1, activations="int8-dynamic")
    saved = cfg.to_dict()
    assert saved["activations"] == "int8-dynamic"
    assert hfquant.HfQuantConfig(**saved).default_scheme == cfg.default_scheme
    assert hfquant.HfQuantConfig(format="int8").to_dict()["activations"] is None
    ruled = hfquant.HfQuantConfig(format="int4", rules={"mlp": {"format": "int8", "activations": "int8-dynamic"}})
    assert ruled.quant_plan.rules[0][1].input is INT8_DYNAMIC and ruled.default_scheme.input is None
    assert hfquant.HfQuantConfig(**ruled.to_dict()).quant_plan == ruled.quant_plan
    with pytest.raises(ValueError, match="activations='fp8-dynamic' is not allowed with weight format 'int8-gc-sym'"):
        hfquant.HfQuantConfig(rules={"mlp": {"format": "int8", "activations": "fp8-dynamic"}})


@pytest.mark.parametrize("kernel", [False, True])
def test_compiles_without_graph_breaks(kernel: bool) -> None:
    layer, _ = _layer(33, 17)
    if kernel:
        assert layer.prepare_kernel(torch.float32) == "int8-int-mm-cpu"
    x = torch.randn(2, 5, 33, generator=torch.Generator().manual_seed(4))
    eager = layer(x)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)(x)
    torch._dynamo.reset()
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-5)
