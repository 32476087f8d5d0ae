"""Dense bit packing of integer codes into int32 words, driven by one small layout table.

Codes of ``bits`` bits are laid end to end, little-endian, along the last dimension: code ``j`` of
a row occupies bits ``[bits * j, bits * (j + 1))`` of that row's bit stream, and bit ``k`` of the
stream is bit ``k % 32`` of word ``k // 32``. A *unit* is the smallest run of codes that fills
whole words (``lcm(bits, 32)`` bits): 16 codes in 1 word at 2 bits, 32 codes in 3 words at 3 bits,
8 codes in 1 word at 4 bits, 4 codes in 1 word at 8 bits. Rows are zero-padded to whole units.

So a layer with ``in_features`` inputs stores ``packed_width(in_features, bits)`` int32 words per
output row: exactly ``bits`` bits per weight when ``in_features`` is a multiple of the unit.
Words are stored as ``torch.int32`` (safetensors ``I32``) holding the unsigned 32-bit pattern.
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache

import torch

WORD_BITS = 32
_PACK_CHUNK_ROWS = 1024  # bounds the temporary int64 tensors of `pack` on large layers


@lru_cache(maxsize=None)
def unit_layout(bits: int) -> tuple[int, int]:
    """``(codes per unit, words per unit)`` for codes of ``bits`` bits."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits!r} cannot be packed; allowed: 1..16")
    unit_bits = math.lcm(bits, WORD_BITS)
    return unit_bits // bits, unit_bits // WORD_BITS


def packed_width(num_codes: int, bits: int) -> int:
    """Words needed to store ``num_codes`` codes of ``bits`` bits (whole units)."""
    codes_per_unit, words_per_unit = unit_layout(bits)
    return math.ceil(num_codes / codes_per_unit) * words_per_unit


@lru_cache(maxsize=None)
def _code_positions(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each code of a unit: index of the word it starts in, and its bit offset there."""
    codes_per_unit, _ = unit_layout(bits)
    start = torch.arange(codes_per_unit, dtype=torch.int64) * bits
    return start // WORD_BITS, start % WORD_BITS


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (``0 <= c < 2**bits``) along the last dim into int32 words.

    Codes of up to 8 bits are packed byte-wise on little-endian machines (:func:`pack_bytes`);
    the generic packer on 64-bit integers (:func:`pack_words`) is the reference and covers the rest.
    """
    if codes.is_floating_point():
        raise TypeError(f"codes must be an integer tensor, got dtype={codes.dtype}")
    if sys.byteorder == "little" and bits <= 8:
        return pack_bytes(codes, bits)
    return pack_words(codes, bits)


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack` on 64-bit integers, a chunk of rows at a time (any width up to 16 bits)."""
    rows = codes.reshape(-1, codes.shape[-1])
    packed = torch.cat([_pack_rows(chunk, bits) for chunk in rows.split(_PACK_CHUNK_ROWS)])
    return packed.reshape(*codes.shape[:-1], -1)


def pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack` for codes of up to 8 bits, built byte by byte with ``uint8`` shifts (little-endian words).

    Each byte of a chunk of ``lcm(bits, 8)`` bits is the or of the parts of the codes that overlap
    it (the inverse of :func:`unpack_bytes`): 1 byte of temporaries per code instead of the
    96-byte-per-code int64 expansion of the generic packer at 3 bits.
    """
    nbytes, lo_byte, lo_shift, hi_byte, hi_shift = _BYTE_LAYOUTS[bits]
    codes_per_unit, words_per_unit = unit_layout(bits)
    rows = codes.reshape(-1, codes.shape[-1])
    num_rows, num_codes = rows.shape
    padded = torch.zeros(num_rows, math.ceil(num_codes / codes_per_unit) * codes_per_unit, dtype=torch.uint8,
                         device=codes.device)
    padded[:, :num_codes] = rows & (2**bits - 1)
    chunks = padded.reshape(num_rows, -1, len(lo_byte))
    out = torch.zeros(num_rows, chunks.shape[1], nbytes, dtype=torch.uint8, device=codes.device)
    for j, (lo, lo_s, hi, hi_s) in enumerate(zip(lo_byte, lo_shift, hi_byte, hi_shift, strict=True)):
        code = chunks[..., j]
        out[..., lo] |= code << lo_s  # uint8: bits above the byte drop off
        if hi < nbytes:
            out[..., hi] |= code >> hi_s
    words = out.reshape(num_rows, -1).view(torch.int32)
    return words.reshape(*codes.shape[:-1], padded.shape[1] // codes_per_unit * words_per_unit)


def _pack_rows(rows: torch.Tensor, bits: int) -> torch.Tensor:
    codes_per_unit, words_per_unit = unit_layout(bits)
    num_rows, num_codes = rows.shape
    padded = torch.zeros(num_rows, math.ceil(num_codes / codes_per_unit) * codes_per_unit,
                         dtype=torch.int64, device=rows.device)
    padded[:, :num_codes] = rows.to(torch.int64) & (2**bits - 1)
    units = padded.reshape(num_rows, -1, 1, codes_per_unit)
    # Shift of each code into each word of its unit: positive = left, negative = right.
    word_index = torch.arange(words_per_unit, device=rows.device).reshape(-1, 1)
    code_start = torch.arange(codes_per_unit, device=rows.device) * bits
    shift = code_start - word_index * WORD_BITS  # (words, codes)
    overlaps = (shift > -bits) & (shift < WORD_BITS)
    parts = torch.where(shift >= 0, units << shift.clamp(min=0), units >> (-shift).clamp(min=0))
    words = (parts * overlaps).sum(-1) & 0xFFFFFFFF  # disjoint bits: the sum is a bitwise or
    return _to_int32(words.reshape(num_rows, -1))


def unpack(words: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``num_codes`` codes of each row, as ``torch.uint8``/``int16``."""
    codes_per_unit, words_per_unit = unit_layout(bits)
    if words.shape[-1] != packed_width(num_codes, bits):
        raise ValueError(f"packed rows have {words.shape[-1]} words, expected {packed_width(num_codes, bits)} "
                         f"for num_codes={num_codes} at bits={bits}")
    word_index, bit_offset = (t.to(words.device) for t in _code_positions(bits))
    units = (words.to(torch.int64) & 0xFFFFFFFF).reshape(*words.shape[:-1], -1, words_per_unit)
    units = torch.nn.functional.pad(units, (0, 1))  # a zero word after each unit for codes that straddle
    low = units[..., word_index] >> bit_offset
    high = units[..., word_index + 1] << (WORD_BITS - bit_offset)
    codes = (low | high) & (2**bits - 1)
    codes = codes.reshape(*words.shape[:-1], -1)[..., :num_codes]
    return codes.to(torch.uint8 if bits <= 8 else torch.int16)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 bit patterns."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _byte_layout(bits: int) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """How codes sit in bytes: bytes per chunk, and per code its low byte/shift and high byte/shift.

    A chunk is ``lcm(bits, 8)`` bits. A code that straddles two bytes takes its high bits from the
    next byte.
    """
    chunk_bits = math.lcm(bits, 8)
    nbytes = chunk_bits // 8
    lo_byte, lo_shift, hi_byte, hi_shift = [], [], [], []
    for start in range(0, chunk_bits, bits):
        byte, offset = divmod(start, 8)
        lo_byte.append(byte)
        lo_shift.append(offset)
        straddles = offset + bits > 8
        hi_byte.append(byte + 1 if straddles else nbytes)  # nbytes: no high part
        hi_shift.append(8 - offset if straddles else 0)
    return nbytes, tuple(lo_byte), tuple(lo_shift), tuple(hi_byte), tuple(hi_shift)


_BYTE_LAYOUTS = {bits: _byte_layout(bits) for bits in range(1, 9)}  # a constant table: dynamo traces no cache


def unpack_bytes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """All codes of packed rows (padding included); the same codes as :func:`unpack` (16-bit ones as ``int16`` bits).

    Works on the words' little-endian bytes with ``uint8`` shifts: 1 byte of temporaries per code
    instead of the 8-byte words of the generic unpacker.
    """
    if sys.byteorder == "little" and bits == 16:
        return words.view(torch.int16)
    if sys.byteorder != "little" or bits > 8:
        return unpack(words, bits, words.shape[-1] * WORD_BITS // bits)
    nbytes, lo_byte, lo_shift, hi_byte, hi_shift = _BYTE_LAYOUTS[bits]
    rows = words.shape[0]
    chunks = words.view(torch.uint8).reshape(rows, -1, nbytes)
    mask = 2**bits - 1
    if nbytes == 1:  # 1, 2, 4, 8 bits: no code straddles a byte; one pass per code of a byte
        byte = chunks[..., 0]
        codes = [byte >> shift if shift + bits == 8 else (byte >> shift) & mask for shift in lo_shift]
        return torch.stack(codes, dim=-1).reshape(rows, -1)
    codes = torch.empty(rows, chunks.shape[1], len(lo_byte), dtype=torch.uint8, device=words.device)
    for j, (lo, lo_s, hi, hi_s) in enumerate(zip(lo_byte, lo_shift, hi_byte, hi_shift, strict=True)):
        code = chunks[..., lo] >> lo_s
        if hi < nbytes:
            code = code | (chunks[..., hi] << hi_s)
        codes[..., j] = code & mask
    return codes.reshape(rows, -1)
