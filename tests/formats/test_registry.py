"""The contract every registered format meets; a new format joins by registering a name.

For each name (at its defaults, and with 16-column groups where it has groups; plus stored
layouts no name has by default) and a few odd shapes: the saved form and spec string give the
format back; parameters are representable in their stored dtypes; the stored tensors are exactly
the declared specs and their bytes are ``stored_bits``; the packed codes unpack exactly (through
the format's own ``unpack_codes``, and :func:`hfquant.packing.unpack` for the generic packing);
decoding equals element-wise dequantization (whole groups, single columns, bfloat16); each weight
decodes to the nearest grid point its group offers, also on a clipped range; ``affine``, where
defined, reproduces ``dequantize`` exactly for every code; ``check_stored`` accepts a fresh
quantization and rejects a wrong dtype or shape, a missing parameter and bad scales; an all-zero
weight decodes to (almost) zero.
"""

import math

import pytest
import torch

from hfquant.formats import format_from_dict, format_names, make_format, parse_spec
from hfquant.formats.base import WeightFormat
from hfquant.packing import unpack
from format_cases import registered_format_variants

SHAPES = [(1, 37), (3, 40), (5, 130)]




NON_DEFAULT_LAYOUTS = ["ternary-g16-absmean-base3"]  # stored layouts no name has by default
FORMATS = registered_format_variants() + [parse_spec(spec) for spec in NON_DEFAULT_LAYOUTS]
AFFINE = [fmt for fmt in FORMATS if hasattr(fmt, "affine")]


def _ids(fmt: WeightFormat) -> str:
    return fmt.name


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-2, 1, cols)


def _column_params(fmt: WeightFormat, params: dict[str, torch.Tensor], cols: int) -> dict[str, torch.Tensor]:
    """Each parameter repeated over its group's columns: ``(out, in)``."""
    width = fmt.group_width(cols)
    return {k: v.repeat_interleave(width, dim=1)[:, :cols] for k, v in params.items()}


@pytest.mark.parametrize("name", format_names())
def test_every_name_gives_itself_back(name: str) -> None:
    fmt = make_format(name)
    assert parse_spec(name) == fmt and parse_spec(fmt.name) == fmt and format_from_dict(fmt.to_dict()) == fmt
    assert fmt.to_dict()["format"] == fmt.format_name and make_format(fmt.format_name) == fmt
    assert isinstance(fmt.describe(), str) and fmt.name in fmt.describe()


@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_spec_and_saved_form_round_trip(fmt: WeightFormat) -> None:
    assert parse_spec(fmt.name) == fmt and format_from_dict(fmt.to_dict()) == fmt
    assert hash(parse_spec(fmt.name)) == hash(fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_choose_params_are_representable(fmt: WeightFormat) -> None:
    w = _weight(6, 24)
    params = fmt.choose_params(w)
    assert set(params) == set(fmt.param_dtypes)
    for k, dtype in fmt.param_dtypes.items():
        assert params[k].dtype == torch.float32 and params[k].shape == (6,)
        assert torch.equal(params[k].to(dtype).float(), params[k])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_stored_tensors_are_the_specs(fmt: WeightFormat, shape: tuple[int, int]) -> None:
    stored = fmt.quantize(_weight(*shape)).stored()
    specs = fmt.specs(*shape)
    assert list(stored) == list(specs)
    for key, spec in specs.items():
        assert stored[key].dtype == spec.dtype and tuple(stored[key].shape) == spec.shape
    assert sum(t.numel() * t.element_size() * 8 for t in stored.values()) == fmt.stored_bits(*shape)
    assert fmt.stored_bits(*shape) == sum(spec.bits for spec in specs.values())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_packed_codes_unpack_exactly(fmt: WeightFormat, shape: tuple[int, int]) -> None:
    qw = fmt.quantize(_weight(*shape))
    assert qw.codes.shape == shape and not qw.codes.is_floating_point()
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) < getattr(fmt, "num_codes", 2**fmt.code_bits)
    words = qw.stored()["weight"]
    assert words.shape == (shape[0], fmt.code_words(shape[1]))
    unpacked = fmt.unpack_codes(words)[:, :shape[1]].long() & (2**fmt.code_bits - 1)  # 16-bit codes: int16 bits
    assert torch.equal(unpacked, qw.codes.long())
    if type(fmt).pack_codes is WeightFormat.pack_codes:  # the generic bit packing
        assert torch.equal(unpack(words, fmt.code_bits, shape[1]).long() & (2**fmt.code_bits - 1), qw.codes.long())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_decode_equals_elementwise_dequantize(fmt: WeightFormat, shape: tuple[int, int]) -> None:
    w = _weight(*shape, seed=1)
    qw = fmt.quantize(w)
    columns = _column_params(fmt, qw.params, shape[1])
    for dtype in (torch.float32, torch.bfloat16):
        decoded = fmt.decode(qw.stored(), shape[1], dtype)
        assert decoded.dtype == dtype and decoded.shape == shape
        assert torch.equal(decoded, fmt.dequantize(qw.codes, columns, dtype))
    assert torch.equal(qw.dequantize(), fmt.decode(qw.stored(), shape[1]))
    for j in (0, shape[1] - 1):  # one column at a time, (rows,) codes and parameters: how GPTQ calls them
        column = {k: v[:, j] for k, v in columns.items()}
        assert torch.equal(fmt.round(w[:, j], column), qw.codes[:, j])
        assert torch.equal(fmt.dequantize(qw.codes[:, j], column, torch.float32), qw.dequantize()[:, j])


@pytest.mark.parametrize("clip", [1.0, 0.7])
@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_each_weight_takes_the_nearest_grid_point(fmt: WeightFormat, clip: float) -> None:
    """No code decodes closer to ``w`` under the same group parameters, up to float32 rounding of the
    distances (codes that decode to NaN are no grid point; a format with a ``num_codes`` attribute
    uses only ``0 .. num_codes - 1``, e.g. ternary's three of its four 2-bit codes); also on
    a clipped range (``clip=0.7``, as range searches use), where weights beyond it take the end."""
    rows, cols = 3, 40
    w = _weight(rows, cols, seed=2)
    qw = fmt.quantize(w, lambda group: fmt.choose_params(group, clip=clip))
    columns = _column_params(fmt, qw.params, cols)
    candidates = torch.arange(getattr(fmt, "num_codes", 2**fmt.code_bits), dtype=torch.int32)
    if fmt.code_bits == 16:
        candidates = candidates.to(torch.int16)  # 16-bit codes are int16 bit patterns
    grid = fmt.dequantize(candidates[:, None, None].expand(-1, rows, cols).contiguous(),
                          {k: v.expand(len(candidates), rows, cols) for k, v in columns.items()}, torch.float32)
    nearest = (w - grid).abs().nan_to_num(nan=math.inf).amin(dim=0)
    error = (w - qw.dequantize()).abs()
    assert bool((error <= nearest + 2**-22 * (w.abs() + nearest)).all())


@pytest.mark.parametrize("fmt", AFFINE, ids=_ids)
def test_affine_reproduces_dequantize(fmt: WeightFormat) -> None:
    qw = fmt.quantize(_weight(4, 40, seed=3))
    scale, zero = fmt.affine(qw.params)
    assert scale.dtype == zero.dtype == torch.float32
    assert scale.shape == zero.shape == next(iter(qw.params.values())).shape
    codes = torch.arange(2**fmt.code_bits)[:, None, None]  # every code, used or not
    grid = fmt.dequantize(codes.expand(-1, *scale.shape).contiguous(), qw.params, torch.float32)
    assert torch.equal((codes - zero) * scale, grid)


@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_check_stored(fmt: WeightFormat) -> None:
    rows, cols = 3, 40
    stored = fmt.quantize(_weight(rows, cols, seed=4)).stored()
    assert fmt.check_stored(stored, cols) is None
    assert "weight" in fmt.check_stored({**stored, "weight": stored["weight"].to(torch.int64)}, cols)
    assert "weight" in fmt.check_stored({**stored, "weight": stored["weight"][:, :-1]}, cols)
    for key in fmt.param_dtypes:
        assert "missing" in fmt.check_stored({k: v for k, v in stored.items() if k != f"weight_{key}"}, cols)
    if "scale" in fmt.param_dtypes:
        for bad in (math.inf, math.nan, 0.0, -1.0):
            scale = stored["weight_scale"].clone()
            scale[-1, -1] = bad
            assert "weight_scale" in fmt.check_stored({**stored, "weight_scale": scale}, cols)


@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_all_zero_weight_decodes_to_zero(fmt: WeightFormat) -> None:
    """Up to ``2**-24``: a grid without 0 (binary) decodes zeros to its smallest magnitude."""
    qw = fmt.quantize(torch.zeros(2, 40))
    assert fmt.check_stored(qw.stored(), 40) is None
    assert bool((qw.dequantize().abs() <= 2**-24).all())


def test_check_stored_names_a_missing_weight() -> None:
    fmt = make_format("int4")
    stored = fmt.quantize(_weight(2, 40)).stored()
    del stored["weight"]
    assert "missing" in fmt.check_stored(stored, 40)
