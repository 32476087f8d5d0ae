"""GPTQ: quantize a layer's columns one at a time, pushing each rounding error onto the columns
not yet quantized so that the layer's *output* on the calibration data changes as little as possible.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(2022). For a linear layer ``y = W x`` the objective is ``||W X - Ŵ X||²``, whose Hessian with
respect to each row of ``W`` is ``H = 2 X Xᵀ`` (averaged over samples here). Two independent steps:

* :class:`HessianAccumulator` sums ``H`` over calibration batches (the only part that sees data);
* :func:`gptq_quantize` solves for the codes given ``W`` and ``H`` — a pure function of tensors.

Grids and rounding are the layer format's own (:mod:`hfquant.formats`): every group's parameters
come from ``fmt.choose_params`` (already representable in their stored dtypes), each column is
rounded with ``fmt.round``, and the error fed back is the one of ``fmt.dequantize``, so
``QuantizedWeight.dequantize()`` returns exactly the weights GPTQ optimised for. So GPTQ works for
every format whose rounding is element by element given the group's parameters (integer, ternary,
binary, FP8, NF4/FP4; trivially fp16/bf16).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from hfquant.algorithms import Method, register_method
from hfquant.formats import QuantizedWeight, WeightFormat
from hfquant.formats.base import Params, check_weight


@dataclass(frozen=True)
class GPTQOptions:
    """Options of :func:`gptq_quantize`.

    Args:
        damp_percent: added to the Hessian's diagonal, as a fraction of its mean diagonal.
        block_size: columns per lazy batch update (speed only; the result does not depend on it
            beyond float rounding).
        act_order: quantize columns by decreasing Hessian diagonal (most activated first).
        static_groups: compute every group's scale from the original weights up front, instead of
            from the error-updated weights when the group is entered. ``None`` = same as
            ``act_order``. With ``act_order`` it must be on: the packed format has no per-column
            group index, so groups must stay contiguous in the original column order.
        mse_clip: shrink each group's range to minimise the 2.4-norm of its rounding error
            (see :func:`clipped_params`) instead of using the full min/max range.
    """

    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool | None = None
    mse_clip: bool = False

    def __post_init__(self) -> None:
        # Types are checked by Method.parse_options for HfQuantConfig; checked again here (and stored as
        # Python scalars) for direct construction. Imported here to keep this file's header untouched.
        from hfquant.validation import require_bool, require_float, require_int

        checked = {
            "damp_percent": require_float("damp_percent", self.damp_percent, 0, 1, low_open=True),
            "block_size": require_int("block_size", self.block_size, 1, 2**20),
            "act_order": require_bool("act_order", self.act_order),
            "static_groups": None if self.static_groups is None else require_bool("static_groups", self.static_groups),
            "mse_clip": require_bool("mse_clip", self.mse_clip),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.act_order and self.static_groups is False:
            raise ValueError("static_groups=False is not supported with act_order=True: the packed format "
                             "has no per-column group index; allowed: static_groups=True or None")

    @property
    def uses_static_groups(self) -> bool:
        return self.act_order if self.static_groups is None else self.static_groups


class HessianAccumulator:
    """Running ``H = 2/N Σ x xᵀ`` over all ``N`` input vectors seen so far, in float32.

    Every vector counts as one sample (the reference counts sequences instead; that only scales
    ``H``, which GPTQ is invariant to), so the result does not depend on how inputs are batched.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_samples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs of shape ``(..., in_features)``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs have {x.shape[-1]} features, expected in_features={self.in_features}")
        x = x.reshape(-1, self.in_features).to(device=self.hessian.device, dtype=torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        n = self.num_samples
        self.hessian *= n / (n + m)
        self.num_samples = n + m
        x = x * math.sqrt(2 / self.num_samples)
        self.hessian += x.T @ x


def clipped_params(w: torch.Tensor, fmt: WeightFormat, norm: float = 2.4, grid: int = 100,
                   maxshrink: float = 0.8) -> Params:
    """Like ``fmt.choose_params``, but each row's range is shrunk by the factor in
    ``1, 1 - 1/grid, ..., 1 - maxshrink`` that minimises ``Σ |w - ŵ|^norm`` over the row.

    Shrinking by ``p`` is ``fmt.choose_params(w, clip=p)``; ``p = 1`` is the plain grid, so the
    error never exceeds it.
    """
    w = w.float()
    best = fmt.choose_params(w)
    best_err = _norm_error(w, best, fmt, norm)
    for i in range(1, int(maxshrink * grid)):
        params = fmt.choose_params(w, clip=1 - i / grid)
        err = _norm_error(w, params, fmt, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = {k: torch.where(better, params[k], best[k]) for k in best}
    return best


def _norm_error(w: torch.Tensor, params: Params, fmt: WeightFormat, norm: float) -> torch.Tensor:
    grid = {k: v[:, None] for k, v in params.items()}
    return (fmt.dequantize(fmt.round(w, grid), grid, torch.float32) - w).abs().pow(norm).sum(dim=1)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat,
                  options: GPTQOptions = GPTQOptions()) -> QuantizedWeight:
    """Quantize a ``(out, in)`` weight with GPTQ given the ``(in, in)`` Hessian of its inputs.

    Runs in float32 on ``weight``'s device. Codes and parameters are returned in the original
    column order, with groups of ``fmt.group_size`` contiguous original columns.
    """
    check_weight(weight)
    rows, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; weight {tuple(weight.shape)} "
                         f"needs ({columns}, {columns})")
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    if not torch.isfinite(H).all():
        raise ValueError("hessian has non-finite entries (inf/NaN in the calibration activations?)")
    find_params = _param_finder(fmt, options)

    dead = torch.diag(H) == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    groups = fmt.group_columns(columns)
    width = fmt.group_width(columns)
    params = {k: torch.zeros(rows, len(groups), device=W.device) for k in fmt.param_dtypes}

    def enter_group(g: int, w: torch.Tensor) -> None:
        for k, v in find_params(w).items():
            params[k][:, g] = v

    if options.uses_static_groups:
        for g, cols in enumerate(groups):
            enter_group(g, W[:, cols])

    perm = torch.argsort(torch.diag(H), descending=True) if options.act_order else torch.arange(columns, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // width).tolist()  # group of each (processed) column

    Hinv = _upper_cholesky_of_inverse(H, options.damp_percent)
    codes = torch.zeros(rows, columns, dtype=torch.int32, device=W.device)
    code_dtype = torch.int32  # becomes the dtype of the format's own codes (what fmt.quantize returns)
    for b0 in range(0, columns, options.block_size):
        b1 = min(b0 + options.block_size, columns)
        Wb = W[:, b0:b1].clone()  # this block, kept fully updated
        Err = torch.zeros_like(Wb)  # scaled errors, applied to the columns after the block at its end
        for j in range(b1 - b0):
            c = b0 + j
            g = group_of[c]
            if not options.uses_static_groups and c % width == 0:  # no act_order here: c is original
                end = min(c + width, columns)
                enter_group(g, torch.cat([Wb[:, j:end - b0], W[:, b1:end] - Err[:, :j] @ Hinv[b0:c, b1:end]], dim=1))
            w = Wb[:, j]
            column_params = {k: v[:, g] for k, v in params.items()}
            code = fmt.round(w, column_params)
            codes[:, c] = code.to(torch.int32)
            code_dtype = code.dtype
            err = (w - fmt.dequantize(code, column_params, torch.float32)) / Hinv[c, c]
            Wb[:, j:] -= err[:, None] * Hinv[c, c:b1][None, :]
            Err[:, j] = err
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]

    codes = codes[:, torch.argsort(perm)].to(code_dtype)
    return QuantizedWeight(codes=codes, params={k: v.to(fmt.param_dtypes[k]) for k, v in params.items()}, fmt=fmt)


def _param_finder(fmt: WeightFormat, options: GPTQOptions) -> Callable[[torch.Tensor], Params]:
    """How a group's grid is chosen: the format's own rule, or the ``mse_clip`` range search."""
    return partial(clipped_params, fmt=fmt) if options.mse_clip else fmt.choose_params


def gptq_fallback(weight: torch.Tensor, fmt: WeightFormat, options: GPTQOptions) -> QuantizedWeight:
    """Layers GPTQ has no calibration inputs for: round to nearest on GPTQ's grid rule."""
    return fmt.quantize(weight, _param_finder(fmt, options))


def _upper_cholesky_of_inverse(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·I)⁻¹``: row ``c`` holds the error-feedback weights of column ``c``."""
    H = H + damp_percent * torch.diag(H).mean() * torch.eye(H.shape[0], device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if info == 0:
            return U
    raise ValueError(f"the Hessian is not positive definite after dampening with damp_percent={damp_percent}; "
                     "raise damp_percent (e.g. 0.1) or use more calibration samples")


def layer_reconstruction_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace((W - Ŵ) H (W - Ŵ)ᵀ)``; with ``H = 2/N X Xᵀ`` this is ``2/N ||W X - Ŵ X||²``."""
    D = (weight.double() - dequantized.double())
    return float((D @ hessian.double().to(D.device) * D).sum())


class GPTQSolver:
    """GPTQ as a layer-wise solver for the sequential calibration engine: one Hessian per layer."""

    def __init__(self, options: GPTQOptions, formats: dict[str, WeightFormat]) -> None:
        self.formats = formats
        self.options = options
        self.hessians: dict[str, HessianAccumulator] = {}

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        if name not in self.hessians:
            self.hessians[name] = HessianAccumulator(inputs.shape[-1], device=inputs.device)
        self.hessians[name].add_batch(inputs)

    def solve(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        hessian = self.hessians.pop(name).hessian
        return gptq_quantize(weight.to(hessian.device), hessian, self.formats[name], self.options)


GPTQ = register_method(Method(name="gptq", calibrated=True, options=GPTQOptions, quantize=gptq_fallback,
                              solver=GPTQSolver,
                              description="GPTQ (second-order, calibrated on text; Frantar et al., 2022)."))
