"""FP8 against a reference: the nearest finite fp8 value of ``w / scale`` found by search over all
256 bit patterns (ties to the even pattern, as round-to-nearest-even), ``scale = max|w| / fp8_max``.

Error bound checked: ``|w - deq| <= 2**-m · |w| + scale · 2**-(e_sub + 1)`` with ``m`` = 4 (e4m3)
or 3 (e5m2) and subnormal spacing ``2**-9`` (e4m3) or ``2**-16`` (e5m2), plus float32 rounding.
"""

import pytest
import torch

from hfquant.formats import format_from_dict, make_format, parse_spec

VARIANTS = {"e4m3": (torch.float8_e4m3fn, 4, 2.0**-9), "e5m2": (torch.float8_e5m2, 3, 2.0**-16)}


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _values(dtype: torch.dtype) -> torch.Tensor:
    """The float32 value of every 8-bit pattern (NaN and inf included)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()


def reference_codes(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The nearest finite fp8 value's pattern; ties to the even pattern, then to the pattern with x's sign."""
    values = _values(dtype)
    dist = (x[..., None] - values).abs().nan_to_num(nan=torch.inf)
    dist[..., ~torch.isfinite(values)] = torch.inf
    code = torch.arange(256)
    penalty = ((dist != dist.amin(-1, keepdim=True)) * 4 + (code % 2) * 2
               + ((code >= 128) != torch.signbit(x)[..., None]))
    return penalty.argmin(-1)


def reference_quantize(w: torch.Tensor, variant: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(out, in)`` and scales ``(out, groups)``."""
    dtype = VARIANTS[variant][0]
    codes, scales = [], []
    for part in w.split(group if group > 0 else w.shape[1], dim=1):
        absmax = part.abs().amax(dim=1)
        scale = torch.where(absmax == 0, 1.0, absmax / torch.finfo(dtype).max).clamp(min=2.0**-24)
        codes.append(reference_codes(part / scale[:, None], dtype))
        scales.append(scale)
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("shape", "group"), [((1, 37), -1), ((5, 100), 32), ((3, 130), 64)])
def test_matches_reference(variant: str, shape: tuple[int, int], group: int) -> None:
    fmt = make_format(f"fp8-{variant}", group_size=group)
    w = _weight(*shape) * torch.logspace(-3, 2, shape[1])  # wide dynamic range: subnormals too
    codes, scales = reference_quantize(w, variant, group)
    qw = fmt.quantize(w)
    assert torch.equal(qw.codes.long(), codes)
    assert qw.params["scale"].dtype == torch.float32 and torch.equal(qw.params["scale"], scales)
    width = fmt.group_width(shape[1])
    expected = _values(VARIANTS[variant][0])[codes] * scales.repeat_interleave(width, dim=1)[:, :shape[1]]
    assert torch.equal(qw.dequantize(), expected)
    assert torch.equal(qw.codes.view(VARIANTS[variant][0]).float(), _values(VARIANTS[variant][0])[codes])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_cast_agrees(variant: str) -> None:
    """The codes are torch's own round-to-nearest-even cast of the clamped ``w / scale``."""
    fmt = make_format(f"fp8-{variant}")
    w = _weight(8, 64, seed=1)
    qw = fmt.quantize(w)
    x = (w / qw.params["scale"]).clamp(-fmt.fp8_max, fmt.fp8_max)
    assert torch.equal(qw.codes, x.to(VARIANTS[variant][0]).view(torch.uint8))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_error_bound(variant: str) -> None:
    _, mantissa, subnormal_step = VARIANTS[variant]
    fmt = make_format(f"fp8-{variant}", group_size=32)
    w = _weight(16, 96, seed=2) * torch.logspace(-4, 1, 96)
    qw = fmt.quantize(w)
    scale = qw.params["scale"].repeat_interleave(32, dim=1)
    bound = 2.0**-mantissa * w.abs() + scale * subnormal_step / 2
    assert bool(((w - qw.dequantize()).abs() <= bound * (1 + 2**-20)).all())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_out_of_range_is_clamped_never_nan(variant: str) -> None:
    fmt = make_format(f"fp8-{variant}")
    w = torch.tensor([[1e30, -1e30, 1e6, -0.0, 0.0, torch.finfo(torch.float32).max]])
    codes = fmt.round(w, {"scale": torch.full((1, 1), 2.0**-24)})  # the last one overflows float32: inf
    values = codes.view(VARIANTS[variant][0]).float()
    assert values[0].tolist() == [fmt.fp8_max, -fmt.fp8_max, fmt.fp8_max, 0.0, 0.0, fmt.fp8_max]


def test_all_zero_groups_decode_to_zero() -> None:
    fmt = make_format("fp8", group_size=16)
    w = _weight(3, 40)
    w[0] = 0
    w[1, 16:32] = 0
    qw = fmt.quantize(w)
    assert qw.params["scale"][0].tolist() == [1.0, 1.0, 1.0] and qw.params["scale"][1, 1] == 1.0
    deq = qw.dequantize()
    assert bool((deq[0] == 0).all()) and bool((deq[1, 16:32] == 0).all())


def test_bfloat16_decode() -> None:
    fmt = make_format("fp8-e5m2", group_size=16)
    qw = fmt.quantize(_weight(4, 48))
    values = qw.codes.view(torch.float8_e5m2).to(torch.bfloat16)
    scale = qw.params["scale"].to(torch.bfloat16).repeat_interleave(16, dim=1)
    assert torch.equal(qw.dequantize(torch.bfloat16), values * scale)


def test_names_and_saved_form() -> None:
    e4m3 = make_format("fp8")
    assert e4m3 == make_format("fp8-e4m3") == parse_spec("fp8") == parse_spec("fp8-e4m3-gc")
    assert e4m3.name == "fp8-e4m3-gc" and e4m3.group_size == -1 and e4m3.code_bits == 8
    assert e4m3.to_dict() == {"format": "fp8-e4m3", "group_size": -1}
    assert format_from_dict({"format": "fp8", "group_size": 128}) == parse_spec("fp8-e4m3-g128")
    for spec in ["fp8-e4m3-gc", "fp8-e4m3-g32", "fp8-e5m2-gc", "fp8-e5m2-g128"]:
        fmt = parse_spec(spec)
        assert fmt.name == spec and parse_spec(fmt.name) == fmt and format_from_dict(fmt.to_dict()) == fmt
    assert make_format("fp8-e5m2").variant == "e5m2"
    assert not hasattr(e4m3, "affine")  # decoding is not affine in the code: no integer kernel
    assert e4m3.param_dtypes == {"scale": torch.float32}


def test_bad_fields_name_the_field() -> None:
    from hfquant.formats.fp8 import FP8

    with pytest.raises(ValueError, match="variant='e3m4'"):
        FP8(variant="e3m4")
    with pytest.raises(ValueError, match="group_size=0"):
        make_format("fp8", group_size=0)
    with pytest.raises(ValueError, match=r"does not take \['variant'\]"):
        make_format("fp8-e4m3", variant="e5m2")
    with pytest.raises(ValueError, match="'sym' is not a word"):
        parse_spec("fp8-e4m3-sym")


def test_check_stored_rejects_bad_scales() -> None:
    fmt = make_format("fp8", group_size=16)
    stored = fmt.quantize(_weight(2, 32)).stored()
    assert fmt.check_stored(stored, 32) is None
    for bad in (0.0, -1.0, torch.inf, torch.nan):
        scale = stored["weight_scale"].clone()
        scale[1, 0] = bad
        assert "weight_scale" in fmt.check_stored({**stored, "weight_scale": scale}, 32)
    assert "float16" in fmt.check_stored({**stored, "weight_scale": stored["weight_scale"].half()}, 32)
