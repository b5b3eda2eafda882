"""Mean ± sample standard deviation over seeds, and Welch's t-test between two cells."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats


@dataclass
class Cell:
    """The runs behind one table cell: finished accuracies, and how many runs failed or are unfinished."""

    values: list[float] = field(default_factory=list)
    failed: int = 0
    unfinished: int = 0
    params: dict[str, int] | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample std (ddof 1); exactly 0 when every seed gave the same value (accuracies are quantised)."""
        if self.n < 2:
            return math.nan
        return 0.0 if np.ptp(self.values) == 0 else float(np.std(self.values, ddof=1))


def format_p(p: float) -> str:
    """``p=0.123``, or ``p<0.001``."""
    return f"p={p:.3f}" if p >= 0.001 else "p<0.001"


@dataclass
class Comparison:
    diff: float
    p_value: float | None  # None: fewer than 2 seeds on a side, or no spread on either side (t undefined)

    def format(self, alpha: float = 0.05) -> str:
        if self.p_value is None:
            return f"{self.diff:+.2f} (p n/a)"
        mark = " *" if self.p_value < alpha else ""
        return f"{self.diff:+.2f} ({format_p(self.p_value)}){mark}"


def welch(a: Cell, b: Cell) -> Comparison | None:
    """``mean(a) − mean(b)`` and the two-sided p-value of Welch's t-test; None when a side has no value.

    The p-value needs 2 seeds on each side and some spread on at least one side: where every seed of
    both cells gave the same accuracy, Welch's t is 0/0 or ±∞ and no p-value is claimed.
    """
    if not a.n or not b.n:
        return None
    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2 or a.std == b.std == 0.0:
        return Comparison(diff, None)
    test = stats.ttest_ind_from_stats(a.mean, a.std, a.n, b.mean, b.std, b.n, equal_var=False)
    return Comparison(diff, float(test.pvalue))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of ``p_values`` for the family of the tests that have one (None stays None).

    With the m p-values sorted, ``p_(1) ≤ … ≤ p_(m)``, the i-th adjusted value is
    ``max_{j ≤ i} min(1, (m − j + 1)·p_(j))``: rejecting where it is below α keeps the probability of any false
    rejection in the family at most α, whatever the tests' dependence (Holm 1979).
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m, adjusted, running = len(tested), list(p_values), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
