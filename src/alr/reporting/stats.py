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
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else math.nan


@dataclass
class Comparison:
    diff: float
    p_value: float | None  # None when either side has fewer than 2 seeds

    def format(self, alpha: float = 0.05) -> str:
        if self.p_value is None:
            return f"{self.diff:+.2f} (n/a)"
        mark = " *" if self.p_value < alpha else ""
        return f"{self.diff:+.2f} (p={self.p_value:.3f}){mark}"


def welch(a: Cell, b: Cell) -> Comparison | None:
    """``mean(a) − mean(b)`` and Welch's two-sided t-test p-value (needs 2 seeds on each side)."""
    if not a.n or not b.n:
        return None
    if a.n < 2 or b.n < 2:
        return Comparison(a.mean - b.mean, None)
    if np.var(a.values) == 0 and np.var(b.values) == 0:
        p = 1.0 if a.mean == b.mean else 0.0
    else:
        p = float(stats.ttest_ind(a.values, b.values, equal_var=False).pvalue)
    return Comparison(a.mean - b.mean, p)
