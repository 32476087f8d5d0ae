"""The bit allocator against brute force, budgets and symmetry."""

from __future__ import annotations

import itertools
import random

import pytest

from hfquant.allocation import Option, _hull, allocate


def _cost(options: dict[str, list[Option]], choice: dict[str, int]) -> float:
    return sum(options[n][i].cost for n, i in choice.items())


def _bits(options: dict[str, list[Option]], choice: dict[str, int]) -> int:
    return sum(options[n][i].bits for n, i in choice.items())


def _random_instance(rng: random.Random, layers: int, candidates: int) -> dict[str, list[Option]]:
    out = {}
    for k in range(layers):
        size = rng.randint(1, 5) * 64
        per_weight = sorted(rng.sample(range(2, 17), candidates))
        errors = sorted((rng.uniform(0.01, 10.0) for _ in range(candidates)), reverse=True)
        out[f"l{k}"] = [Option(size * b, e) for b, e in zip(per_weight, errors)]
    return out


def _brute_force(options: dict[str, list[Option]], budget: int) -> float:
    names = list(options)
    best = float("inf")
    for combo in itertools.product(*(range(len(options[n])) for n in names)):
        choice = dict(zip(names, combo))
        if _bits(options, choice) <= budget:
            best = min(best, _cost(options, choice))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_never_exceeds_the_budget_and_is_close_to_the_optimum(seed: int) -> None:
    rng = random.Random(seed)
    options = _random_instance(rng, layers=rng.randint(2, 6), candidates=rng.randint(2, 4))
    low = sum(min(o.bits for o in v) for v in options.values())
    high = sum(max(o.bits for o in v) for v in options.values())
    budget = rng.randint(low, high)
    choice = allocate(options, budget)
    assert _bits(options, choice) <= budget
    optimum = _brute_force(options, budget)
    # greedy on convex hulls: at most one item's largest cost step from the optimum
    slack = max(max(o.cost for o in v) - min(o.cost for o in v) for v in options.values())
    assert _cost(options, choice) <= optimum + slack + 1e-9


@pytest.mark.parametrize("resolution, optimal", [(1 << 20, 100), (64, 80)])
def test_optimal_when_the_budget_fits_the_resolution(resolution: int, optimal: int) -> None:
    """Exact when every budget here (< 2**15 bits) fits the resolution; coarse units still mostly optimal."""
    rng = random.Random(1234)
    hits = 0
    for _ in range(100):
        options = _random_instance(rng, layers=5, candidates=3)
        low = sum(min(o.bits for o in v) for v in options.values())
        high = sum(max(o.bits for o in v) for v in options.values())
        budget = rng.randint(low, high)
        choice = allocate(options, budget, resolution=resolution)
        assert _bits(options, choice) <= budget
        hits += abs(_cost(options, choice) - _brute_force(options, budget)) < 1e-9
    assert hits >= optimal, hits


def test_identical_layers_get_bits_spread_evenly() -> None:
    ladder = [Option(2 * 1000, 9.0), Option(3 * 1000, 4.0), Option(4 * 1000, 2.0), Option(8 * 1000, 0.1)]
    options = {f"l{k}": list(ladder) for k in range(10)}
    for per_weight in (2, 2.5, 3, 3.4, 4, 6):
        choice = allocate(options, int(per_weight * 1000 * 10))
        steps = sorted(choice.values())
        assert steps[-1] - steps[0] <= 1, (per_weight, steps)
    assert set(allocate(options, 3 * 1000 * 10).values()) == {1}  # exactly on a candidate: all get it


def test_budget_below_the_smallest_candidates() -> None:
    options = {"a": [Option(10, 1.0), Option(20, 0.5)], "b": [Option(10, 1.0), Option(20, 0.5)]}
    with pytest.raises(ValueError, match="below the smallest candidates' 20 bits"):
        allocate(options, 19)
    assert allocate(options, 20) == {"a": 0, "b": 0}
    assert allocate(options, 10**6) == {"a": 1, "b": 1}


def test_groups_share_a_candidate() -> None:
    options = {"q": [Option(10, 5.0), Option(20, 0.0)], "k": [Option(10, 0.1), Option(20, 0.0)],
               "o": [Option(10, 1.0), Option(20, 0.0)]}
    alone = allocate(options, 40)
    assert alone == {"q": 1, "k": 0, "o": 0}
    grouped = allocate(options, 50, groups=[["q", "k"]])
    assert grouped["q"] == grouped["k"] == 1 and grouped["o"] == 0
    with pytest.raises(ValueError, match="more than one group"):
        allocate(options, 50, groups=[["q", "k"], ["k", "o"]])


def test_hull_drops_dominated_and_concave_options() -> None:
    item = [Option(10, 5.0), Option(20, 6.0), Option(30, 4.9), Option(40, 1.0), Option(50, 0.5)]
    # 20 is dominated (larger, costlier than 10); 30 lies above the segment 10 -> 40
    assert _hull(item) == [0, 3, 4]
    collinear = [Option(10, 3.0), Option(20, 2.0), Option(30, 1.0)]
    assert _hull(collinear) == [0, 1, 2]
