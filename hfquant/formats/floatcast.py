"""Half-precision weights (``fp16``, ``bf16``): the weight cast to a 16-bit float, no codes or scales.

Stored like every format (:mod:`hfquant.formats.base`): the 16-bit patterns packed two per int32
word, so a layer goes through the same module, checkpoint and verification path as the integer
formats. Decoding is a reinterpreting view plus a cast; in the format's own dtype it copies nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfquant.formats.base import Params, WeightFormat
from hfquant.validation import require_choice

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class FloatCast(WeightFormat):
    """The weight rounded to ``dtype`` (round-to-nearest-even), stored as its bit pattern."""

    dtype: str = "fp16"
    group_size: int = -1

    names = {name: {"dtype": name} for name in DTYPES}
    grouped = False

    def __post_init__(self) -> None:
        require_choice("dtype", self.dtype, tuple(DTYPES))
        super().__post_init__()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def code_bits(self) -> int:
        return 16

    @property
    def param_dtypes(self) -> dict[str, torch.dtype]:
        return {}

    def choose_params(self, w: torch.Tensor, clip: float = 1.0) -> Params:
        return {}

    def round(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        return w.to(self.torch_dtype).view(torch.int16).to(torch.int32) & 0xFFFF

    def dequantize(self, codes: torch.Tensor, params: Params, dtype: torch.dtype) -> torch.Tensor:
        return codes.to(torch.int16).view(self.torch_dtype).to(dtype)

    def describe(self) -> str:
        return f"`{self.name}`: weights stored in {self.dtype} (no codes, no scales)"
