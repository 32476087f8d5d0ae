"""8-bit float weights (``fp8-e4m3``, alias ``fp8``; ``fp8-e5m2``): ``w ≈ fp8(w / scale) · scale``.

Codes are the OCP float8 bit patterns of torch's ``float8_e4m3fn`` (largest value 448, no
infinities) or ``float8_e5m2`` (largest 57344), one float32 ``scale`` per (row, group), per
channel by default: ``scale = clip · max|w| / fp8_max``, so a group's largest weight lands on the
largest finite fp8 value. Rounding clamps ``w / scale`` to ``±fp8_max`` and casts (round to
nearest even), so no code is ever NaN or infinite; decoding is a reinterpreting view, a cast and
a product.

Error per weight, for ``w`` within the group's range: at most ``2**-4 · |w|`` (e4m3, 3 mantissa
bits) or ``2**-3 · |w|`` (e5m2) where ``w / scale`` is a normal fp8 value, plus half the subnormal
spacing, ``scale · 2**-10`` (e4m3) or ``scale · 2**-17`` (e5m2), near zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfquant.formats.base import Params, WeightFormat, stored_scale
from hfquant.validation import require_choice

DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
SCALE_DTYPE = torch.float32


@dataclass(frozen=True, kw_only=True)
class FP8(WeightFormat):
    """Weights scaled per group, then rounded to the 8-bit float ``variant``."""

    variant: str = "e4m3"

    names = {"fp8-e4m3": {"variant": "e4m3"}, "fp8": {"variant": "e4m3"}, "fp8-e5m2": {"variant": "e5m2"}}
    defaults = {name: {"group_size": -1} for name in names}

    def __post_init__(self) -> None:
        require_choice("variant", self.variant, tuple(DTYPES))
        super().__post_init__()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.variant]

    @property
    def fp8_max(self) -> float:
        """Largest finite value of the variant."""
        return torch.finfo(self.torch_dtype).max

    @property
    def code_bits(self) -> int:
        return 8

    @property
    def param_dtypes(self) -> dict[str, torch.dtype]:
        return {"scale": SCALE_DTYPE}

    def choose_params(self, w: torch.Tensor, clip: float = 1.0) -> Params:
        absmax = w.float().abs().amax(dim=1)
        return {"scale": stored_scale(absmax * clip / self.fp8_max, SCALE_DTYPE)}

    def round(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        x = (w.float() / params["scale"]).clamp(-self.fp8_max, self.fp8_max)
        return x.to(self.torch_dtype).view(torch.uint8)

    def dequantize(self, codes: torch.Tensor, params: Params, dtype: torch.dtype) -> torch.Tensor:
        weight = codes.to(torch.uint8).view(self.torch_dtype).to(dtype)
        return weight.mul_(params["scale"].to(dtype))

    def describe(self) -> str:
        return f"`{self.name}`: float8 {self.variant} codes with float32 scales"
