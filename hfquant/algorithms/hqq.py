"""Half-quadratic quantization (HQQ-style): each group's grid refitted to its weights, no data needed.

After Badri & Shaji (2023), "Half-Quadratic Quantization of Large Machine Learning Models". Starting
from round-to-nearest, alternate for ``iterations`` steps, per row of a group:

1. round the weights onto the current grid: codes ``q`` and their values ``w_r``;
2. split off the outliers of the error with the proximal operator of the ``|·|^p`` norm (``p < 1``):
   ``e = shrink(w - w_r)``, ``shrink(x) = sign(x) · max(|x| - |x|^(p-1) / beta, 0)``;
3. refit the grid to ``w - e`` by least squares given ``q``: the scale alone for formats whose
   weights are ``value(q) · scale`` (symmetric integers, nf4, fp4, fp8, ternary, binary), the
   scale and the zero point for asymmetric integers (``(q - zero) · scale``);
4. ``beta *= kappa``.

Parameters stay in the format's stored form at every step (float16 scales, integer zero points),
so the checkpoint layout is the format's own. Each row keeps the grid with the lowest mean absolute
error ``|w - w_r|`` seen (the RTN grid included), so HQQ never does worse than RTN on that error.
All whole groups of a layer are optimised together (batched tensor maths, in cache-sized chunks). Streams while the checkpoint
loads, like RTN. Formats without a scale (fp16, bf16) do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hfquant.algorithms import Method, register_method
from hfquant.formats import QuantizedWeight, WeightFormat
from hfquant.formats.base import Params, check_weight, stored_scale
from hfquant.validation import require_float, require_int


@dataclass(frozen=True)
class HQQOptions:
    """HQQ's knobs; the defaults are the paper's (p = 0.7, beta = 10, kappa = 1.01, 20 steps)."""

    iterations: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01

    def __post_init__(self) -> None:
        require_int("iterations", self.iterations, 0, 10_000)
        require_float("lp_norm", self.lp_norm, 0.0, 1.0, low_open=True)
        require_float("beta", self.beta, 0.0, 1e12, low_open=True)
        require_float("kappa", self.kappa, 1.0, 100.0)


def applies_to(fmt: WeightFormat) -> str | None:
    """Why HQQ cannot optimise ``fmt``'s grid, or None."""
    if "scale" not in fmt.param_dtypes:
        return "it stores no scale to optimise; allowed: a format with per-group scales (not fp16/bf16)"
    return None


def shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / beta``-weighted shrinkage (HQQ's generalised soft threshold)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.pow(p - 1) / beta)


def refit(fmt: WeightFormat, codes: torch.Tensor, target: torch.Tensor, params: Params) -> Params:
    """Least-squares grid for ``codes`` to represent ``target`` (rows of one group), in stored form."""
    scale_dtype = fmt.param_dtypes["scale"]
    if "zero" in fmt.param_dtypes:  # target ≈ a·q + b with a = scale, b = -zero·scale
        q = codes.float()
        q_mean, t_mean = q.mean(dim=1), target.mean(dim=1)
        spread = ((q - q_mean[:, None]) ** 2).mean(dim=1)
        slope = ((q - q_mean[:, None]) * (target - t_mean[:, None])).mean(dim=1) / spread
        zero = torch.round(q_mean - t_mean / slope)
        top = 2**fmt.code_bits - 1
        zero = torch.where(torch.isfinite(zero) & (slope > 0), zero.clamp(0, top), params["zero"])
        unit = fmt.dequantize(codes, {"scale": torch.ones_like(zero)[:, None], "zero": zero[:, None]}, torch.float32)
    else:
        zero = None
        unit = fmt.dequantize(codes, {"scale": torch.ones_like(params["scale"])[:, None]}, torch.float32)
    scale = (unit * target).sum(dim=1) / (unit * unit).sum(dim=1)
    usable = torch.isfinite(scale) & (scale > 0)
    scale = torch.where(usable, stored_scale(torch.where(usable, scale, 1.0), scale_dtype), params["scale"])
    return {"scale": scale} if zero is None else {"scale": scale, "zero": zero}


def hqq_params(w: torch.Tensor, fmt: WeightFormat, options: HQQOptions) -> Params:
    """The optimised per-row parameters of one group ``w`` ``(rows, cols)``."""
    w = w.float()
    params = fmt.choose_params(w)

    def values(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        grid = {k: v[:, None] for k, v in p.items()}
        codes = fmt.round(w, grid)
        return codes, fmt.dequantize(codes, grid, torch.float32)

    codes, rounded = values(params)
    residual = w - rounded
    best, best_error = dict(params), residual.abs().mean(dim=1)
    beta = options.beta
    for _ in range(options.iterations):
        params = refit(fmt, codes, w - shrink(residual, beta, options.lp_norm), params)
        codes, rounded = values(params)
        residual = w - rounded
        error = residual.abs().mean(dim=1)
        better = error < best_error
        best = {k: torch.where(better, params[k], best[k]) for k in best}
        best_error = torch.minimum(error, best_error)
        beta *= options.kappa
    return best


#: Elements per optimisation step (512 KiB of float32): large enough that the per-op overhead is
#: small, small enough that the step's temporaries stay in cache. The whole layer at once measured
#: about 2x slower than this on a 1536x576 layer (one thread); the rows are independent problems.
CHUNK_ELEMENTS = 2**17


def group_rows(w: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``w`` ``(rows, cols)`` as ``(rows · full groups, width)`` rows of whole groups, and the shorter last group."""
    rows, cols = w.shape
    whole = cols // width * width
    batched = w[:, :whole].reshape(rows * (whole // width), width)
    return batched, (w[:, whole:] if whole < cols else None)


def chunked_hqq_params(w: torch.Tensor, fmt: WeightFormat, options: HQQOptions) -> Params:
    """:func:`hqq_params` of the rows of ``w`` in chunks of about :data:`CHUNK_ELEMENTS` (same result)."""
    step = max(1, CHUNK_ELEMENTS // max(1, w.shape[1]))
    parts = [hqq_params(rows, fmt, options) for rows in w.split(step)]
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def half_quadratic(weight: torch.Tensor, fmt: WeightFormat, options: Any) -> QuantizedWeight:
    """HQQ-optimised grids for every group of ``weight``, then rounding onto them.

    Every (row, group) of a layer is an independent problem, so all whole groups are optimised
    together as the rows of one ``(rows · groups, width)`` matrix, in cache-sized chunks of rows;
    a shorter last group is optimised on its own.
    """
    HQQ.check_format(fmt)
    options = options or HQQOptions()
    check_weight(weight)
    w = weight.detach().float()
    rows, cols = w.shape
    batched, rest = group_rows(w, fmt.group_width(cols))
    whole = ({k: v.reshape(rows, -1) for k, v in chunked_hqq_params(batched, fmt, options).items()}
             if batched.numel() else {})
    grids = [{k: v[:, g] for k, v in whole.items()} for g in range(batched.shape[0] // rows if rows else 0)]
    if rest is not None:
        grids.append(chunked_hqq_params(rest, fmt, options))
    per_group = iter(grids)
    return fmt.quantize(w, choose_params=lambda _group: next(per_group))


HQQ = register_method(Method(name="hqq", calibrated=False, options=HQQOptions, quantize=half_quadratic,
                             description="HQQ-style half-quadratic grid optimisation per group (no calibration data; "
                                         "Badri & Shaji, 2023).", applies_to=applies_to))
