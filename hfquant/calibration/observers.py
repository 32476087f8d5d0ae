"""Observers: the clipping range of a static activation scale, chosen from statistics of calibration inputs.

What is collected per layer is an :class:`AbsHistogram` of ``|x|`` over every element of every
calibration batch the layer saw (:func:`add_to_histogram`), with its exact maximum. Its range is
a power of two that doubles when a larger value arrives; doubling merges pairs of bins, so no
count moves to a wrong bin. An observer is a registered :class:`Observer` value: a pure function
``(histogram, options) -> clip`` (the largest magnitude the int8 grid covers; the activation mode
turns it into its stored tensors, e.g. ``input_scale = clip / 127``):

* ``minmax`` — ``clip = max|x|``: no value is clipped.
* ``percentile`` — ``clip`` = the ``observer_percentile``-th percentile of ``|x|`` (linear within a
  bin; at most the maximum).
* ``mse`` — the ``clip`` among :data:`MSE_CANDIDATES` evenly spaced values in ``(0, max|x|]`` that
  minimises the expected squared error of symmetric int8 rounding with clipping, integrated
  exactly over each bin with the counts spread uniformly inside it (:func:`expected_squared_error`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hfquant.validation import require_choice, require_float

HISTOGRAM_BINS = 4096
MSE_CANDIDATES = 256
DEFAULT_PERCENTILE = 99.99
INT8_LEVELS = 127  # positive levels of the symmetric int8 grid


@dataclass
class AbsHistogram:
    """Counts of ``|x|`` in :data:`HISTOGRAM_BINS` equal bins over ``[0, top]``; ``top`` is 0 or a power of two."""

    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(HISTOGRAM_BINS, dtype=torch.float64))
    top: float = 0.0
    amax: float = 0.0

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def edges(self) -> torch.Tensor:
        return torch.linspace(0, self.top, len(self.counts) + 1, dtype=torch.float64)


def add_to_histogram(hist: AbsHistogram, x: torch.Tensor) -> AbsHistogram:
    """Count the magnitudes of every element of ``x`` into ``hist`` (in place; returned for chaining)."""
    values = x.detach().reshape(-1).float().abs()
    if values.numel() == 0:
        return hist
    amax = float(values.max())
    if not math.isfinite(amax):
        raise ValueError("calibration inputs have inf/NaN values; a static activation scale cannot be chosen")
    hist.amax = max(hist.amax, amax)
    if amax > hist.top:
        top = 2.0 ** math.ceil(math.log2(amax))
        if hist.top > 0:  # every bin becomes part of one wider bin
            factor = int(round(top / hist.top))
            bins = len(hist.counts)
            merged = hist.counts.reshape(-1, factor).sum(dim=1) if factor < bins else hist.counts.sum().reshape(1)
            hist.counts = torch.cat([merged, torch.zeros(bins - len(merged), dtype=torch.float64)])
        hist.top = top
    if hist.top == 0:  # only zeros so far: they belong to the first bin whatever the range becomes
        hist.counts[0] += values.numel()
        return hist
    counts = torch.histc(values, bins=len(hist.counts), min=0, max=hist.top)
    hist.counts += counts.to(device="cpu", dtype=torch.float64)
    return hist


def minmax_clip(hist: AbsHistogram, percentile: float | None = None) -> float:
    """The largest magnitude seen."""
    return hist.amax


def percentile_clip(hist: AbsHistogram, percentile: float | None = DEFAULT_PERCENTILE) -> float:
    """The ``percentile``-th percentile of ``|x|``, linear within its bin, at most the largest magnitude."""
    if hist.amax == 0:
        return 0.0
    cumulative = hist.counts.cumsum(0)
    target = percentile / 100 * float(cumulative[-1])
    index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64))[0])
    index = min(index, len(hist.counts) - 1)
    before = float(cumulative[index - 1]) if index else 0.0
    inside = float(hist.counts[index])
    width = hist.top / len(hist.counts)
    fraction = (target - before) / inside if inside > 0 else 1.0
    return min(hist.amax, (index + fraction) * width)


def _rounding_error_integral(u: torch.Tensor) -> torch.Tensor:
    """``∫_0^u (t - round(t))^2 dt`` for ``u >= 0`` (one twelfth per whole step)."""
    nearest = torch.floor(u + 0.5)
    return nearest / 12 + (u - nearest) ** 3 / 3


def expected_squared_errors(hist: AbsHistogram, clips: torch.Tensor, levels: int = INT8_LEVELS) -> torch.Tensor:
    """For each of ``clips``: the sum over the histogram's values of ``(x - q(x))^2`` on the symmetric grid
    of step ``clip / levels`` with clipping at ``clip``, each bin's count spread uniformly over the bin."""
    clip = clips.double().reshape(-1, 1)
    step = clip / levels
    edges = hist.edges().reshape(1, -1)
    inside = torch.minimum(edges, clip)
    # antiderivative of the error density at every bin edge, for every clip value
    integral = step**3 * _rounding_error_integral(inside / step) + torch.clamp(edges - clip, min=0) ** 3 / 3
    per_value = (integral[:, 1:] - integral[:, :-1]) / (edges[:, 1:] - edges[:, :-1])
    return per_value @ hist.counts


def expected_squared_error(hist: AbsHistogram, clip: float, levels: int = INT8_LEVELS) -> float:
    """:func:`expected_squared_errors` for one clip value."""
    return float(expected_squared_errors(hist, torch.tensor([clip]), levels)[0])


def mse_clip(hist: AbsHistogram, percentile: float | None = None) -> float:
    """The candidate clip value with the smallest :func:`expected_squared_error`."""
    if hist.amax == 0:
        return 0.0
    candidates = hist.amax * torch.arange(1, MSE_CANDIDATES + 1, dtype=torch.float64) / MSE_CANDIDATES
    return float(candidates[int(expected_squared_errors(hist, candidates).argmin())])


@dataclass(frozen=True)
class Observer:
    """A rule for a static scale's clipping range: ``clip(histogram, percentile)``."""

    name: str
    clip: Callable[[AbsHistogram, float | None], float]


OBSERVERS: dict[str, Observer] = {o.name: o for o in (Observer("minmax", minmax_clip),
                                                      Observer("percentile", percentile_clip),
                                                      Observer("mse", mse_clip))}
DEFAULT_OBSERVER = "mse"  # measured best on the bundled model (bench/results/w8a8_static.md)


def check_observer(observer: object, percentile: object) -> tuple[str, float | None]:
    """``(observer, percentile)`` checked: ``ValueError`` naming ``observer`` or ``observer_percentile``.

    ``percentile`` is only taken with ``observer="percentile"`` (``None`` there: :data:`DEFAULT_PERCENTILE`).
    """
    observer = require_choice("observer", observer, tuple(OBSERVERS))
    if observer != "percentile":
        if percentile is not None:
            raise ValueError(f"observer_percentile={percentile!r} is not allowed with observer={observer!r}; "
                             "allowed: None, or a percentile with observer='percentile'")
        return observer, None
    if percentile is None:
        return observer, DEFAULT_PERCENTILE
    return observer, require_float("observer_percentile", percentile, 0, 100, low_open=True)
