"""The longest sequence length whose training step fits a memory budget, found in real runs.

``longest_within`` asks ``run(T)`` (one training step at length T in a fresh process, returning
the step's total memory, or ``math.inf`` when the run was stopped for crossing the budget) and
never extrapolates: its answer ``longest`` is a length that ran within the budget, and
``exceeded_at`` one that ran over it, at most ``resolution * longest`` (and at least 1) apart.

1. Known points (the sweep's own fresh-process runs of the same variant) count as runs.
2. If none of them fits: halve the shortest failing length until one fits (or T = 1 fails: the
   answer is 0, nothing fits).
3. ``guess``, the length where the sweep's straight-line fit reaches the budget, proposes a first
   bracket of the resolution's width just around it: two real runs, one a little below the guess
   and one a little above (at once, with ``parallel=True``: the second is then speculative).
   Memory grows linearly in T, so usually the first fits and the second does not, and the search
   is done in two runs; whatever they show is simply more evidence (nothing is concluded from the
   fit itself).
4. Power-of-two doubling from the longest length that fits until one does not (or ``max_length``
   is reached: the answer is then marked ``capped``, a lower bound).
5. Bisection of the bracket [fits, exceeds] until it is narrower than the resolution.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class SearchResult:
    longest: int  # longest length that ran within the budget (0: none did)
    exceeded_at: int | None  # shortest length that ran over it, above `longest`; None if capped
    capped: bool  # max_length ran within the budget: `longest` is a lower bound
    evidence: dict[int, float] = field(default_factory=dict)  # length -> total bytes (inf: over)
    new_runs: int = 0  # runs made by the search (not counting the known points)


def longest_within(run: Callable[[int], float], budget: float, *, known: dict[int, float],
                   resolution: float, max_length: int, guess: float | None = None,
                   on_run: Callable[[int, float], None] | None = None,
                   parallel: bool = False) -> SearchResult:
    if not 0 < resolution <= 1:
        raise ValueError(f"resolution must lie in (0, 1], got {resolution}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    evidence = {T: v for T, v in known.items() if T <= max_length}
    result = SearchResult(0, None, False, evidence)

    def fits(T: int) -> bool:
        if T not in evidence:
            evidence[T] = run(T)
            result.new_runs += 1
            if on_run is not None:
                on_run(T, evidence[T])
        return evidence[T] <= budget

    def fits_both(a: int, b: int) -> None:
        """Runs a and b at once (b speculatively: it is wanted only if a fits)."""
        with ThreadPoolExecutor(2) as pool:
            later = pool.submit(fits, b)
            fits(a)
            later.result()

    def bracket() -> tuple[int, int | None]:
        lo = max((T for T, v in evidence.items() if v <= budget), default=0)
        # Above lo only: a longer length that fits outweighs a shorter one that did not (noise).
        hi = min((T for T, v in evidence.items() if v > budget and T > lo), default=None)
        return lo, hi

    def close_enough(lo: int, hi: int) -> bool:
        return hi - lo <= max(1, int(resolution * lo))

    lo, hi = bracket()
    # 3 (first, when the fit gives a guess inside the open bracket): probe around the guess.
    if guess is not None and math.isfinite(guess) and guess > lo and (hi is None or guess < hi):
        below = min(max(lo + 1, int(guess * (1 - resolution / 2))), max_length)
        above = min(below + max(1, int(resolution * below)), max_length)
        if parallel and above > below and (hi is None or above < hi):
            fits_both(below, above)
        elif fits(below) and above > below and (hi is None or above < hi):
            fits(above)
        lo, hi = bracket()
    # 2. Nothing known fits: halve down.
    while lo == 0:
        T = (hi // 2) if hi is not None else 1
        if T < 1:
            break
        if fits(T):
            lo = T
        else:
            hi = T
    # 4. Doubling, from the longest that fits.
    while lo > 0 and hi is None:
        if lo >= max_length:
            result.capped = True
            break
        T = min(2 * lo, max_length)
        if fits(T):
            lo = T
        else:
            hi = T
    # 5. Bisection.
    while lo > 0 and hi is not None and not close_enough(lo, hi):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    result.longest, result.exceeded_at = lo, hi
    return result


def straight_line_guess(points: list[tuple[int, float]], budget: float) -> float | None:
    """Length where a least-squares line through (T, total bytes) reaches the budget; None with
    fewer than two distinct lengths or a slope <= 0. Used only to choose where a search starts."""
    points = [(T, v) for T, v in points if math.isfinite(v)]
    if len({T for T, _ in points}) < 2:
        return None
    n = len(points)
    mean_t = sum(T for T, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((T - mean_t) ** 2 for T, _ in points)
    slope = sum((T - mean_t) * (v - mean_v) for T, v in points) / var
    if slope <= 0:
        return None
    return (budget - (mean_v - slope * mean_t)) / slope
