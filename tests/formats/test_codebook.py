"""NF4 and FP4 against a reference: the table value nearest to ``w / scale`` by argmin over the table
(in float64, ties to the smaller magnitude), ``scale`` = the smallest float16 >= ``max|w| / max|table|``.
The format buckets on float32-rounded midpoints, so the two could differ only where ``w / scale``
is exactly such a rounded midpoint (nf4: not exactly representable); the fixed test data has none.

Error bound checked: ``|w - deq| <= scale · (largest gap of the table) / 2`` (nf4 0.152, fp4 1).
The tables themselves are checked against their definitions: NF4 rebuilt from normal quantiles as
bitsandbytes does, FP4 decoded from its e2m1 bit patterns.
"""

import itertools

import pytest
import torch

from hfquant.formats import format_from_dict, make_format, parse_spec

F16_POSITIVE = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def float16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest positive float16 >= x (1 for 0), as float32."""
    return torch.where(x == 0, 1.0, F16_POSITIVE[torch.searchsorted(F16_POSITIVE, x)])


def reference_codes(x: torch.Tensor, table: tuple[float, ...]) -> torch.Tensor:
    """Argmin of ``|x - v|`` over the table in float64; ties to the smaller ``|v|``, then lower ``v``, then code."""
    values = torch.tensor(table, dtype=torch.float32).double()
    preference = sorted(range(len(table)), key=lambda q: (abs(table[q]), table[q], q))
    dist = (x.double()[..., None] - values[preference]).abs()
    return torch.tensor(preference)[dist.argmin(-1)]


def reference_quantize(w: torch.Tensor, table: tuple[float, ...], group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(out, in)`` and scales ``(out, groups)``."""
    codes, scales = [], []
    for part in w.split(group, dim=1):
        scale = float16_up(part.abs().amax(dim=1) / max(abs(v) for v in table))
        codes.append(reference_codes(part / scale[:, None], table))
        scales.append(scale)
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


@pytest.mark.parametrize("name", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "group"), [((1, 37), 64), ((7, 100), 32), ((4, 130), 64), ((2, 50), 8)])
def test_matches_reference(name: str, shape: tuple[int, int], group: int) -> None:
    fmt = make_format(name, group_size=group)
    w = _weight(*shape, seed=shape[1])
    codes, scales = reference_quantize(w, fmt.table, group)
    qw = fmt.quantize(w)
    assert qw.params["scale"].dtype == torch.float16 and torch.equal(qw.params["scale"].float(), scales)
    assert torch.equal(qw.codes.long(), codes)
    expected = torch.tensor(fmt.table)[codes] * scales.repeat_interleave(group, dim=1)[:, :shape[1]]
    assert torch.equal(qw.dequantize(), expected)


@pytest.mark.parametrize(("name", "half_gap"), [("nf4", 0.1519036), ("fp4", 1.0)])
def test_error_bound(name: str, half_gap: float) -> None:
    fmt = make_format(name, group_size=32)
    w = _weight(32, 96, seed=3) * torch.logspace(-2, 1, 32)[:, None]
    table = sorted(fmt.table)
    assert max(b - a for a, b in itertools.pairwise(table)) / 2 == pytest.approx(half_gap)
    qw = fmt.quantize(w)
    bound = qw.params["scale"].float().repeat_interleave(32, dim=1) * half_gap
    assert bool(((w - qw.dequantize()).abs() <= bound * (1 + 2**-20)).all())


def test_fp4_table_is_the_e2m1_bit_patterns() -> None:
    def e2m1(code: int) -> float:
        sign, exponent, mantissa = (-1.0) ** (code >> 3), (code >> 1) & 3, code & 1
        return sign * (mantissa / 2 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2))

    table = make_format("fp4").table
    assert [str(v) for v in table] == [str(e2m1(q)) for q in range(16)]  # str tells -0.0 from 0.0


def test_nf4_table_is_qlora_normal_float() -> None:
    """bitsandbytes' ``create_normal_map(offset=0.9677083)``: 8 positive and 7 negative normal quantiles and 0,
    scaled to [-1, 1], ascending: code 0 is -1, code 7 is 0, code 15 is 1."""
    ppf = torch.special.ndtri
    positive = ppf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ppf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    table = torch.tensor(make_format("nf4").table, dtype=torch.float64)
    assert torch.allclose(table, values / values.max(), rtol=0, atol=1e-6)
    assert table[0] == -1 and table[7] == 0 and table[15] == 1


@pytest.mark.parametrize(("x", "expected"), [
    (0.25, 0.0), (-0.25, 0.0), (0.75, 0.5), (-0.75, -0.5), (1.25, 1.0), (1.75, 1.5), (2.5, 2.0), (3.5, 3.0),
    (5.0, 4.0), (-5.0, -4.0), (7.0, 6.0), (-100.0, -6.0), (-0.0, 0.0), (1e-30, 0.0)])
def test_fp4_ties_go_toward_zero(x: float, expected: float) -> None:
    fmt = make_format("fp4")
    code = fmt.round(torch.tensor([x]), {"scale": torch.ones(1)})
    assert fmt.table[int(code)] == expected and int(code) != 8  # -0 is never produced


def test_all_zero_groups_decode_to_zero() -> None:
    for name in ("nf4", "fp4"):
        fmt = make_format(name, group_size=16)
        w = _weight(3, 40)
        w[0] = 0
        w[1, 16:32] = 0
        qw = fmt.quantize(w)
        assert bool((qw.params["scale"][0] == 2**-24).all()) and qw.params["scale"][1, 1] == 2**-24
        deq = qw.dequantize()
        assert bool((deq[0] == 0).all()) and bool((deq[1, 16:32] == 0).all())
        assert fmt.check_stored(qw.stored(), 40) is None


def test_names_and_saved_form() -> None:
    for name in ("nf4", "fp4"):
        fmt = make_format(name)
        assert fmt.name == f"{name}-g64" and fmt.code_bits == 4 and fmt.scale_rule == "absmax"
        assert fmt.to_dict() == {"format": name, "group_size": 64}
        assert not hasattr(fmt, "affine")  # a table lookup: no integer kernel
        for spec in (f"{name}-g64", f"{name}-g128", f"{name}-gc"):
            fmt = parse_spec(spec)
            assert fmt.name == spec and parse_spec(fmt.name) == fmt and format_from_dict(fmt.to_dict()) == fmt
    assert make_format("nf4").stored_bits(2, 128) == 2 * 128 * 4 + 2 * 2 * 16


def test_bad_fields_name_the_field() -> None:
    from hfquant.formats.codebook import Codebook

    with pytest.raises(ValueError, match="codebook='nf3'"):
        Codebook(codebook="nf3")
    with pytest.raises(ValueError, match="scale_rule='absmin'"):
        Codebook(scale_rule="absmin")
    with pytest.raises(ValueError, match=r"does not take \['scale_rule'\]"):
        make_format("nf4", scale_rule="absmean")
    with pytest.raises(ValueError, match="group_size=-2"):
        make_format("fp4", group_size=-2)
    with pytest.raises(ValueError, match="'absmean' is not a word"):
        parse_spec("nf4-g64-absmean")
