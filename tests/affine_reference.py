"""Oracles for the integer affine format, written out element-wise (no ``hfquant.formats`` code paths).

``w = (q - zero) * scale`` with one ``scale``/``zero`` per (row, group), each repeated over its
group's columns; codes come out of the generic bit unpacker (:func:`hfquant.packing.unpack`), not
the format's byte unpacker. Tests compare the format's fast ``decode`` and the kernels against these.
"""

from __future__ import annotations

import torch

from hfquant.formats.affine import IntAffine
from hfquant.packing import unpack


def expand_groups(per_group: torch.Tensor, in_features: int, fmt: IntAffine) -> torch.Tensor:
    """Repeat ``(out, groups)`` values over each group's columns: ``(out, in_features)``."""
    return per_group.repeat_interleave(fmt.group_width(in_features), dim=1)[:, :in_features]


def dequantize(codes: torch.Tensor, params: dict[str, torch.Tensor], fmt: IntAffine,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - zero) * scale`` in ``dtype``; symmetric formats use the fixed zero ``2**(bits-1)``."""
    in_features = codes.shape[1]
    zero = fmt.sym_zero if "zero" not in params else expand_groups(params["zero"], in_features, fmt).to(dtype)
    return (codes.to(dtype) - zero) * expand_groups(params["scale"], in_features, fmt).to(dtype)


def decode(stored: dict[str, torch.Tensor], fmt: IntAffine, in_features: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(out, in)`` weight of a layer's stored tensors (``weight``, ``weight_scale``, ``weight_zero``)."""
    codes = unpack(stored["weight"], fmt.bits, in_features)
    params = {key.removeprefix("weight_"): tensor for key, tensor in stored.items() if key != "weight"}
    return dequantize(codes, params, fmt, dtype)
