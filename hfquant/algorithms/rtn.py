"""Round-to-nearest: each weight goes to the nearest point of its group's grid. No data needed.

The maths is each format's own :meth:`~hfquant.formats.base.WeightFormat.quantize`; RTN runs while
the checkpoint streams in, one tensor at a time, so a full-precision copy of the model never exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hfquant.algorithms import Method, register_method
from hfquant.formats import QuantizedWeight, WeightFormat


@dataclass(frozen=True)
class RTNOptions:
    """RTN has no options beyond the weight format."""


def round_to_nearest(weight: torch.Tensor, fmt: WeightFormat, options: Any = None) -> QuantizedWeight:
    return fmt.quantize(weight)


RTN = register_method(Method(name="rtn", calibrated=False, options=RTNOptions, quantize=round_to_nearest,
                             description="round-to-nearest weight quantization (no calibration data)."))
