"""Whole-model QAT: :func:`prepare` swaps planned linear layers for :class:`FakeQuantLinear`;
:func:`convert` swaps them for :class:`QuantLinear` holding the same rounding, ready to save."""

from __future__ import annotations

from functools import partial


from torch import nn
from transformers.pytorch_utils import Conv1D

from hfquant.hf import integration
from hfquant.hf.config import HfQuantConfig
from hfquant.nn.qlinear import QuantLinear
from hfquant.qat.linear import FakeQuantLinear


def prepare(model: nn.Module, cfg: HfQuantConfig) -> nn.Module:
    """Make ``model`` fake-quantized in place following ``cfg``'s plan (resolved here); returns it."""
    from hfquant.hf.quantizer import HfQuantQuantizer  # the quantizer resolves skips as from_pretrained does

    if not isinstance(cfg, HfQuantConfig):
        raise ValueError(f"cfg={cfg!r} is not allowed; expected an hfquant.HfQuantConfig")
    if cfg.calibrated:
        raise ValueError(f"method={cfg.method!r} is not allowed with QAT; allowed: a data-free method (rtn)")
    layers = dict(integration.linear_layers(model))
    skip = sorted(HfQuantQuantizer(cfg).get_modules_to_not_convert(
        model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None)))
    cfg.modules_to_not_convert = skip
    cfg.plan = cfg.quant_plan.resolve(layers, skip)
    integration.check_no_tied_layers(model, cfg.plan)
    learn = bool(getattr(cfg, "qat_learn_scales", False))
    for name, scheme in cfg.plan.layers.items():
        source = layers[name]
        bias = None if source.bias is None else source.bias
        fake = FakeQuantLinear(source.weight, bias, scheme, transposed_source=isinstance(source, Conv1D),
                               learn_scales=learn)
        integration.set_submodule(model, name, fake)
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


def fake_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


__all__ = ["convert", "fake_layers", "prepare"]
