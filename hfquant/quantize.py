"""Affine integer quantization of 2-D weights: pure tensor functions, no transformers.

Shapes follow ``nn.Linear``: a weight is ``(out_features, in_features)``; scales and zero points
are ``(out_features, num_groups)``. See :mod:`hfquant.formats` for the grid conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfquant.formats import SCALE_DTYPE, ZERO_DTYPE, WeightFormat
from hfquant.packing import pack, unpack

_SCALE_MIN = 2.0**-24  # smallest positive float16, so a stored scale is never zero
_SCALE_MAX = torch.finfo(SCALE_DTYPE).max


@dataclass
class QuantizedWeight:
    """Unpacked codes plus their scales/zero points; ``pack()`` gives what a module stores."""

    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, groups) float16
    zero: torch.Tensor | None  # (out, groups) uint8; None for symmetric formats
    fmt: WeightFormat

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.fmt, dtype)

    def packed(self) -> dict[str, torch.Tensor]:
        """The tensors a quantized layer stores, keyed by their parameter names."""
        tensors = {"weight": pack(self.codes, self.fmt.bits), "weight_scale": self.scale}
        if self.zero is not None:
            tensors["weight_zero"] = self.zero
        return tensors


def qparams(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to the stored dtype) and zero point for each row of ``w``, as float32.

    ``w`` is ``(rows, columns)``; every row gets one (scale, zero) pair computed over its columns.
    """
    w = w.float()
    if fmt.sym:
        absmax = w.abs().amax(dim=1)
        scale = 2 * absmax / fmt.maxq
    else:
        wmin = w.amin(dim=1).clamp(max=0)
        wmax = w.amax(dim=1).clamp(min=0)
        scale = (wmax - wmin) / fmt.maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = _round_up_to_stored_dtype(scale.clamp(_SCALE_MIN, _SCALE_MAX))
    if fmt.sym:
        zero = torch.full_like(scale, fmt.sym_zero)
    else:
        zero = torch.round(-wmin / scale).clamp(0, fmt.maxq)
    return scale, zero


def _round_up_to_stored_dtype(scale: torch.Tensor) -> torch.Tensor:
    """Round scales up to the next value the stored dtype holds, so the grid still spans the range."""
    stored = scale.to(SCALE_DTYPE)
    too_small = stored.float() < scale
    stored = torch.where(too_small, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored)
    return stored.float()


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Codes of ``w`` on a given grid; ``scale``/``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, fmt.maxq)


def group_columns(in_features: int, fmt: WeightFormat) -> list[slice]:
    """The column ranges of the groups of a row, in order (the last may be shorter)."""
    width = fmt.group_width(in_features)
    return [slice(start, min(start + width, in_features)) for start in range(0, in_features, width)]


def quantize(w: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Round-to-nearest quantization of a ``(out, in)`` weight."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    scales, zeros, codes = [], [], []
    for cols in group_columns(w.shape[1], fmt):
        scale, zero = qparams(w[:, cols], fmt)
        codes.append(quantize_with(w[:, cols], scale[:, None], zero[:, None], fmt))
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        codes=torch.cat(codes, dim=1).to(torch.uint8),
        scale=torch.stack(scales, dim=1).to(SCALE_DTYPE),
        zero=None if fmt.sym else torch.stack(zeros, dim=1).to(ZERO_DTYPE),
        fmt=fmt,
    )


def expand_groups(per_group: torch.Tensor, in_features: int, fmt: WeightFormat) -> torch.Tensor:
    """Repeat ``(out, groups)`` values over each group's columns: ``(out, in_features)``."""
    return per_group.repeat_interleave(fmt.group_width(in_features), dim=1)[:, :in_features]


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    fmt: WeightFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(codes - zero) * scale`` in ``dtype``, with per-group values expanded over columns."""
    in_features = codes.shape[1]
    zero_point = fmt.sym_zero if zero is None else expand_groups(zero, in_features, fmt).to(dtype)
    return (codes.to(dtype) - zero_point) * expand_groups(scale, in_features, fmt).to(dtype)


def dequantize_packed(tensors: dict[str, torch.Tensor], fmt: WeightFormat, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize the stored tensors of one layer (``weight``, ``weight_scale``, ``weight_zero``)."""
    codes = unpack(tensors["weight"], fmt.bits, in_features)
    return dequantize(codes, tensors["weight_scale"], tensors.get("weight_zero"), fmt, dtype)
