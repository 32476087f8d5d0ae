"""Module surgery on transformers models: find linear layers, swap them, quantize streamed weights."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import align_module_device
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.pytorch_utils import Conv1D

from hfquant.formats import WeightFormat
from hfquant.nn.qlinear import QuantLinear
from hfquant.plan import is_skipped
from hfquant.quantize import quantize

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def float_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a float linear layer (``Conv1D`` stores it transposed)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def quantizable_layers(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Module]]:
    """The float linear layers that the skip patterns leave for quantization, in model order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LINEAR_TYPES) and not is_skipped(name, skip)]


def check_no_tied_layers(model: nn.Module, skip: list[str]) -> None:
    """Refuse to quantize a layer whose weight is tied to another tensor (e.g. ``lm_head`` to the embeddings).

    Its weight is not in the checkpoint under its own name, so it would never be quantized and its
    scales would stay uninitialised: a silently wrong model.
    """
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
    tied = {key.removesuffix(".weight") for pair in tied_keys.items() for key in pair}
    offending = sorted(name for name, _ in quantizable_layers(model, skip) if name in tied)
    if offending:
        raise ValueError(f"modules_to_not_convert={skip!r} leaves {offending} to quantize, but their weights are tied "
                         "to other tensors (tie_word_embeddings); allowed: keep them in full precision by listing "
                         "them in modules_to_not_convert (or pass None for the default)")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def empty_quant_linear(source: nn.Module, fmt: WeightFormat, device: torch.device | None = None) -> QuantLinear:
    """A :class:`QuantLinear` shaped like ``source``, on ``device`` (default: ``source``'s, meta while loading)."""
    in_features, out_features = linear_shape(source)
    return QuantLinear(in_features, out_features, fmt, bias=source.bias is not None, dtype=source.weight.dtype,
                       device=device or source.weight.device, transposed_source=isinstance(source, Conv1D))


def replace_linear_layers(model: nn.Module, fmt: WeightFormat, skip: list[str]) -> list[str]:
    """Swap every quantizable linear layer for an empty :class:`QuantLinear`; returns their names."""
    layers = quantizable_layers(model, skip)
    for name, module in layers:
        set_submodule(model, name, empty_quant_linear(module, fmt))
    return [name for name, _ in layers]


def quantize_layer_in_place(model: nn.Module, name: str, quantized_weight: Any) -> QuantLinear:
    """Replace float layer ``name`` with a :class:`QuantLinear` holding ``quantized_weight``.

    The new layer lives where the quantized tensors are (an offloaded layer's execution device).
    """
    source = model.get_submodule(name)
    layer = empty_quant_linear(source, quantized_weight.fmt, device=quantized_weight.codes.device)
    layer.load_quantized(quantized_weight)
    if source.bias is not None:
        with align_module_device(source):
            layer.bias.data.copy_(source.bias.data)
    _move_accelerate_hook(source, layer)
    set_submodule(model, name, layer)
    return layer


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Turn every :class:`QuantLinear` back into the float layer it replaced."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        weight = layer.dequantized_weight(dtype)
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        if layer.transposed_source:
            restored = Conv1D(layer.out_features, layer.in_features)
            weight = weight.t()
        else:
            restored = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
        restored.weight = nn.Parameter(weight.contiguous())
        if bias is not None:
            restored.bias = nn.Parameter(bias)
        restored.to(device=layer.weight.device)
        _move_accelerate_hook(layer, restored)
        set_submodule(model, name, restored)
    return model


def _move_accelerate_hook(old: nn.Module, new: nn.Module) -> None:
    """Keep accelerate's device placement when a dispatched module is swapped.

    An offloading hook would reload the *old* float tensors by name, so the new (small) module is
    kept resident on the execution device with a plain placement hook instead.
    """
    hook = getattr(old, "_hf_hook", None)
    if hook is None:
        return
    if getattr(hook, "offload", False):
        new.to(hook.execution_device)
        hook = AlignDevicesHook(execution_device=hook.execution_device, io_same_device=hook.io_same_device)
    add_hook_to_module(new, hook)


class QuantizeWeight(ConversionOps):
    """Loader op: a streamed full-precision ``weight`` becomes the packed tensors of its QuantLinear."""

    def __init__(self, fmt: WeightFormat) -> None:
        self.fmt = fmt

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                full_layer_name: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        (key, value), = input_dict.items()
        tensor = value[0] if isinstance(value, list) else value
        name = full_layer_name or key
        prefix = name.removesuffix(".weight")
        layer = model.get_submodule(prefix)
        weight = tensor.t() if layer.transposed_source else tensor
        packed = quantize(weight, self.fmt).packed()
        return {f"{prefix}.{param}": t for param, t in packed.items()}
