"""Welch's t-test against the reference method, checked on known inputs; "n/a" wherever no p-value is warranted."""

from __future__ import annotations

import math
import statistics

import pytest

from alr.reporting.grid import Comparisons
from alr.reporting.stats import Cell, holm, welch
from alr.reporting.tables import significance

# As configs/experiment/table1.yaml's report key declares it: ALR and ALR-S against the baseline.
REPORT = Comparisons(reference="baseline", compared=("alr", "alr_s"))


def student_t_two_sided_p(t: float, df: float, intervals: int = 20_000) -> float:
    """``P(|T| > |t|)`` for Student's t with ``df`` (real) degrees of freedom: 1 − 2∫₀^|t| density, Simpson."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    h = abs(t) / intervals
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return 1.0 - 2.0 * h / 3 * (density(0.0) + inner + density(abs(t)))


def test_welch_p_value_in_closed_form():
    # Equal sizes and spreads: t = 1/sqrt(2/3), Welch–Satterthwaite df = 4, and for df = 4 the two-sided
    # p-value is 1 − x(3 − x²)/2 with x = t/sqrt(4 + t²) = sqrt(3/11): p = 1 − (15/11)·sqrt(3/11).
    result = welch(Cell([71.0, 72.0, 73.0]), Cell([70.0, 71.0, 72.0]))
    assert result.diff == pytest.approx(1.0)
    assert result.p_value == pytest.approx(1 - 15 / 11 * math.sqrt(3 / 11), rel=1e-12)
    assert result.p_value == pytest.approx(0.2878641347, abs=1e-10)
    assert result.format() == "+1.00 (p=0.288)"


def test_welch_with_unequal_sizes_and_spreads():
    a, b = [93.1, 93.5, 92.8, 93.9, 93.3], [92.0, 93.4, 92.2]
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch–Satterthwaite
    assert 2 < df < 3  # far from Student's pooled df = 6: the correction matters here
    expected = student_t_two_sided_p(t, df)
    result = welch(Cell(a), Cell(b))
    assert result.diff == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert result.format() == f"+0.79 (p={expected:.3f})"


def test_significant_difference_is_starred():
    result = welch(Cell([80.0, 80.5, 81.0, 80.2]), Cell([75.0, 75.4, 74.8, 75.1]))
    assert result.p_value < 0.001
    assert result.format() == "+5.35 (p<0.001) *"


@pytest.mark.parametrize(
    "alr,baseline",
    [([71.0], [70.0, 71.0]), ([71.0, 72.0], [70.0]), ([71.0], [70.0])],
    ids=["one ALR seed", "one baseline seed", "one each"],
)
def test_fewer_than_two_seeds_gives_no_p_value(alr, baseline):
    cells = {("d", "m", "alr"): Cell(alr), ("d", "m", "baseline"): Cell(baseline)}
    text = significance(cells, "d", "m", "alr", REPORT)
    assert text.endswith("(p n/a)") and "p=" not in text


def test_no_spread_on_either_side_gives_no_p_value():
    # Accuracies are quantised (one test image = 0.28 % on digits): three identical seeds on each side are
    # common, and Welch's t is then ±∞ or 0/0, not evidence.
    cells = {("d", "m", "alr"): Cell([99.72] * 3), ("d", "m", "baseline"): Cell([100.0] * 3)}
    assert significance(cells, "d", "m", "alr", REPORT) == "-0.28 (p n/a)"
    cells[("d", "m", "alr")] = Cell([99.72, 99.72, 99.44])  # spread on one side is enough
    assert "p=" in significance(cells, "d", "m", "alr", REPORT)


def test_failed_or_missing_cells_give_n_a_and_only_the_declared_methods_are_compared():
    finished = Cell([71.0, 72.0, 73.0])
    cells = {
        ("d", "m", "baseline"): Cell([70.0, 71.0]),
        ("d", "m", "alr"): Cell(failed=3),
        ("d", "m", "slr"): finished,
        ("d", "m2", "alr_s"): finished,
    }
    assert significance(cells, "d", "m", "alr", REPORT) == "n/a"  # every seed failed
    assert significance(cells, "d", "m", "alr_s", REPORT) == "n/a"  # not run
    assert significance(cells, "d", "m2", "alr_s", REPORT) == "n/a"  # no baseline
    cells[("d", "m2", "baseline")] = Cell(unfinished=2)
    assert significance(cells, "d", "m2", "alr_s", REPORT) == "n/a"  # baseline still running
    assert significance(cells, "d", "m", "slr", REPORT) == significance(cells, "d", "m", "baseline", REPORT) == ""
    everyone = Comparisons(reference="baseline")  # no `compared`: every method but the reference
    assert significance(cells, "d", "m", "slr", everyone) == "+1.50 (p=0.148)"
    assert (
        significance(cells, "d", "m", "baseline", everyone) == significance(cells, "d", "m", "slr", Comparisons()) == ""
    )


def test_holm_adjustment_by_hand_with_untested_entries_kept():
    """Sorted 0.005, 0.01, 0.03, 0.04 of m = 4: ×4, ×3, ×2, ×1, each at least the one before, at most 1."""
    adjusted = holm([0.01, None, 0.04, 0.03, 0.005])
    assert adjusted[1] is None
    assert adjusted[0] == pytest.approx(0.03) and adjusted[4] == pytest.approx(0.02)
    assert adjusted[2] == pytest.approx(0.06) and adjusted[3] == pytest.approx(0.06)  # 0.04 lifted to 0.06
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([]) == [] and holm([None]) == [None]
