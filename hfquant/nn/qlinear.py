"""A frozen linear layer holding packed integer weights.

Stored tensors (the names are the checkpoint keys, so a saved model reloads by name):

* ``weight``: ``int32 (out_features, packed_width(in_features, bits))`` — the codes, packed as
  described in :mod:`hfquant.packing`. Its shape never equals ``nn.Linear``'s ``(out, in)``, so a
  checkpoint loaded without ``import hfquant`` fails with a size mismatch instead of loading garbage.
* ``weight_scale``: ``float16 (out_features, num_groups)``.
* ``weight_zero``: ``uint8 (out_features, num_groups)``, asymmetric formats only.
* ``bias``: unchanged, in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from hfquant.formats import SCALE_DTYPE, ZERO_DTYPE, WeightFormat
from hfquant.packing import packed_width
from hfquant.quantize import QuantizedWeight, dequantize_packed


class QuantLinear(nn.Module):
    """``y = x @ dequantize(W).T + b`` for packed integer ``W``.

    ``transposed_source`` records that the layer replaced a GPT-2 style ``Conv1D`` whose
    full-precision weight is stored ``(in, out)``; it only matters when a full-precision
    weight is quantized into this module or when the module is turned back into a float one.
    """

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 transposed_source: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.transposed_source = transposed_source
        groups = fmt.num_groups(in_features)
        frozen = dict(requires_grad=False)
        self.weight = nn.Parameter(torch.zeros(out_features, packed_width(in_features, fmt.bits),
                                               dtype=torch.int32, device=device), **frozen)
        self.weight_scale = nn.Parameter(torch.ones(out_features, groups, dtype=SCALE_DTYPE, device=device),
                                         **frozen)
        self.weight_zero = None if fmt.sym else nn.Parameter(
            torch.zeros(out_features, groups, dtype=ZERO_DTYPE, device=device), **frozen)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), **frozen) if bias else None

    def stored(self) -> dict[str, torch.Tensor]:
        """The packed tensors, keyed like :meth:`QuantizedWeight.packed`."""
        tensors = {"weight": self.weight, "weight_scale": self.weight_scale}
        if self.weight_zero is not None:
            tensors["weight_zero"] = self.weight_zero
        return tensors

    def load_quantized(self, quantized: QuantizedWeight) -> None:
        """Copy a quantized weight in (shapes must match this layer)."""
        for name, tensor in quantized.packed().items():
            getattr(self, name).data.copy_(tensor)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` float weight this layer computes with."""
        return dequantize_packed(self.stored(), self.fmt, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.fmt.name}, bias={self.bias is not None}")
