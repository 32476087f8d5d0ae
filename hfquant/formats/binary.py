"""Binary weights (``binary``, 1 bit): ``w ≈ ±scale``, the sign times the group's mean magnitude.

BitNet's binarization (Wang et al., "BitNet", 2023) without its mean-centering: ``scale = mean|w|``
of the group (float16, one per (row, group), 128 columns by default), the L2-optimal scale for a
sign; ``w > 0`` decodes to ``+scale``, ``w <= 0`` (zero included) to ``-scale``, as BitNet's ``Sign``.
A :class:`~hfquant.formats.codebook.UniformCodebook` of the table ``(-1, 1)``.

Codes 0, 1 stand for -1, +1, so ``w = (q - 0.5) · 2 · scale``: the integer kernels take it with
``zero = 0.5`` and twice the stored scale (both exact in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

from hfquant.formats.codebook import UniformCodebook


@dataclass(frozen=True, kw_only=True)
class Binary(UniformCodebook):
    """One bit per weight, its sign, times a per-group ``absmean`` scale."""

    codebook: str = "binary"
    scale_rule: str = "absmean"

    tables = {"binary": (-1.0, 1.0)}
    names = {"binary": {"codebook": "binary", "scale_rule": "absmean"}}
