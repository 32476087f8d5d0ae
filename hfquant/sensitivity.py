"""How much each candidate format would hurt each layer, measured on calibration data.

The measure is the error a layer's rounding adds to its outputs on the calibration tokens:

    err(W, Q) = E_x ||(W - Q) x||^2 = tr((W - Q) H (W - Q)^T),   H = E[x x^T]

the Hessian-weighted error GPTQ minimises, for ``Q`` the weight as the method's data-free path
rounds it to the candidate. One block-sequential pass of the engine
(:mod:`hfquant.calibration.pipeline`) collects ``H`` for every layer of a block while that block
runs on full-precision inputs; nothing in the model is changed. How well this proxy ranks layers
like the end-to-end KL does is measured in ``bench/mixed.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hfquant.calibration.pipeline import quantize_sequentially
from hfquant.formats import QuantizedWeight, WeightFormat

Quantize = Callable[[torch.Tensor, WeightFormat], QuantizedWeight]


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` in float64: the mean squared output error per token."""
    delta = (weight.double() - approx.double())
    return float(((delta @ hessian.double()) * delta).sum())


class SensitivityProbe:
    """A :class:`~hfquant.calibration.pipeline.LayerwiseSolver` that measures instead of quantizing.

    ``observe`` accumulates each layer's ``H``; ``solve`` records ``err`` for every candidate in
    :attr:`errors` and returns the first candidate's rounding, which the caller discards.
    """

    def __init__(self, candidates: Sequence[WeightFormat], quantize: Quantize) -> None:
        self.candidates = list(candidates)
        self.quantize = quantize
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.errors: dict[str, list[float]] = {}

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
        if name not in self.hessians:
            self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.tokens[name] = 0
        self.hessians[name] += x.T @ x
        self.tokens[name] += x.shape[0]

    def solve(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        hessian = self.hessians.pop(name).to(weight.device) / self.tokens.pop(name)
        rounded = [self.quantize(weight, fmt) for fmt in self.candidates]
        self.errors[name] = [output_error(weight, q.dequantize(torch.float32), hessian) for q in rounded]
        return rounded[0]


def measure_sensitivity(model: nn.Module, batches: list[torch.Tensor], targets: dict[str, nn.Module],
                        candidates: Sequence[WeightFormat], quantize: Quantize,
                        weight_of: Callable[[nn.Module], torch.Tensor], progress: bool = True) -> dict[str, list[float]]:
    """``{layer: [err per candidate]}`` for the ``targets`` inside decoder blocks (others are absent)."""
    probe = SensitivityProbe(candidates, quantize)

    def keep_float(_name: str, _quantized: Any) -> None:
        """The probe only measures: every layer stays as it is."""

    quantize_sequentially(model, batches, targets, probe, weight_of, keep_float, progress=progress)
    return probe.errors
