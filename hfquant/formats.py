"""Weight formats as data: what a quantized weight is, independent of how it was computed.

A :class:`WeightFormat` says how many bits each code has, how many input columns share one
scale (``group_size``, -1 = one group per output row) and whether the grid is symmetric.
Everything else (grid limits, number of groups, bits stored per weight) is derived from it,
so a new integer width is a new value, not a new code path.

Grid conventions (the GPTQ reference's, so checkpoints map onto its kernels later):

* codes are unsigned integers ``0 .. 2**bits - 1``;
* ``w ≈ (q - zero) * scale`` with one ``scale``/``zero`` per (row, group);
* symmetric: ``scale = 2 * max|w| / (2**bits - 1)``, ``zero = 2**(bits - 1)`` (not stored);
* asymmetric: the range ``[min(w, 0), max(w, 0)]`` is split into ``2**bits - 1`` steps and the
  integer ``zero`` is stored (``uint8``).

With these grids every weight is within ``scale / 2`` of its dequantized value in the symmetric
case; in the asymmetric case the rounded zero point can shift the grid by half a step, so values
at the ends of a group's range may be off by up to ``scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hfquant.packing import packed_width

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16
ZERO_DTYPE = torch.uint8


@dataclass(frozen=True)
class WeightFormat:
    """An integer weight format: code width, grouping and symmetry."""

    bits: int
    group_size: int = 128
    sym: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; allowed: {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be -1 (per output channel) or a positive integer")

    @property
    def maxq(self) -> int:
        """Largest code."""
        return 2**self.bits - 1

    @property
    def sym_zero(self) -> int:
        """The fixed zero point of the symmetric grid."""
        return 2 ** (self.bits - 1)

    @property
    def name(self) -> str:
        group = "c" if self.group_size == -1 else str(self.group_size)
        return f"int{self.bits}-g{group}-{'sym' if self.sym else 'asym'}"

    def group_width(self, in_features: int) -> int:
        """Number of input columns per group for a layer with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        """Groups per row; the last one is shorter when ``group_size`` does not divide ``in_features``."""
        return math.ceil(in_features / self.group_width(in_features))

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Bits a packed layer of this shape occupies (codes incl. padding, scales and zero points)."""
        groups = out_features * self.num_groups(in_features)
        code_bits = out_features * packed_width(in_features, self.bits) * 32
        scale_bits = groups * torch.finfo(SCALE_DTYPE).bits
        zero_bits = 0 if self.sym else groups * torch.iinfo(ZERO_DTYPE).bits
        return code_bits + scale_bits + zero_bits
