"""Which layer feeds which linears inside a decoder block, per architecture, and how to move scales between them.

SmoothQuant and AWQ rescale the input channels of linear layers: a linear reading ``x`` computes
``W x = (W diag(s)) (x / s)``, so multiplying its weight's input columns by ``s`` and dividing the
*feeder*'s output channels by ``s`` (the norm or linear that produces ``x``) leaves the float model's
output unchanged. A :class:`Mapping` names a feeder and the linears it feeds (its *balance* layers),
relative to the block; an :class:`Architecture` lists a block's mappings. Both are data, registered
per ``model_type`` in :data:`ARCHITECTURES`. :func:`fold` applies scales to modules; it is plain tensor
maths (torch only).

A feeder's output channel ``j`` must be ``a_j · (something) + b_j`` in its own parameters (a norm's
``weight``/``bias``; a linear's row ``j``), and every path from it to the balance layers must commute
with a positive per-channel scale: the elementwise product of Llama's MLP (``act(gate) · up``) and ReLU
(OPT's ``fc1 → fc2``) do; GELU (GPT-2's ``c_fc → c_proj``) does not, so it has no mapping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mapping:
    """A feeder and the linears reading its output, as module names relative to the decoder block.

    ``requires``: model-config values the mapping is exact under (e.g. OPT's ``fc1 → fc2`` needs ReLU);
    a model whose config differs skips the mapping.
    """

    feeder: str
    balance: tuple[str, ...]
    requires: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Architecture:
    """The mappings of one decoder block.

    ``query_key``: layers whose outputs only enter attention scores (AWQ does not clip them: their error
    is amplified by the softmax). ``transposed``: linear weights are stored ``(in, out)`` (GPT-2's ``Conv1D``).
    """

    mappings: tuple[Mapping, ...]
    query_key: tuple[str, ...] = ()
    transposed: bool = False


_PRE_NORM_OPT = (("do_layer_norm_before", True), ("layer_norm_elementwise_affine", True))

LLAMA = Architecture(
    mappings=(
        Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Mapping("self_attn.v_proj", ("self_attn.o_proj",)),  # only where v and o have the same width (no GQA)
        Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
    ),
    query_key=("self_attn.q_proj", "self_attn.k_proj"),
)
OPT = Architecture(
    mappings=(
        Mapping("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _PRE_NORM_OPT),
        Mapping("self_attn.v_proj", ("self_attn.out_proj",)),
        Mapping("final_layer_norm", ("fc1",), _PRE_NORM_OPT),
        Mapping("fc1", ("fc2",), (("activation_function", "relu"),)),
    ),
    query_key=("self_attn.q_proj", "self_attn.k_proj"),
)
GPT2 = Architecture(
    mappings=(
        Mapping("ln_1", ("attn.c_attn",)),
        Mapping("ln_2", ("mlp.c_fc",)),
    ),
    query_key=("attn.c_attn",),  # q, k and v in one layer
    transposed=True,
)

ARCHITECTURES: dict[str, Architecture] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "opt": OPT, "gpt2": GPT2}


def architecture_for(config: Any, field: str) -> Architecture:
    """The registered architecture of a model config; ``ValueError`` naming ``field`` (the option that needs it)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{field} needs the layer mappings of the model's architecture, and model_type="
                         f"{model_type!r} has none; supported: {sorted(ARCHITECTURES)} (add an Architecture to "
                         "hfquant.mappings.ARCHITECTURES)")
    return ARCHITECTURES[model_type]


@dataclass
class BlockMapping:
    """A mapping resolved in one block: the modules themselves."""

    feeder_name: str
    feeder: nn.Module
    balance_names: tuple[str, ...]
    balance: tuple[nn.Module, ...]


def block_mappings(block: nn.Module, architecture: Architecture, config: Any) -> list[BlockMapping]:
    """The architecture's mappings that apply to ``block``: their config requirements hold, the modules exist,
    and the feeder's output width equals the balance layers' input width (Llama's ``v_proj → o_proj`` does not
    under grouped-query attention)."""
    resolved = []
    for mapping in architecture.mappings:
        unmet = [(key, value) for key, value in mapping.requires if getattr(config, key, None) != value]
        modules = [block.get_submodule(name) for name in (mapping.feeder, *mapping.balance)]
        widths = {_output_width(modules[0], architecture.transposed),
                  *(_input_width(m, architecture.transposed) for m in modules[1:])}
        if unmet or len(widths) != 1:
            logger.info("hfquant: mapping %s -> %s does not apply to this model (%s)", mapping.feeder, mapping.balance,
                        f"needs {unmet}" if unmet else f"widths {sorted(widths)} differ")
            continue
        resolved.append(BlockMapping(mapping.feeder, modules[0], mapping.balance, tuple(modules[1:])))
    return resolved


def _is_norm(module: nn.Module) -> bool:
    return getattr(module, "weight", None) is not None and module.weight.dim() == 1


def _output_width(module: nn.Module, transposed: bool) -> int:
    if _is_norm(module):
        return module.weight.shape[0]
    return module.weight.shape[1 if transposed else 0]


def _input_width(module: nn.Module, transposed: bool) -> int:
    return module.weight.shape[0 if transposed else 1]


def balance_weight(module: nn.Module, transposed: bool) -> torch.Tensor:
    """A balance layer's weight as ``(out, in)`` (a view; ``Conv1D`` stores it transposed)."""
    return module.weight.t() if transposed else module.weight


@torch.no_grad()
def fold(mapping: BlockMapping, scales: torch.Tensor, transposed: bool) -> None:
    """Divide the feeder's output channels by ``scales`` and multiply the balance layers' input channels by them.

    The float output of the block is unchanged up to rounding in the parameters' dtype. ``scales`` must be
    positive and finite, one per channel.
    """
    if scales.dim() != 1 or not bool(torch.isfinite(scales).all() and (scales > 0).all()):
        raise ValueError(f"scales for {mapping.feeder_name} must be a 1-d tensor of positive finite values")
    _check_resident((mapping.feeder_name, mapping.feeder), *zip(mapping.balance_names, mapping.balance))
    feeder = mapping.feeder
    if _is_norm(feeder):
        _scale_(feeder.weight, 1 / scales, dim=0)
    else:
        _scale_(feeder.weight, 1 / scales, dim=1 if transposed else 0)
    if getattr(feeder, "bias", None) is not None:
        _scale_(feeder.bias, 1 / scales, dim=0)
    for layer in mapping.balance:
        _scale_(layer.weight, scales, dim=0 if transposed else 1)


def _scale_(tensor: torch.Tensor, factors: torch.Tensor, dim: int) -> None:
    """Multiply ``tensor`` along ``dim`` by ``factors`` in place (computed in float32, stored in its dtype)."""
    shape = [1] * tensor.dim()
    shape[dim] = -1
    factors = factors.to(device=tensor.device, dtype=torch.float32).reshape(shape)
    tensor.copy_((tensor.float() * factors).to(tensor.dtype))


def _check_resident(*named: tuple[str, nn.Module]) -> None:
    """Refuse modules whose weights accelerate offloads: an in-place change would not reach the stored copy."""
    for name, module in named:
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "offload", False) or module.weight.device.type == "meta":
            raise ValueError(f"{name} is offloaded (device_map with cpu/disk offload); SmoothQuant and AWQ rescale "
                             "weights in place and need every decoder block resident: allowed: a device_map "
                             "without offloading")
