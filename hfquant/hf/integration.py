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
from hfquant.nn.qembedding import QuantEmbedding, shares_table, tie_head
from hfquant.nn.qlinear import QuantLinear
from hfquant.plan import ResolvedPlan
from hfquant.schemes import LayerScheme

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear``, a GPT-2 ``Conv1D`` or a token embedding
    (its ``(num_embeddings, embedding_dim)`` table is stored as the weight of a linear layer)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    if isinstance(module, (nn.Embedding, QuantEmbedding)):
        return module.embedding_dim, module.num_embeddings
    return module.in_features, module.out_features


def float_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a float linear layer (``Conv1D`` stores it transposed)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every float linear layer (``nn.Linear`` or ``Conv1D``) of ``model``, in model order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]


def input_embedding_name(model: nn.Module) -> str | None:
    """The module name of the model's token embedding when hfquant can quantize it, else ``None``.

    Only a plain ``nn.Embedding`` (no ``max_norm``, which rewrites the table at lookup) is taken: a
    subclass may compute more than the lookup (e.g. a scaled embedding), which a swap would lose.
    """
    embedding = _model_embeddings(model, "get_input_embeddings")
    plain = type(embedding) is nn.Embedding and embedding.max_norm is None
    if not (plain or isinstance(embedding, QuantEmbedding)):
        return None
    return next(name for name, module in model.named_modules() if module is embedding)


def output_head_name(model: nn.Module) -> str | None:
    """The module name of the model's output head (``get_output_embeddings``) when it is a linear layer."""
    head = _model_embeddings(model, "get_output_embeddings")
    if not isinstance(head, (*LINEAR_TYPES, QuantLinear)):
        return None
    return next(name for name, module in model.named_modules() if module is head)


def _model_embeddings(model: nn.Module, getter: str) -> nn.Module | None:
    try:
        return getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None


def embedding_layers(model: nn.Module, with_head: bool) -> list[str]:
    """The layers whose default is the ``embeddings`` scheme (those present): the token embedding, and the
    output head when ``with_head`` (``embeddings`` given; otherwise the head defaults like any linear layer)."""
    names = (input_embedding_name(model), output_head_name(model) if with_head else None)
    return [name for name in names if name is not None]


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer a plan may quantize: the float linear layers and the token embedding, in model order."""
    embedding = input_embedding_name(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, LINEAR_TYPES) or name == embedding}


def tied_heads(model: nn.Module) -> dict[str, str]:
    """``{output head: token embedding}`` when the model ties the two (``tie_word_embeddings``)."""
    head, embedding = output_head_name(model), input_embedding_name(model)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    pairs = {(t.removesuffix(".weight"), s.removesuffix(".weight")) for t, s in tied.items()}
    if head is not None and embedding is not None and pairs & {(head, embedding), (embedding, head)}:
        return {head: embedding}
    return {}


def check_embedding_plan(model: nn.Module, plan: ResolvedPlan, embeddings: LayerScheme | None) -> None:
    """``ValueError`` when the plan cannot be stored: a tied head and its embedding with different schemes,
    an embedding with an input mode, or ``embeddings`` asked for a model whose embedding hfquant cannot swap."""
    embedding = input_embedding_name(model)
    if embeddings is not None and embedding is None:
        found = type(_model_embeddings(model, "get_input_embeddings")).__name__
        raise ValueError(f"embeddings={embeddings.name!r} is not allowed for {type(model).__name__}, whose token "
                         f"embedding is a "
                         f"{found}; allowed: models whose token embedding is a plain torch.nn.Embedding "
                         "(or embeddings=None)")
    if embedding in plan.layers and plan.layers[embedding].input is not None:
        raise ValueError(f"the plan gives the token embedding {embedding} the scheme "
                         f"{plan.layers[embedding].name!r}; allowed: a weight-only scheme (rules, embeddings): "
                         "a lookup has no input activations")
    for head, source in tied_heads(model).items():
        schemes = [plan.layers.get(head), plan.layers.get(source)]
        if schemes[0] != schemes[1]:
            names = [s.name if s else "full precision" for s in schemes]
            raise ValueError(f"the plan gives the tied output head {head} {names[0]!r} and its embedding {source} "
                             f"{names[1]!r}; allowed: the same scheme for both (they are one stored table), set "
                             "through embeddings, rules or modules_to_not_convert")


def check_no_tied_layers(model: nn.Module, plan: ResolvedPlan, allow_tied_heads: bool = False) -> None:
    """Refuse to quantize a layer whose weight is tied to another tensor (e.g. ``lm_head`` to the embeddings).

    Its weight is not in the checkpoint under its own name, so it would never be quantized and its
    scales would stay uninitialised: a silently wrong model. ``allow_tied_heads``: a tied output
    head and its token embedding are fine (:func:`tie_quantized_heads` makes them one stored table).
    """
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
    tied = {key.removesuffix(".weight") for pair in tied_keys.items() for key in pair}
    if allow_tied_heads:  # a pair quantized together is stored once (check_embedding_plan checks their schemes)
        tied -= {name for pair in tied_heads(model).items() if set(pair) <= set(plan.layers) for name in pair}
    offending = sorted(name for name in plan.layers if name in tied)
    if offending:
        raise ValueError(f"the plan quantizes {offending}, but their weights are tied to other tensors "
                         "(tie_word_embeddings); allowed: keep them in full precision (modules_to_not_convert=None "
                         "does by default, or list them, or give them a None rule), or quantize a tied output head "
                         "together with its token embedding in one scheme (embeddings=...)")


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


def empty_quant_embedding(source: nn.Embedding, scheme: LayerScheme,
                          device: torch.device | None = None) -> QuantEmbedding:
    """A :class:`QuantEmbedding` shaped like ``source``, on ``device`` (default: ``source``'s)."""
    return QuantEmbedding(source.num_embeddings, source.embedding_dim, scheme, padding_idx=source.padding_idx,
                          dtype=source.weight.dtype, device=device or source.weight.device)


def empty_quantized(source: nn.Module, scheme: LayerScheme,
                    device: torch.device | None = None) -> QuantLinear | QuantEmbedding:
    """The empty quantized module replacing ``source``: a :class:`QuantEmbedding` for an embedding, else a
    :class:`QuantLinear`."""
    build = empty_quant_embedding if isinstance(source, nn.Embedding) else empty_quant_linear
    return build(source, scheme, device)


def replace_linear_layers(model: nn.Module, plan: ResolvedPlan) -> None:
    """Swap every layer of the plan for an empty quantized module built from its scheme; tie tied heads."""
    for name, scheme in plan.layers.items():
        set_submodule(model, name, empty_quantized(model.get_submodule(name), scheme))
    tie_quantized_heads(model)


def tie_quantized_heads(model: nn.Module) -> dict[str, str]:
    """Make each quantized tied output head compute with its embedding's stored tensors (the same objects).

    The model's tied-weight mapping gains every stored tensor of the pair (``lm_head.weight_scale`` ->
    ``model.embed_tokens.weight_scale``, ...), so transformers re-ties all of them after loading
    and saves the table once. Returns ``{head: embedding}`` of the pairs tied.
    """
    tied = {}
    for head_name, source_name in tied_heads(model).items():
        head, source = model.get_submodule(head_name), model.get_submodule(source_name)
        if not (isinstance(head, QuantLinear) and isinstance(source, QuantEmbedding)):
            continue
        tie_head(head, source)
        model.all_tied_weights_keys.update({f"{head_name}.{p}": f"{source_name}.{p}" for p in source.specs})
        tied[head_name] = source_name
    return tied


def check_heads_tied(model: nn.Module) -> None:
    """``ValueError`` when a quantized tied head does not compute with its embedding's own tensors after loading."""
    for head_name, source_name in tied_heads(model).items():
        head, source = model.get_submodule(head_name), model.get_submodule(source_name)
        if isinstance(source, QuantEmbedding) and not (isinstance(head, QuantLinear) and shares_table(head, source)):
            raise ValueError(f"the tied output head {head_name} does not share {source_name}'s quantized table "
                             "after loading (the checkpoint holds a different head?); the checkpoint is corrupted")


def tied_head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of quantized tied heads: the embedding's tensors again, never saved under the head's name."""
    return [f"{head}.{param}" for head, source in tied_heads(model).items()
            if isinstance(model.get_submodule(source), QuantEmbedding)
            for param in model.get_submodule(source).specs]


def quantize_layer_in_place(model: nn.Module, name: str, quantized_weight: QuantizedWeight,
                            scheme: LayerScheme) -> QuantLinear | QuantEmbedding:
    """Replace float layer ``name`` with a quantized module of ``scheme`` holding ``quantized_weight``.

    The new layer lives where the quantized tensors are (an offloaded layer's execution device).
    """
    source = model.get_submodule(name)
    layer = empty_quantized(source, scheme, device=quantized_weight.codes.device)
    layer.load_quantized(quantized_weight)
    if getattr(source, "bias", None) is not None:
        with align_module_device(source):
            layer.bias.data.copy_(source.bias.data)
    _move_accelerate_hook(source, layer)
    set_submodule(model, name, layer)
    return layer


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Turn every quantized module back into the float layer it replaced; a tied head is re-tied to its
    float embedding."""
    heads = tied_heads(model)
    quantized_keys = set(tied_head_keys(model)) - {f"{head}.weight" for head in heads}  # added by tie_quantized_heads
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantEmbedding)]:
        restored = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx,
                                device=layer.weight.device, dtype=dtype)
        restored.weight = nn.Parameter(layer.dequantized_weight(dtype))
        _move_accelerate_hook(layer, restored)
        set_submodule(model, name, restored)
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
    for head, source in heads.items():
        model.get_submodule(head).weight = model.get_submodule(source).weight
    for key in quantized_keys:  # back to the model's own mapping ({lm_head.weight: ...})
        model.all_tied_weights_keys.pop(key, None)
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
        if isinstance(layer, QuantEmbedding):  # not in a float checkpoint: made here, in the model's dtype
            stored["dtype_anchor"] = torch.empty(0, dtype=layer.dtype, device=tensor.device)
        return {f"{prefix}.{param}": t for param, t in stored.items()}
