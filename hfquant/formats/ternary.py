"""Ternary weights (``ternary``, 1.58 bits): ``w ≈ t · scale`` with ``t ∈ {-1, 0, +1}``, BitNet b1.58's grid.

Ma et al., "The Era of 1-bit LLMs" (2024): ``scale = mean|w|`` (``absmean``, the default),
``t = clamp(round(w / scale), -1, 1)``; ``absmax`` (``scale = max|w|``) is the alternative (spec
words ``-absmean``/``-absmax``). One float16 scale per (row, group), 128 columns by default.
A :class:`~hfquant.formats.codebook.UniformCodebook` of the table ``(-1, 0, 1)``: ``t`` is the
table value nearest to ``w / scale`` (ties at ``±0.5`` go to 0, as ``torch.round`` does).

Codes 0, 1, 2 stand for -1, 0, +1, so ``w = (q - 1) · scale``: the integer kernels take it with
``zero = 1``. Stored layout (``packing``): ``2bit`` (default), the generic bit packing, 2 bits
per code (code 3 unused); ``base3`` (spec word ``-base3``), five codes per byte as the base-3
digits ``byte = q0 + 3·q1 + 9·q2 + 27·q3 + 81·q4`` (at most 242), four bytes per int32 word,
little-endian: 20 codes per word, 1.6 bits per code, rows zero-padded to whole words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hfquant.formats.codebook import SCALE_RULES, UniformCodebook
from hfquant.validation import require_choice

PACKINGS = ("2bit", "base3")
TRIT_WEIGHTS = (1, 3, 9, 27, 81)  # code k of a byte's five is its base-3 digit k
BYTE_SHIFTS = (0, 8, 16, 24)  # byte k of a word
CODES_PER_WORD = len(TRIT_WEIGHTS) * len(BYTE_SHIFTS)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """``(rows, n)`` codes in ``0..2`` -> ``(rows, ceil(n / 20))`` int32 words, five base-3 digits per byte."""
    rows, n = codes.shape
    digits = F.pad(codes.to(torch.int64), (0, -n % CODES_PER_WORD))
    digits = digits.reshape(rows, -1, len(BYTE_SHIFTS), len(TRIT_WEIGHTS))
    weights = torch.tensor(TRIT_WEIGHTS, device=codes.device)
    shifts = torch.tensor(BYTE_SHIFTS, device=codes.device)
    words = ((digits * weights).sum(-1) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the unsigned pattern as int32


def unpack_trits(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: every code of the words (padding included), as ``torch.uint8``."""
    shifts = torch.tensor(BYTE_SHIFTS, dtype=torch.int32, device=words.device)
    weights = torch.tensor(TRIT_WEIGHTS, dtype=torch.uint8, device=words.device)
    data = ((words[..., None] >> shifts) & 0xFF).to(torch.uint8)
    return (data[..., None] // weights % 3).reshape(words.shape[0], -1)


@dataclass(frozen=True, kw_only=True)
class Ternary(UniformCodebook):
    """Codes for -1, 0, +1 times a per-group scale of rule ``scale_rule``, stored by ``packing``."""

    codebook: str = "ternary"
    scale_rule: str = "absmean"
    packing: str = "2bit"

    tables = {"ternary": (-1.0, 0.0, 1.0)}
    names = {"ternary": {"codebook": "ternary"}}
    spec_tokens = {word: {field: word} for field, words in (("scale_rule", SCALE_RULES), ("packing", PACKINGS))
                   for word in words}

    def __post_init__(self) -> None:
        require_choice("packing", self.packing, PACKINGS)
        super().__post_init__()

    def code_words(self, in_features: int) -> int:
        if self.packing == "2bit":
            return super().code_words(in_features)
        return math.ceil(in_features / CODES_PER_WORD)

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return super().pack_codes(codes) if self.packing == "2bit" else pack_trits(codes)

    def unpack_codes(self, words: torch.Tensor) -> torch.Tensor:
        return super().unpack_codes(words) if self.packing == "2bit" else unpack_trits(words)

    def _name_tokens(self) -> list[str]:
        return [*super()._name_tokens(), *([] if self.packing == "2bit" else [self.packing])]

    def describe(self) -> str:
        size = "2 bits" if self.packing == "2bit" else "1.6 bits: five per byte"
        return f"`{self.name}`: ternary codes (-1, 0, +1; {size}) with float16 {self.scale_rule} scales"
