"""Bit allocation: one candidate format per layer, minimising the summed sensitivity under a size budget.

Pure maths, no transformers. An *item* is a layer, or a group of layers that must share a format
(the group's sizes and costs are the sums of its members'). Every item offers options
``(stored bits, cost)``, one per candidate; :func:`allocate` picks one option per item so that the
total stored bits never exceed the budget and the total cost is as small as the greedy solution of
this multiple-choice knapsack finds. Two solvers run and the cheaper result is kept:

*Dynamic programming* over the budget in ``resolution`` units (sizes rounded *up* to whole units, so
its answer always fits the exact budget; exact when the budget has at most ``resolution`` bits, else
it leaves at most one unit per item unused, which step 4 below then spends).

*Greedy*:

1. per item, drop dominated options (no smaller and no cheaper than another) and keep the lower
   convex hull of the rest in the (bits, cost) plane: along it, each upgrade buys less cost
   reduction per bit than the one before;
2. start every item at its smallest option (if even that exceeds the budget, the budget is too low);
3. repeatedly take the affordable hull upgrade with the largest cost reduction per added bit (ties:
   the item at the lowest step first, then model order, so equal layers spread bits evenly);
4. finally, spend what is left on any affordable larger option (hull or not) that lowers the cost
   most per added bit, until none fits.

Sizes are the stored bits as :meth:`WeightFormat.stored_bits` counts them (codes with their padding
and every per-group parameter), so "fits the budget" is exact, not an estimate.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Option:
    """One candidate for one item: its stored size in bits and the sensitivity it costs."""

    bits: int
    cost: float


def allocate(options: Mapping[str, Sequence[Option]], budget_bits: int,
             groups: Sequence[Sequence[str]] = (), resolution: int = 1 << 14) -> dict[str, int]:
    """``{layer: index of its chosen option}`` with total bits ``<= budget_bits``.

    ``options[layer][i]`` is candidate ``i`` for that layer; every layer must offer the same number
    of candidates. Layers in one of ``groups`` get the same candidate. ``ValueError`` when even the
    smallest candidates exceed the budget.
    """
    counts = sorted({len(v) for v in options.values()})
    if len(counts) != 1:
        raise ValueError(f"every layer must offer the same candidates; got {counts} options per layer")
    items = _items(options, groups)
    summed = [[Option(sum(options[n][i].bits for n in members), sum(options[n][i].cost for n in members))
               for i in range(counts[0])] for members in items]
    hulls = [_hull(item) for item in summed]
    choice = [hull[0] for hull in hulls]  # index into the item's options
    step = [0] * len(items)  # position along the hull
    used = sum(summed[k][choice[k]].bits for k in range(len(items)))
    if used > budget_bits:
        raise ValueError(f"the budget of {budget_bits} stored bits is below the smallest candidates' "
                         f"{used} bits")
    heap: list[tuple[float, int, int]] = []

    def push(k: int) -> None:
        if step[k] + 1 < len(hulls[k]):
            here, there = summed[k][hulls[k][step[k]]], summed[k][hulls[k][step[k] + 1]]
            heapq.heappush(heap, ((there.cost - here.cost) / (there.bits - here.bits), step[k], k))

    for k in range(len(items)):
        push(k)
    while heap:
        _, _, k = heapq.heappop(heap)
        here, there = summed[k][hulls[k][step[k]]], summed[k][hulls[k][step[k] + 1]]
        if used + there.bits - here.bits > budget_bits:
            continue  # this item's later upgrades are larger still: it is done
        used += there.bits - here.bits
        step[k] += 1
        choice[k] = hulls[k][step[k]]
        push(k)
    _fill(summed, choice, used, budget_bits)
    planned = _dynamic_programme(summed, budget_bits, resolution)
    _fill(summed, planned, sum(item[i].bits for item, i in zip(summed, planned)), budget_bits)
    if sum(item[i].cost for item, i in zip(summed, planned)) < sum(item[i].cost for item, i in zip(summed, choice)):
        choice = planned
    return {name: choice[k] for k, members in enumerate(items) for name in members}


def _dynamic_programme(summed: list[list[Option]], budget_bits: int, resolution: int) -> list[int]:
    """The cheapest choice with sizes rounded up to units of ``ceil(budget / resolution)`` bits."""
    unit = max(1, math.ceil(budget_bits / resolution))
    capacity = budget_bits // unit
    best = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0  # best[c]: least cost of the items so far using exactly c units
    picks = []
    for item in summed:
        reach = torch.full((len(item), capacity + 1), math.inf, dtype=torch.float64)
        for i, option in enumerate(item):
            units = math.ceil(option.bits / unit)
            if units <= capacity:
                reach[i, units:] = best[:capacity + 1 - units] + option.cost
        best, pick = reach.min(dim=0)
        picks.append(pick)
    used = int(torch.argmin(best))
    choice = []
    for item, pick in zip(reversed(summed), reversed(picks)):
        i = int(pick[used])
        choice.append(i)
        used -= math.ceil(item[i].bits / unit)
    return choice[::-1]


def _items(options: Mapping[str, Sequence[Option]], groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Groups first where they start in model order, every other layer on its own."""
    grouped: dict[str, list[str]] = {}
    for group in groups:
        members = list(group)
        for name in members:
            if name not in options:
                raise ValueError(f"groups: layer {name!r} has no options")
            if name in grouped:
                raise ValueError(f"groups: layer {name!r} is in more than one group")
            grouped[name] = members
    items, seen = [], set()
    for name in options:
        members = grouped.get(name, [name])
        if members[0] not in seen:
            seen.update(members)
            items.append(members)
    return items


def _hull(item: Sequence[Option]) -> list[int]:
    """Indices of the undominated options on the lower convex hull, by increasing size (collinear kept)."""
    order = sorted(range(len(item)), key=lambda i: (item[i].bits, item[i].cost))
    frontier: list[int] = []
    for i in order:
        if frontier and item[i].cost >= item[frontier[-1]].cost:
            continue  # larger but not cheaper: dominated
        frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2 and _turns_down(item[hull[-2]], item[hull[-1]], item[i]):
            hull.pop()
        hull.append(i)
    return hull


def _turns_down(a: Option, b: Option, c: Option) -> bool:
    """Whether ``b`` lies strictly above the segment from ``a`` to ``c`` (so it is not on the lower hull)."""
    return (b.cost - a.cost) * (c.bits - a.bits) > (c.cost - a.cost) * (b.bits - a.bits)


def _fill(summed: list[list[Option]], choice: list[int], used: int, budget_bits: int) -> None:
    """Spend leftover bits (in place) on the affordable change with the best cost reduction per added bit."""
    while True:
        best: tuple[float, int, int] | None = None
        for k, item in enumerate(summed):
            here = item[choice[k]]
            for i, option in enumerate(item):
                extra = option.bits - here.bits
                if option.cost < here.cost and extra > 0 and used + extra <= budget_bits:
                    rate = (option.cost - here.cost) / extra
                    if best is None or rate < best[0]:
                        best = (rate, k, i)
        if best is None:
            return
        _, k, i = best
        used += summed[k][i].bits - summed[k][choice[k]].bits
        choice[k] = i


def budget_from_bits_per_weight(target_bits: float, num_weights: int) -> int:
    """The stored-bit budget for ``num_weights`` weights at an average of ``target_bits`` each (rounded down)."""
    return int(target_bits * num_weights)
