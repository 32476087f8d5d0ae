import itertools

import pytest
import torch

from hfquant.formats import WeightFormat
from hfquant.packing import unpack
from hfquant.quantize import dequantize_packed, expand_groups, quantize

FORMATS = [WeightFormat(bits, group, sym)
           for bits, group, sym in itertools.product((2, 3, 4, 8), (-1, 32, 128, 48), (True, False))]


def _weight(out: int = 24, inp: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 0.1


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_error_within_grid_bound(fmt: WeightFormat) -> None:
    w = _weight()  # 200 columns: not a multiple of 32, 48 or 128, so the last group is short
    q = quantize(w, fmt)
    assert q.codes.shape == w.shape and int(q.codes.max()) <= fmt.maxq
    assert q.scale.shape == (w.shape[0], fmt.num_groups(w.shape[1])) and q.scale.dtype == torch.float16
    assert (q.zero is None) == fmt.sym
    scale = expand_groups(q.scale.float(), w.shape[1], fmt)
    err = (q.dequantize() - w).abs()
    if fmt.sym:
        assert torch.all(err <= scale / 2 * (1 + 1e-5))
    else:  # inside the representable range: half a step; at its ends the rounded zero can cost a full step
        zero = expand_groups(q.zero.float(), w.shape[1], fmt)
        inside = (w >= -zero * scale) & (w <= (fmt.maxq - zero) * scale)
        assert torch.all(err[inside] <= scale[inside] / 2 * (1 + 1e-5))
        assert torch.all(err <= scale * (1 + 1e-5))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_packed_round_trip_is_exact(fmt: WeightFormat) -> None:
    w = _weight(seed=1)
    q = quantize(w, fmt)
    stored = q.packed()
    assert torch.equal(unpack(stored["weight"], fmt.bits, w.shape[1]), q.codes)
    assert torch.equal(dequantize_packed(stored, fmt, w.shape[1]), q.dequantize())


def test_matches_a_reference_loop() -> None:
    """Element-by-element re-derivation of the asymmetric grid."""
    fmt = WeightFormat(3, 16, sym=False)
    w = _weight(4, 40, seed=2)
    q = quantize(w, fmt)
    for r in range(4):
        for g0 in range(0, 40, 16):
            cols = w[r, g0:g0 + 16]
            lo, hi = min(float(cols.min()), 0.0), max(float(cols.max()), 0.0)
            scale = float(torch.tensor((hi - lo) / 7).half())
            if scale < (hi - lo) / 7:  # scales are rounded up to float16
                scale = float(torch.nextafter(torch.tensor(scale).half(), torch.tensor(1e9).half()))
            zero = min(max(round(-lo / scale), 0), 7)
            for c in range(len(cols)):
                code = min(max(round(float(cols[c]) / scale) + zero, 0), 7)
                assert int(q.codes[r, g0 + c]) == code
            assert float(q.scale[r, g0 // 16]) == scale and int(q.zero[r, g0 // 16]) == zero


def test_constant_zero_group_is_exact() -> None:
    w = torch.zeros(3, 64)
    for sym in (True, False):
        q = quantize(w, WeightFormat(4, 32, sym))
        assert torch.equal(q.dequantize(), w)
        assert torch.all(q.scale > 0)


def test_more_bits_less_error() -> None:
    w = _weight(seed=3)
    errors = [float((quantize(w, WeightFormat(b, 64)).dequantize() - w).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(4), WeightFormat(4))


@pytest.mark.parametrize("bad", [dict(bits=5), dict(bits=4, group_size=0)])
def test_format_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        WeightFormat(**bad)
