"""Whole-model QAT: :func:`prepare` swaps planned linear layers for :class:`FakeQuantLinear`;
:func:`convert` swaps them for :class:`QuantLinear` holding the same rounding, ready to save."""

from __future__ import annotations

from functools import partial


from torch import nn
from transformers.pytorch_utils import Conv1D

from hfquant.hf import integration
from hfquant.hf.config import HfQuantConfig
from hfquant.nn.qlinear import QuantLinear
from hfquant.plan import ResolvedPlan
from hfquant.qat.linear import FakeQuantLinear


def prepare(model: nn.Module, cfg: HfQuantConfig) -> nn.Module:
    """Make ``model`` fake-quantized in place following ``cfg``'s plan (resolved here); returns it."""
    from hfquant.hf.quantizer import HfQuantQuantizer  # the quantizer resolves skips as from_pretrained does

    if not isinstance(cfg, HfQuantConfig) or not cfg.qat:
        raise ValueError(f"cfg={cfg!r} is not allowed; expected an hfquant.HfQuantConfig with qat=True")
    layers = dict(integration.linear_layers(model))
    skip = sorted(HfQuantQuantizer(cfg).get_modules_to_not_convert(
        model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None)))
    cfg.modules_to_not_convert = skip
    cfg.plan = cfg.quant_plan.resolve(layers, skip)
    integration.check_no_tied_layers(model, cfg.plan)
    for layer in replace_with_fake(model, cfg.plan, cfg.qat_learn_scales).values():
        if layer.learn_scales:
            layer.init_scales()
    if hasattr(model, "config"):
        model.config.quantization_config = cfg
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every :class:`FakeQuantLinear` by the :class:`QuantLinear` of the same stored tensors, in place.

    A transformers model becomes an hfquant-quantized one: ``save_pretrained`` writes the packed
    checkpoint layout with its plan, and ``from_pretrained`` reloads it like any hfquant checkpoint.
    """
    import torch

    from hfquant.hf.quantizer import HfQuantQuantizer
    from hfquant.hf.saving import save_pretrained_with_card

    fakes = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    with torch.no_grad():
        for name, fake in fakes:
            layer = QuantLinear(fake.in_features, fake.out_features, fake.scheme, bias=fake.bias is not None,
                                dtype=fake.weight.dtype, device=fake.weight.device,
                                transposed_source=fake.transposed_source)
            layer.load_quantized(fake.quantized())
            if fake.bias is not None:
                layer.bias.data.copy_(fake.bias.data)
            integration.set_submodule(model, name, layer)
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(cfg, HfQuantConfig) and hasattr(model, "save_pretrained"):
        cfg.qat = False
        quantizer = HfQuantQuantizer(cfg)
        model.hf_quantizer = quantizer
        model.save_pretrained = partial(save_pretrained_with_card, model, type(model).save_pretrained.__get__(model))
    return model


def replace_with_fake(model: nn.Module, plan: ResolvedPlan, learn_scales: bool) -> dict[str, FakeQuantLinear]:
    """Swap every planned float layer for a :class:`FakeQuantLinear` of its scheme (meta tensors stay meta)."""
    swapped = {}
    for name, scheme in plan.layers.items():
        source = model.get_submodule(name)
        swapped[name] = FakeQuantLinear(source.weight, source.bias, scheme,
                                        transposed_source=isinstance(source, Conv1D), learn_scales=learn_scales)
        integration.set_submodule(model, name, swapped[name])
    return swapped


def finish_loading(model: nn.Module, resumed: bool) -> nn.Module:
    """After ``from_pretrained(qat=True)``: fresh learned scales start on the format's grid; all trainable."""
    from hfquant.hf.saving import save_pretrained_with_card

    for layer in fake_layers(model).values():
        if layer.learn_scales and not resumed:
            layer.init_scales()
        layer.requires_grad_(True)
    model.save_pretrained = partial(save_pretrained_with_card, model, model.save_pretrained)
    return model


def fake_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


__all__ = ["convert", "fake_layers", "prepare"]
