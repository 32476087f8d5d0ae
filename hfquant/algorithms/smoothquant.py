"""SmoothQuant: move activation outliers into the weights, per input channel, before quantizing.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models" (2022). For each mapping of :mod:`hfquant.mappings` (a norm or linear feeding linears), the
scale of input channel ``j`` is ``s_j = max|x_j|^α / max|w_j|^(1-α)`` (``max|x_j|`` over the calibration
tokens, ``max|w_j|`` over column ``j`` of every balance layer), folded so that the float model is
unchanged: the balance layers' columns are multiplied by ``s``, the feeder's output channels divided.
``α = 0.5`` splits the range evenly between activations and weights. It runs as a block transform in
the sequential engine, so any weight method (RTN, GPTQ, ...) then quantizes the smoothed weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hfquant.mappings import architecture_for, balance_weight, block_mappings, fold

_FLOOR = 1e-5  # the reference implementation's floor on both maxima


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|x|^α / max|w|^(1-α)`` per channel, maxima floored at 1e-5; 1 where a channel never fires or has
    no weight (nothing to balance)."""
    scales = act_max.float().clamp(min=_FLOOR).pow(alpha) / weight_max.float().clamp(min=_FLOOR).pow(1 - alpha)
    idle = (act_max == 0) | (weight_max == 0)
    return torch.where(idle, torch.ones_like(scales), scales)


class SmoothQuant:
    """The SmoothQuant block transform (:class:`hfquant.calibration.pipeline.BlockTransform`) for a model of
    config ``model_config``."""

    def __init__(self, alpha: float, model_config: Any) -> None:
        self.alpha = alpha
        self.model_config = model_config
        self.architecture = architecture_for(model_config, "smoothquant")
        self.act_max: dict[str, torch.Tensor] = {}

    def watch(self, block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        self.mappings = block_mappings(block, self.architecture, self.model_config)
        self.act_max = {}
        return {m.balance_names[0]: m.balance[0] for m in self.mappings}

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        batch_max = inputs.detach().abs().reshape(-1, inputs.shape[-1]).amax(dim=0).float()
        self.act_max[name] = torch.maximum(self.act_max[name], batch_max) if name in self.act_max else batch_max

    def apply(self, block: nn.Module, prefix: str) -> None:
        for mapping in self.mappings:
            weights = [balance_weight(layer, self.architecture.transposed).detach() for layer in mapping.balance]
            weight_max = torch.cat(weights, dim=0).abs().amax(dim=0).float()
            channel_max = self.act_max[mapping.balance_names[0]].to(weight_max.device)
            fold(mapping, smoothing_scales(channel_max, weight_max, self.alpha), self.architecture.transposed)
