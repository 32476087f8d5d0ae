"""Round-to-nearest: each weight goes to the nearest point of its group's grid. No data needed.

The maths is :func:`hfquant.quantize.quantize`; RTN runs while the checkpoint streams in, one
tensor at a time, so a full-precision copy of the model never exists in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from hfquant.algorithms import Method, register_method


@dataclass(frozen=True)
class RTNOptions:
    """RTN has no options beyond the weight format."""


RTN = register_method(Method(name="rtn", calibrated=False, options=RTNOptions))
