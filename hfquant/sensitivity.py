"""How much each candidate format would hurt each layer, measured on calibration data.

The measure is the second-order estimate of the loss increase the layer's rounding causes, with a
diagonal Fisher on the layer's *outputs*:

    err(W, Q) = sum_o F_o · E_x[((W - Q) x)_o^2] = sum_o F_o · ((W - Q) H (W - Q)^T)_oo,
    H = E[x x^T],   F_o = E[(dL/dy_o)^2]

for ``Q`` the weight as the method's data-free path rounds it to the candidate and ``L`` the
next-token loss on the calibration tokens. ``F`` (:func:`output_fisher`) comes from one backward
pass per calibration sequence through the float model; ``H`` from one block-sequential pass of the
engine (:mod:`hfquant.calibration.pipeline`) on full-precision inputs. Nothing in the model is
changed. The unweighted output error (``F = 1``) ranks layers poorly across depths and layer kinds
(measured in ``bench/mixed.py``): an error written into the residual stream of an early block costs
far more than the same error in a late ``v_proj``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hfquant.calibration.pipeline import quantize_sequentially
from hfquant.formats import QuantizedWeight, WeightFormat

Quantize = Callable[[torch.Tensor, WeightFormat], QuantizedWeight]


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor,
                 channel_weights: torch.Tensor | None = None) -> float:
    """``sum_o c_o ((W - Q) H (W - Q)^T)_oo`` in float64 (``c = 1``: the mean squared output error per token)."""
    delta = weight.double() - approx.double()
    rows = ((delta @ hessian.double()) * delta).sum(dim=1)
    return float(rows.sum() if channel_weights is None else rows @ channel_weights.double().to(rows.device))


def output_fisher(model: nn.Module, batches: list[torch.Tensor], targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{layer: E_t[(dL/dy_t)^2]}`` per output channel, ``L`` the summed next-token cross-entropy.

    Parameters are frozen for the pass (no weight gradients are computed) and restored afterwards.
    """
    sums: dict[str, torch.Tensor] = {}
    tokens = 0

    def accumulate(name: str, grad: torch.Tensor) -> None:
        squared = grad.detach().double().pow(2).reshape(-1, grad.shape[-1]).sum(dim=0).cpu()
        sums[name] = squared if name not in sums else sums[name] + squared

    def watch(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda grad: accumulate(name, grad))
        return hook

    trainable = [p for p in model.parameters() if p.requires_grad]
    handles = [layer.register_forward_hook(watch(name)) for name, layer in targets.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            for ids in (row for batch in batches for row in batch.split(1)):
                ids = ids.to(model.device)
                logits = model(input_ids=ids, use_cache=False).logits
                F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").backward()
                tokens += ids.shape[1] - 1
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    return {name: total / tokens for name, total in sums.items()}


class SensitivityProbe:
    """A :class:`~hfquant.calibration.pipeline.LayerwiseSolver` that measures instead of quantizing.

    ``observe`` accumulates each layer's ``H``; ``solve`` records ``err`` for every candidate in
    :attr:`errors` and returns the first candidate's rounding, which the caller discards.
    """

    def __init__(self, candidates: Sequence[WeightFormat], quantize: Quantize,
                 channel_weights: dict[str, torch.Tensor] | None = None) -> None:
        self.candidates = list(candidates)
        self.quantize = quantize
        self.channel_weights = channel_weights or {}
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
        weights = self.channel_weights.get(name)
        self.errors[name] = [output_error(weight, q.dequantize(torch.float32), hessian, weights) for q in rounded]
        return rounded[0]


def measure_sensitivity(model: nn.Module, batches: list[torch.Tensor], targets: dict[str, nn.Module],
                        candidates: Sequence[WeightFormat], quantize: Quantize,
                        weight_of: Callable[[nn.Module], torch.Tensor], fisher: bool = True,
                        progress: bool = True) -> dict[str, list[float]]:
    """``{layer: [err per candidate]}`` for the ``targets`` inside decoder blocks (others are absent);
    ``fisher=False`` leaves the outputs unweighted (the plain output error)."""
    weights = output_fisher(model, batches, targets) if fisher else None
    probe = SensitivityProbe(candidates, quantize, weights)

    def keep_float(_name: str, _quantized: Any) -> None:
        """The probe only measures: every layer stays as it is."""

    quantize_sequentially(model, batches, targets, probe, weight_of, keep_float, progress=progress)
    return probe.errors
