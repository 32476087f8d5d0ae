"""AWQ: activation-aware per-channel weight scaling and clipping, then rounding through the layer's format.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration" (2023).
Input channels that carry large activations matter more; scaling them up before rounding (and the
inputs down by the same factor, folded into the feeding norm or linear: :mod:`hfquant.mappings`)
protects them. Per mapping of a decoder block, with ``H = E[x xᵀ]`` and ``m = E|x|`` of the balance
layers' input on the calibration data:

1. **scales**: for ``α`` in ``0, 1/grid, ..., (grid-1)/grid``: ``s = m^α`` (normalised to
   ``sqrt(max(s)·min(s)) = 1``), error ``Σ_layers tr(D H Dᵀ)`` with ``D = Q(W·s)/s − W`` the change of
   the layer's weight after rounding ``W·s`` through its format (``fmt.quantize``) and scaling back;
   ``tr(D H Dᵀ)`` is the mean squared change of the layer's outputs. The best ``s`` is folded. ``α = 0``
   is ``s = 1``, plain RTN, so the searched error never exceeds RTN's.
2. **clipping** (every quantized layer but those feeding attention scores only): per row and group,
   clamp the weights to ``±p·max|w|`` for ``p`` in ``1, 1 − 1/clip_grid, ...`` down to ``1 − max_shrink``,
   keeping the ``p`` with the least output error of that group (``d H_gg dᵀ``); ``p = 1`` is no clipping.

Both run as a block transform in the sequential engine; then each layer is rounded through its
format (``solver="rtn"``) or solved by GPTQ on the scaled, clipped weights (``solver="gptq"``). The
maths only calls ``fmt.quantize`` / ``dequantize``, so AWQ applies to every weight format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hfquant.algorithms import DataFreeSolver, Method, register_method
from hfquant.algorithms.gptq import GPTQOptions, GPTQSolver, HessianAccumulator
from hfquant.formats import QuantizedWeight, WeightFormat
from hfquant.mappings import architecture_for, balance_weight, block_mappings, fold
from hfquant.validation import require_bool, require_choice, require_float, require_int


@dataclass(frozen=True)
class AWQOptions:
    """AWQ's knobs; defaults are the paper's (20 scale exponents, clipping down to half the range in 1/20 steps).

    Args:
        grid: how many exponents ``α = i / grid`` the scale search tries.
        clip: search a clipping range per row and group after scaling.
        clip_grid: clipping ratios are ``1 - i / clip_grid``.
        max_shrink: the smallest ratio tried is ``1 - max_shrink`` (exclusive, as in the reference).
        solver: how layers are quantized after the transform: ``"rtn"`` (round to nearest) or ``"gptq"``
            (GPTQ with its default options).
    """

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    solver: Literal["rtn", "gptq"] = "rtn"

    def __post_init__(self) -> None:
        checked = {
            "grid": require_int("grid", self.grid, 1, 1000),
            "clip": require_bool("clip", self.clip),
            "clip_grid": require_int("clip_grid", self.clip_grid, 1, 1000),
            "max_shrink": require_float("max_shrink", self.max_shrink, 0.0, 1.0, high_open=True),
            "solver": require_choice("solver", self.solver, ("rtn", "gptq")),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)


def output_error(weight: torch.Tensor, changed: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tr(D H Dᵀ)`` per row, ``D = changed − weight``: the mean squared change of each output."""
    delta = changed - weight
    return ((delta @ hessian) * delta).sum(dim=1)


def _rounded(weight: torch.Tensor, fmt: WeightFormat | None) -> torch.Tensor:
    """``weight`` after rounding through ``fmt`` (unchanged for a layer kept in full precision)."""
    return weight if fmt is None else fmt.quantize(weight).dequantize(torch.float32)


def candidate_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``m^α``, floored at 1e-4 and normalised so that ``max · min = 1``."""
    scales = act_mean.float().clamp(min=1e-4).pow(alpha)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(weights: list[torch.Tensor], formats: list[WeightFormat | None], hessian: torch.Tensor,
                  act_mean: torch.Tensor, grid: int) -> tuple[torch.Tensor, list[float]]:
    """The scales of least summed output error over ``α = i / grid`` (``i < grid``), and every ``α``'s error.

    ``weights`` are the balance layers' ``(out, in)`` float32 weights, all reading the same input.
    """
    errors: list[float] = []
    best = torch.ones_like(act_mean, dtype=torch.float32)
    for i in range(grid):
        scales = candidate_scales(act_mean, i / grid)
        error = sum(float(output_error(w, _rounded(w * scales, fmt) / scales, hessian).sum())
                    for w, fmt in zip(weights, formats))
        if not errors or error < min(errors):
            best = scales
        errors.append(error)
    return best, errors


def search_clip(weight: torch.Tensor, fmt: WeightFormat, hessian: torch.Tensor, clip_grid: int,
                max_shrink: float) -> torch.Tensor:
    """``weight`` with each row of each group clamped to ``±p·max|w|``, ``p`` of least ``d H_gg dᵀ`` after rounding."""
    clipped = weight.clone()
    ratios = [1 - i / clip_grid for i in range(max(1, int(max_shrink * clip_grid)))]
    for cols in fmt.group_columns(weight.shape[1]):
        w, h = weight[:, cols], hessian[cols, cols]
        top = w.abs().amax(dim=1, keepdim=True)
        best_error = None
        for ratio in ratios:
            candidate = torch.minimum(torch.maximum(w, -ratio * top), ratio * top)
            error = output_error(w, _rounded(candidate, fmt), h)
            better = torch.ones_like(error, dtype=torch.bool) if best_error is None else error < best_error
            best_error = error if best_error is None else torch.where(better, error, best_error)
            clipped[:, cols] = torch.where(better[:, None], candidate, clipped[:, cols])
    return clipped


class _InputStats:
    """``H = E[x xᵀ]`` (up to GPTQ's factor 2, which no search depends on) and ``m = E|x|`` of one input."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.hessian = HessianAccumulator(features, device=device)
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.hessian.add_batch(x)
        self.abs_sum += x.detach().reshape(-1, x.shape[-1]).abs().sum(dim=0, dtype=torch.float64)

    @property
    def act_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.hessian.num_samples, 1)).float()

    def rescale(self, scales: torch.Tensor) -> None:
        """The input became ``x / scales`` (the scales were folded)."""
        scales = scales.to(self.abs_sum.device)
        self.hessian.hessian = self.hessian.hessian / (scales[:, None] * scales[None, :])
        self.abs_sum = self.abs_sum / scales.double()


class AWQTransform:
    """AWQ's scale and clipping search as a block transform (:class:`hfquant.calibration.pipeline.BlockTransform`)."""

    def __init__(self, options: AWQOptions, formats: dict[str, WeightFormat], model_config: Any) -> None:
        self.options = options
        self.formats = formats
        self.model_config = model_config
        self.architecture = architecture_for(model_config, "method='awq'")
        self.stats: dict[str, _InputStats] = {}

    def watch(self, block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        self.mappings = block_mappings(block, self.architecture, self.model_config)
        quantized = [name[len(prefix):] for name in self.formats if name.startswith(prefix)]
        # a layer's input is watched once per group of layers reading it (the balance layers of a mapping)
        self.input_of = {name: m.balance_names[0] for m in self.mappings for name in m.balance_names}
        self.input_of |= {name: name for name in quantized if name not in self.input_of}
        self.quantized = quantized
        self.stats = {}
        return {name: block.get_submodule(name) for name in dict.fromkeys(self.input_of.values())}

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        if name not in self.stats:
            self.stats[name] = _InputStats(inputs.shape[-1], inputs.device)
        self.stats[name].add(inputs)

    @torch.no_grad()
    def apply(self, block: nn.Module, prefix: str) -> None:
        transposed = self.architecture.transposed
        for mapping in self.mappings:
            stats = self.stats.get(mapping.balance_names[0])
            if stats is None:  # the block never called these layers on the calibration data: nothing to weigh by
                continue
            weights = [balance_weight(layer, transposed).detach().float() for layer in mapping.balance]
            formats = [self.formats.get(prefix + name) for name in mapping.balance_names]
            scales, _ = search_scales(weights, formats, stats.hessian.hessian, stats.act_mean, self.options.grid)
            fold(mapping, scales, transposed)
            stats.rescale(scales)
        if self.options.clip:
            for name in self.quantized:
                if name in self.architecture.query_key or self.input_of[name] not in self.stats:
                    continue
                weight = balance_weight(block.get_submodule(name), transposed)
                clipped = search_clip(weight.detach().float(), self.formats[prefix + name],
                                      self.stats[self.input_of[name]].hessian.hessian, self.options.clip_grid,
                                      self.options.max_shrink)
                weight.copy_(clipped.to(weight.dtype))
        self.stats = {}


def awq_fallback(weight: torch.Tensor, fmt: WeightFormat, options: AWQOptions) -> QuantizedWeight:
    """Round to nearest: the ``"rtn"`` solver, and layers outside the decoder blocks (no mapping)."""
    return fmt.quantize(weight)


def awq_solver(options: AWQOptions, formats: dict[str, WeightFormat]) -> DataFreeSolver | GPTQSolver:
    """What quantizes each layer after the transform: GPTQ (default options) or round-to-nearest."""
    return GPTQSolver(GPTQOptions(), formats) if options.solver == "gptq" else DataFreeSolver(awq_fallback, options,
                                                                                                formats)


AWQ = register_method(Method(name="awq", calibrated=True, options=AWQOptions, quantize=awq_fallback,
                             solver=awq_solver, transform=AWQTransform,
                             description="AWQ (activation-aware scaling and clipping, calibrated on text; "
                                         "Lin et al., 2023), then round-to-nearest or GPTQ."))
