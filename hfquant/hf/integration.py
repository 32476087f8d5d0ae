"""Module surgery on transformers models: find linear layers, swap them, quantize streamed weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import align_module_device
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.pytorch_utils import Conv1D

from hfquant.algorithms import Method
from hfquant.formats import QuantizedWeight
from hfquant.formats.base import check_weight
from hfquant.nn.qlinear import QuantLinear
from hfquant.plan import ResolvedPlan
from hfquant.schemes import LayerScheme

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def float_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a float linear layer (``Conv1D`` stores it transposed)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every float linear layer (``nn.Linear`` or ``Conv1D``) of ``model``, in model order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]


def check_no_tied_layers(model: nn.Module, plan: ResolvedPlan) -> None:
    """Refuse to quantize a layer whose weight is tied to another tensor (e.g. ``lm_head`` to the embeddings).

    Its weight is not in the checkpoint under its own name, so it would never be quantized and its
    scales would stay uninitialised: a silently wrong model.
    """
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
    tied = {key.removesuffix(".weight") for pair in tied_keys.items() for key in pair}
    offending = sorted(name for name in plan.layers if name in tied)
    if offending:
        raise ValueError(f"the plan quantizes {offending}, but their weights are tied to other tensors "
                         "(tie_word_embeddings); allowed: keep them in full precision (modules_to_not_convert=None "
                         "does by default, or list them, or give them a None rule)")


def check_finite_weights(model: nn.Module, names: list[str]) -> None:
    """``ValueError`` naming the first of ``names`` whose float weight has inf/NaN values."""
    for name in names:
        layer = model.get_submodule(name)
        with align_module_device(layer):
            try:
                check_weight(float_weight(layer).detach())
            except ValueError as error:
                raise ValueError(f"layer {name}: {error}") from None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def empty_quant_linear(source: nn.Module, scheme: LayerScheme, device: torch.device | None = None) -> QuantLinear:
    """A :class:`QuantLinear` shaped like ``source``, on ``device`` (default: ``source``'s, meta while loading)."""
    in_features, out_features = linear_shape(source)
    return QuantLinear(in_features, out_features, scheme, bias=source.bias is not None, dtype=source.weight.dtype,
                       device=device or source.weight.device, transposed_source=isinstance(source, Conv1D))


def replace_linear_layers(model: nn.Module, plan: ResolvedPlan) -> None:
    """Swap every layer of the plan for an empty :class:`QuantLinear` built from its scheme."""
    for name, scheme in plan.layers.items():
        set_submodule(model, name, empty_quant_linear(model.get_submodule(name), scheme))


def quantize_layer_in_place(model: nn.Module, name: str, quantized_weight: QuantizedWeight,
                            scheme: LayerScheme) -> QuantLinear:
    """Replace float layer ``name`` with a :class:`QuantLinear` of ``scheme`` holding ``quantized_weight``.

    The new layer lives where the quantized tensors are (an offloaded layer's execution device).
    """
    source = model.get_submodule(name)
    layer = empty_quant_linear(source, scheme, device=quantized_weight.codes.device)
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


@dataclass
class ConversionLog:
    """What the loader ops did; transformers only logs an op's exceptions, so the quantizer checks this after loading."""

    done: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)

    def check(self, layers: list[str]) -> None:
        """``ValueError`` naming the first planned layer that was not quantized (and why, when known)."""
        for name in layers:
            if name not in self.done:
                why = self.failures.get(name, "its weight was not in the checkpoint under its own name")
                raise ValueError(f"layer {name} was not quantized: {why}")


class QuantizeWeight(ConversionOps):
    """Loader op: a streamed full-precision ``weight`` becomes the stored tensors of its QuantLinear.

    The method's data-free path quantizes it in the layer's own format; the outcome goes to ``log``
    (transformers would turn an exception here into a generic RuntimeError after its load report).
    """

    def __init__(self, method: Method, options: Any, log: ConversionLog) -> None:
        self.method = method
        self.options = options
        self.log = log

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                full_layer_name: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        (key, value), = input_dict.items()
        tensor = value[0] if isinstance(value, list) else value
        name = full_layer_name or key
        prefix = name.removesuffix(".weight")
        layer = model.get_submodule(prefix)
        weight = tensor.t() if layer.transposed_source else tensor
        try:
            stored = self.method.quantize(weight, layer.fmt, self.options).stored()
        except ValueError as error:  # raised by the quantizer after loading, naming the layer (see ConversionLog)
            self.log.failures[prefix] = str(error)
            return {}
        self.log.done.add(prefix)
        return {f"{prefix}.{param}": t for param, t in stored.items()}
