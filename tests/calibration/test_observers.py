"""Observers of static activation scales against straightforward references on the raw samples."""

from __future__ import annotations

import pytest
import torch

from hfquant.calibration.observers import (HISTOGRAM_BINS, MSE_CANDIDATES, OBSERVERS, AbsHistogram,
                                           _rounding_error_integral, add_to_histogram, check_observer,
                                           expected_squared_error, mse_clip, percentile_clip)


def _activations(seed: int = 0, n: int = 40_000) -> torch.Tensor:
    """Heavy-tailed like LLM activations: mostly small values, a few large outliers."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    x[torch.randint(0, n, (40,), generator=gen)] *= 30
    return x


def _histogram(*batches: torch.Tensor) -> AbsHistogram:
    hist = AbsHistogram()
    for batch in batches:
        add_to_histogram(hist, batch)
    return hist


def _actual_mse(x: torch.Tensor, clip: float) -> float:
    """Symmetric int8 rounding with clipping, on the samples themselves (float64)."""
    x = x.double()
    step = clip / 127
    return float(((x - torch.clamp(torch.round(x / step), -127, 127) * step) ** 2).sum())


def test_histogram_of_growing_batches_equals_one_histogram_of_all() -> None:
    small, large = _activations(0) * 0.01, _activations(1)
    hist = _histogram(torch.zeros(5), small, large, small.reshape(-1, 8))
    everything = torch.cat([torch.zeros(5), small, large, small]).abs()
    assert hist.amax == float(everything.max()) and hist.top == 2.0 ** torch.ceil(torch.log2(everything.max())).item()
    want = torch.histc(everything, bins=HISTOGRAM_BINS, min=0, max=hist.top).double()
    assert torch.equal(hist.counts, want)
    assert hist.total == everything.numel()


def test_minmax_is_the_largest_magnitude() -> None:
    x = _activations()
    assert OBSERVERS["minmax"].clip(_histogram(x), None) == float(x.abs().max())


@pytest.mark.parametrize("percentile", [50.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_matches_torch_quantile_within_one_bin(percentile: float) -> None:
    x = _activations()
    hist = _histogram(x[:10_000], x[10_000:])
    want = float(torch.quantile(x.abs().double(), percentile / 100))
    got = percentile_clip(hist, percentile)
    assert abs(got - want) <= hist.top / HISTOGRAM_BINS and got <= hist.amax


def test_rounding_error_integral_matches_numeric_integration() -> None:
    u = torch.tensor([0.0, 0.3, 0.5, 1.7, 5.25, 126.9], dtype=torch.float64)
    for value in u:
        t = torch.linspace(0, float(value), 200_001, dtype=torch.float64)
        numeric = torch.trapezoid((t - torch.round(t)) ** 2, t)
        assert abs(float(_rounding_error_integral(value)) - float(numeric)) < 1e-6


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.6, 1.0])
def test_expected_error_matches_the_samples(fraction: float) -> None:
    x = _activations()
    hist = _histogram(x)
    clip = fraction * hist.amax
    assert expected_squared_error(hist, clip) == pytest.approx(_actual_mse(x, clip), rel=0.03)


def test_mse_picks_a_near_best_clip_among_its_candidates() -> None:
    x = _activations(n=10_000)
    hist = _histogram(x)
    candidates = hist.amax * torch.arange(1, MSE_CANDIDATES + 1, dtype=torch.float64).reshape(-1, 1) / MSE_CANDIDATES
    step = candidates / 127
    rows = x.double().reshape(1, -1)
    best = float(((rows - torch.clamp(torch.round(rows / step), -127, 127) * step) ** 2).sum(dim=1).min())
    chosen = mse_clip(hist)
    assert _actual_mse(x, chosen) <= 1.02 * best
    assert chosen < hist.amax  # the largest outliers are clipped


def test_all_zero_inputs_give_zero_clip() -> None:
    hist = _histogram(torch.zeros(7), torch.zeros(3, 2))
    assert hist.total == 13 and all(OBSERVERS[name].clip(hist, 99.0) == 0 for name in OBSERVERS)


def test_non_finite_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="inf/NaN"):
        add_to_histogram(AbsHistogram(), torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize(("observer", "percentile", "match"), [
    ("max", None, r"observer='max' is not allowed; expected one of \['minmax', 'percentile', 'mse'\]"),
    (["minmax"], None, "observer="),
    ("minmax", 99.0, r"observer_percentile=99.0 is not allowed with observer='minmax'"),
    ("percentile", 0, r"observer_percentile=0(\.0)? is not allowed; expected a finite number in \(0, 100\]"),
    ("percentile", 100.5, "observer_percentile=100.5"),
    ("percentile", "99", "observer_percentile='99'"),
    ("percentile", True, "observer_percentile=True"),
])
def test_bad_observer_values_name_the_field(observer: object, percentile: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_observer(observer, percentile)


def test_observer_defaults() -> None:
    assert check_observer("percentile", None) == ("percentile", 99.99)
    assert check_observer("mse", None) == ("mse", None)
