"""QAT: the converted model computes exactly what the fake-quantized one did; STE/LSQ gradients; training works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
import hfquant.qat
from hfquant.formats import format_names, make_format
from hfquant.nn.qlinear import QuantLinear
from hfquant.qat import FakeQuantLinear
from tiny_models import BUILDERS, build

IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 120, 77, 1, 2, 31, 9]])


def _config(name: str, **kw) -> hfquant.HfQuantConfig:
    grouped = make_format(name).grouped
    return hfquant.HfQuantConfig(format=name, **({"group_size": 32} if grouped else {}), kernels="off", qat=True, **kw)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("name", format_names())
def test_converted_logits_equal_fake_quantized_logits_bit_exactly(arch: str, name: str) -> None:
    model = hfquant.qat.prepare(build(arch), _config(name))
    assert hfquant.qat.fake_layers(model)
    fake = _logits(model)
    hfquant.qat.convert(model)
    assert not hfquant.qat.fake_layers(model)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(_logits(model), fake)


@pytest.mark.parametrize("name", ["int4", "ternary", "nf4"])
def test_learned_scales_convert_bit_exactly_after_a_step(name: str) -> None:
    model = hfquant.qat.prepare(build("llama"), _config(name, qat_learn_scales=True))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    model.eval()
    fake = _logits(model)
    assert torch.equal(_logits(hfquant.qat.convert(model)), fake)


def test_gradients_reach_weights_and_learned_scales() -> None:
    model = hfquant.qat.prepare(build("opt"), _config("int4", qat_learn_scales=True))
    model(IDS, labels=IDS).loss.backward()
    layers = list(hfquant.qat.fake_layers(model).values())
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for layer in layers)
    assert all(layer.weight_scale.grad is not None and layer.weight_scale.grad.abs().sum() > 0 for layer in layers)
    assert all(layer.bias.grad is not None for layer in layers)


def test_ste_weight_gradient_is_the_float_linear_gradient_at_the_quantized_weight() -> None:
    torch.manual_seed(0)
    layer = FakeQuantLinear(torch.randn(8, 64), torch.randn(8), hfquant.LayerScheme(make_format("int3", group_size=32)))
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    wq = layer.quantized().dequantize().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, wq, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("learn", [False, True])
def test_loss_goes_down_on_a_tiny_overfitting_task(learn: bool) -> None:
    model = hfquant.qat.prepare(build("llama"), _config("int2", qat_learn_scales=learn))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_converted_checkpoint_saves_and_reloads_bit_exactly(arch: str, tmp_path: Path) -> None:
    model = hfquant.qat.prepare(build(arch), _config("int4"))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    model.eval()
    packed = hfquant.qat.convert(model)
    before = _logits(packed)
    packed.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    hfquant.prepare_for_inference(reloaded, kernels="off")
    assert isinstance(reloaded.get_submodule(next(iter(packed.config.quantization_config.plan.layers))), QuantLinear)
    assert torch.equal(_logits(reloaded), before)


@pytest.mark.parametrize("kw, field", [({"qat": "yes"}, "qat"), ({"qat_learn_scales": True}, "qat_learn_scales"),
                                       ({"qat": True, "method": "gptq"}, "qat"),
                                       ({"qat": True, "qat_learn_scales": True, "format": "fp16"}, "qat_learn_scales")])
def test_bad_qat_combinations_raise_naming_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        hfquant.HfQuantConfig(**kw)
