"""The one rounding function shared by the fake-quantized forward and :func:`hfquant.qat.convert`.

Both call :func:`quantize_weight`, which rounds through the format's own ``quantize`` (grid chosen per
group, round-to-nearest) or, with learned scales, through ``fmt.round`` on the given stored
parameters; the weight a fake-quantized layer computes with is :meth:`QuantizedWeight.dequantize`
of that result, i.e. exactly what the converted ``QuantLinear`` decodes from its stored tensors.
"""

from __future__ import annotations

import torch

from hfquant.formats import QuantizedWeight, WeightFormat
from hfquant.formats.base import Params, check_weight, stored_scale


def quantize_weight(w: torch.Tensor, fmt: WeightFormat, params: Params | None = None) -> QuantizedWeight:
    """``w`` ``(out, in)`` quantized in ``fmt``: grids chosen per group, or the stored ``params`` ``(out, groups)``."""
    if params is None:
        return fmt.quantize(w)
    check_weight(w)
    w = w.detach().float()
    stored = {k: (stored_scale(params[k].detach().float(), dtype) if k == "scale" else params[k].detach()).to(dtype)
              for k, dtype in fmt.param_dtypes.items()}  # a learned scale is stored positive, rounded up
    codes = [fmt.round(w[:, cols], {k: v[:, g, None].float() for k, v in stored.items()})
             for g, cols in enumerate(fmt.group_columns(w.shape[1]))]
    return QuantizedWeight(torch.cat(codes, dim=1), stored, fmt)
