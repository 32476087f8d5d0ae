"""Lookup-table weights (``nf4``, ``fp4``): ``w ≈ table[q] · scale``, one fixed table of values per format.

A table is data (:attr:`Codebook.tables`), its values in *code order*: code ``q`` decodes to
``table[q]``. Codes take ``ceil(log2(len(table)))`` bits, packed like every format's; one float16
``weight_scale`` per (row, group), by the name's rule: ``absmax``, ``scale = clip · max|w| /
max|table|``, or ``absmean``, ``scale = clip · mean|w|`` (BitNet's). An all-zero group gets
``2**-24``, so a table without 0 (binary) decodes it to ``±2**-24``.

Rounding takes the table value nearest to ``w / scale`` (bucketed on the float32 midpoints of the
sorted table); on a midpoint, the neighbour of smaller magnitude (at 0, the lower one). A value
listed twice (fp4's ``-0``) is produced under its first code only.

* ``nf4``: QLoRA's NormalFloat in bitsandbytes' code order (``-1`` is code 0, ``0`` code 7, ``1`` code 15);
* ``fp4``: OCP e2m1, the code is the bit pattern (bit 3 the sign; ``-0``, code 8, is never produced).
  Ties go toward zero, so at ``0.75``, ``1.75`` and ``3.5`` it differs from round-to-nearest-even.

Error per weight with ``absmax``: at most half the table's largest gap times ``scale`` (``nf4``
``0.152 · scale``, between -1 and -0.696; ``fp4`` ``1 · scale``, between 4 and 6).

A :class:`UniformCodebook` has evenly spaced values, ``table[q] = table[0] + q · step``, so its
decoding is affine in the code, ``w = (q - zero) · scale · step`` with ``zero = -table[0] / step``,
and the integer kernels take it. It decodes by that arithmetic instead of a lookup (the same
values, faster), so a code past its table (ternary's unused 3) decodes as the kernels decode it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import torch

from hfquant.formats.base import SCALE_DTYPE, SCALE_MIN, Params, WeightFormat, stored_scale
from hfquant.validation import require_choice

NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_RULES = ("absmax", "absmean")


@cache
def _buckets(table: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Midpoints between the table's distinct values in ascending order, and the code of each value."""
    values = torch.tensor(table, dtype=torch.float32).tolist()  # the values decoding gives in float32
    ranked = sorted(range(len(values)), key=lambda q: (values[q], q))
    codes = [q for i, q in enumerate(ranked) if i == 0 or values[q] != values[ranked[i - 1]]]
    midpoints = [(values[a] + values[b]) / 2 for a, b in itertools.pairwise(codes)]
    return tuple(midpoints), tuple(codes)


@dataclass(frozen=True, kw_only=True)
class Codebook(WeightFormat):
    """Codes into the table ``codebook`` of :attr:`tables`, times a per-group scale of rule ``scale_rule``."""

    codebook: str = "nf4"
    scale_rule: str = "absmax"

    tables: ClassVar[dict[str, tuple[float, ...]]] = {"nf4": NF4, "fp4": FP4}
    names = {"nf4": {"codebook": "nf4", "scale_rule": "absmax"}, "fp4": {"codebook": "fp4", "scale_rule": "absmax"}}
    defaults = {"nf4": {"group_size": 64}, "fp4": {"group_size": 64}}

    def __post_init__(self) -> None:
        require_choice("codebook", self.codebook, tuple(self.tables))
        require_choice("scale_rule", self.scale_rule, SCALE_RULES)
        super().__post_init__()

    @property
    def table(self) -> tuple[float, ...]:
        """The values, in code order."""
        return self.tables[self.codebook]

    @property
    def num_codes(self) -> int:
        """Codes in use, ``0 .. num_codes - 1``; the others of ``code_bits`` bits are never produced."""
        return len(self.table)

    @property
    def code_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.num_codes)))

    @property
    def param_dtypes(self) -> dict[str, torch.dtype]:
        return {"scale": SCALE_DTYPE}

    def choose_params(self, w: torch.Tensor, clip: float = 1.0) -> Params:
        magnitude = w.float().abs()
        if self.scale_rule == "absmax":
            scale = magnitude.amax(dim=1) / max(abs(v) for v in self.table)
        else:
            scale = magnitude.mean(dim=1)
        return {"scale": stored_scale((scale * clip).clamp(min=SCALE_MIN))}

    def round(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        midpoints, codes = _buckets(self.table)
        midpoints = torch.tensor(midpoints, dtype=torch.float32, device=w.device)
        codes = torch.tensor(codes, dtype=torch.uint8, device=w.device)
        x = w.float() / params["scale"]
        # bucketize sends a value on a midpoint down; one float32 step toward 0 sends negative ones up
        x = torch.where(x < 0, torch.nextafter(x, x.new_tensor(math.inf)), x)
        return codes[torch.bucketize(x.contiguous(), midpoints)]

    def dequantize(self, codes: torch.Tensor, params: Params, dtype: torch.dtype) -> torch.Tensor:
        table = torch.tensor(self.table, dtype=torch.float32, device=codes.device).to(dtype)
        values = table.index_select(0, codes.reshape(-1).int()).reshape(codes.shape)  # 2x faster than table[codes]
        return values.mul_(params["scale"].to(dtype))

    def _name_tokens(self) -> list[str]:
        rule_is_fixed = "scale_rule" in type(self).names[self.format_name]
        return [*super()._name_tokens(), *([] if rule_is_fixed else [self.scale_rule])]

    def describe(self) -> str:
        return (f"`{self.name}`: {self.code_bits}-bit codes into the {len(self.table)}-value {self.codebook} table, "
                f"float16 {self.scale_rule} scales")


@dataclass(frozen=True, kw_only=True)
class UniformCodebook(Codebook):
    """A codebook with evenly spaced values in code order: its decoding is affine in the code."""

    @property
    def step(self) -> float:
        return self.table[1] - self.table[0]

    def dequantize(self, codes: torch.Tensor, params: Params, dtype: torch.dtype) -> torch.Tensor:
        values = codes.to(dtype).mul_(self.step).add_(self.table[0])  # table[q], exact: small integers or halves
        return values.mul_(params["scale"].to(dtype))

    def affine(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` such that ``w = (q - zero) · scale``: the view the integer kernels take."""
        scale = params["scale"].float() * self.step
        return scale, torch.full_like(scale, -self.table[0] / self.step)
