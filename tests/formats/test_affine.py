import itertools

import pytest
import torch

from affine_reference import decode as reference_decode
from affine_reference import dequantize as reference_dequantize
from affine_reference import expand_groups
from hfquant.formats.affine import IntAffine
from hfquant.packing import unpack

FORMATS = [IntAffine(bits=bits, group_size=group, sym=sym)
           for bits, group, sym in itertools.product((2, 3, 4, 8), (-1, 32, 128, 48), (True, False))]


def _weight(out: int = 24, inp: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 0.1


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_error_within_grid_bound(fmt: IntAffine) -> None:
    w = _weight()  # 200 columns: not a multiple of 32, 48 or 128, so the last group is short
    q = fmt.quantize(w)
    assert q.codes.shape == w.shape and int(q.codes.max()) <= fmt.maxq
    assert q.params["scale"].shape == (w.shape[0], fmt.num_groups(w.shape[1]))
    assert q.params["scale"].dtype == torch.float16
    assert ("zero" not in q.params) == fmt.sym
    assert set(q.params) == ({"scale"} if fmt.sym else {"scale", "zero"})
    scale = expand_groups(q.params["scale"].float(), w.shape[1], fmt)
    err = (q.dequantize() - w).abs()
    if fmt.sym:
        assert torch.all(err <= scale / 2 * (1 + 1e-5))
    else:  # inside the representable range: half a step; at its ends the rounded zero can cost a full step
        assert q.params["zero"].dtype == torch.uint8
        zero = expand_groups(q.params["zero"].float(), w.shape[1], fmt)
        inside = (w >= -zero * scale) & (w <= (fmt.maxq - zero) * scale)
        assert torch.all(err[inside] <= scale[inside] / 2 * (1 + 1e-5))
        assert torch.all(err <= scale * (1 + 1e-5))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_packed_round_trip_is_exact(fmt: IntAffine) -> None:
    w = _weight(seed=1)
    q = fmt.quantize(w)
    stored = q.stored()
    assert set(stored) == {"weight", *(f"weight_{p}" for p in q.params)}
    assert torch.equal(unpack(stored["weight"], fmt.bits, w.shape[1]), q.codes)
    # decoding the stored tensors == (codes - zero) * scale on the unpacked codes
    assert torch.equal(fmt.decode(stored, w.shape[1]), reference_dequantize(q.codes, q.params, fmt))
    assert torch.equal(reference_decode(stored, fmt, w.shape[1]), q.dequantize())


def test_matches_a_reference_loop() -> None:
    """Element-by-element re-derivation of the asymmetric grid."""
    fmt = IntAffine(bits=3, group_size=16, sym=False)
    w = _weight(4, 40, seed=2)
    q = fmt.quantize(w)
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
            assert float(q.params["scale"][r, g0 // 16]) == scale and int(q.params["zero"][r, g0 // 16]) == zero


def test_constant_zero_group_is_exact() -> None:
    w = torch.zeros(3, 64)
    for sym in (True, False):
        q = IntAffine(bits=4, group_size=32, sym=sym).quantize(w)
        assert torch.equal(q.dequantize(), w)
        assert torch.all(q.params["scale"] > 0)


def test_more_bits_less_error() -> None:
    w = _weight(seed=3)
    errors = [float((IntAffine(bits=b, group_size=64, sym=False).quantize(w).dequantize() - w).pow(2).mean())
              for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        IntAffine(bits=4).quantize(torch.zeros(4))


@pytest.mark.parametrize("bad", [dict(bits=5), dict(bits=4, group_size=0)])
def test_format_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        IntAffine(**bad)
