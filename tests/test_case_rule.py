"""The ASCO/CAP HER2 IHC rule of scoring/case.py: boundaries, invariants and the case summary."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from her2scope.config.scoring import CaseRule
from her2scope.scoring.case import NO_CONTROL_WARNING, call_score, score_case
from her2scope.scoring.results import (
    ClassCounts,
    ControlCalibration,
    FovResult,
    Her2Score,
    Her2Status,
    Her2ZeroSubtype,
    ScoreCall,
    ThresholdSource,
)

# Only the rule is under test here; the tumour-cell minimum is switched off unless a test is about it.
RULE = CaseRule(min_tumour_cells=1)


def counts(zero: int = 0, one: int = 0, two: int = 0, three: int = 0) -> ClassCounts:
    return ClassCounts(zero=zero, one_plus=one, two_plus=two, three_plus=three)


def reference_score(c: ClassCounts, rule: CaseRule) -> tuple[str | None, str | None]:
    """The module docstring's rule restated in exact rational arithmetic: (score, zero subtype)."""
    n = c.total
    if n < rule.min_tumour_cells:
        return None, None
    # The thresholds as the decimals a user writes (0.1 means 1/10, not the nearest binary float).
    cut = Fraction(repr(rule.cutoff_percent))
    min3 = Fraction(repr(rule.min_3plus_percent_for_2plus))

    def share(k: int) -> Fraction:
        return Fraction(100 * k, n)

    if share(c.three_plus) > cut:
        return "3+", None
    if share(c.two_plus + c.three_plus) > cut:
        return "2+", None
    if c.three_plus > 0 and share(c.three_plus) >= min3:
        return "2+", None
    if share(c.one_plus + c.two_plus + c.three_plus) > cut:
        return "1+", None
    if c.one_plus + c.two_plus + c.three_plus > 0:
        return "0", "ultralow"
    return "0", "null"


# A total order of outcomes: not assessable < 0 null < 0 ultralow < 1+ < 2+ < 3+.
_RANK = {
    (None, None): 0,
    ("0", "null"): 1,
    ("0", "ultralow"): 2,
    ("1+", None): 3,
    ("2+", None): 4,
    ("3+", None): 5,
}


def outcome(call: ScoreCall) -> tuple[str | None, str | None]:
    return (
        call.score.value if call.score is not None else None,
        call.zero_subtype.value if call.zero_subtype is not None else None,
    )


# ----------------------------------------------------------------------------------------------------
# Boundaries of each branch
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("c", "expected"),
    [
        # 3+ needs strictly more than 10%: exactly 10% is not 3+ (but 2+ by the unusual-pattern branch).
        (counts(zero=900, three=100), "2+"),  # 3+ exactly 10.0%: unusual pattern → 2+, not 3+
        (counts(zero=899, three=101), "3+"),  # 10.1%
        (counts(zero=90, three=10), "2+"),
        (counts(zero=89, three=11), "3+"),  # 11/100
        (counts(zero=0, three=1000), "3+"),
    ],
)
def test_three_plus_needs_more_than_cutoff(c: ClassCounts, expected: str) -> None:
    assert call_score(c, RULE).score == Her2Score(expected)


@pytest.mark.parametrize(
    ("c", "expected"),
    [
        # Complete membranes (2+ and 3+ together), no 3+ cells: exactly 10% is not 2+, 10.1% is.
        (counts(zero=900, two=100), "0"),  # complete 10% is not > 10%; stained 10% is not either → 0
        (counts(zero=899, two=101), "2+"),
        # 2+ and 3+ together above 10% with 3+ alone below the 2+-by-presence minimum.
        (counts(zero=899, two=96, three=5), "2+"),  # 3+ 0.5%, complete 10.1%
        (counts(zero=900, two=95, three=5), "0"),  # complete exactly 10%, 3+ 0.5% < 1%, stained 10% → 0
        # 3+ cells count as complete: 3+ 9% + 2+ 2% = 11% → 2+ (also 2+ by presence).
        (counts(zero=89, two=2, three=9), "2+"),
    ],
)
def test_two_plus_by_complete_membranes(c: ClassCounts, expected: str) -> None:
    assert call_score(c, RULE).score == Her2Score(expected)


def test_exactly_ten_percent_two_plus_alone_is_not_two_plus() -> None:
    call = call_score(counts(zero=900, two=100), RULE)
    # 10% 2+ and nothing else: not 2+, and not 1+ either (stained 10% is not > 10%): 0, ultralow.
    assert call.score == Her2Score.ZERO
    assert call.zero_subtype == Her2ZeroSubtype.ULTRALOW


@pytest.mark.parametrize(
    ("c", "min3", "expected"),
    [
        # Unusual pattern: 3+ present in ≤ 10% and ≥ min_3plus_percent_for_2plus → 2+.
        (counts(zero=990, three=10), 1.0, "2+"),  # exactly 1.0% reaches the minimum
        (counts(zero=991, three=9), 1.0, "0"),  # 0.9%: below it; stained 0.9% → 0 (ultralow)
        (counts(zero=900, one=91, three=9), 1.0, "0"),  # 3+ 0.9% ignored, stained exactly 10% → not 1+
        (counts(zero=899, one=92, three=9), 1.0, "1+"),  # 3+ 0.9% ignored, stained 10.1% → 1+
        (counts(zero=999, three=1), 0.1, "2+"),  # a lower minimum: 0.1% 3+ → 2+
        (counts(zero=999, three=1), 0.0, "2+"),  # minimum 0: any 3+ cell makes 2+
        (counts(zero=909, three=91), 10.0, "0"),  # 9.1% < a 10% minimum → not 2+; stained 9.1% → 0
        (counts(zero=900, three=100), 10.0, "2+"),  # 10% ≥ 10% minimum → 2+
        (counts(zero=80, three=20), 100.0, "3+"),  # 3+ > 10% wins before the unusual branch
    ],
)
def test_unusual_pattern_two_plus(c: ClassCounts, min3: float, expected: str) -> None:
    rule = CaseRule(min_tumour_cells=1, min_3plus_percent_for_2plus=min3)
    assert reference_score(c, rule)[0] == expected, "test case disagrees with the restated rule"
    call = call_score(c, rule)
    assert call.score == Her2Score(expected)


@pytest.mark.parametrize(("three", "is_unusual"), [(10, True), (9, False)])
def test_unusual_pattern_reason_and_minimum(three: int, is_unusual: bool) -> None:
    call = call_score(counts(zero=1000 - three, three=three), RULE)
    assert (call.score == Her2Score.TWO_PLUS) is is_unusual
    assert ("unusual" in call.reason) is is_unusual


def test_below_min_3plus_share_falls_through_to_1plus_not_2plus() -> None:
    # 3+ 0.5% (< 1%) and 1+ 20%: the unusual-pattern branch does not apply; 1+ by cumulative share.
    call = call_score(counts(zero=795, one=200, three=5), RULE)
    assert call.score == Her2Score.ONE_PLUS


@pytest.mark.parametrize(
    ("c", "expected"),
    [
        (counts(zero=900, one=100), "0"),  # stained exactly 10% → not 1+
        (counts(zero=899, one=101), "1+"),  # 10.1%
        # Cumulative: 1+ 5% + 2+ 5.1% = 10.1% stained (complete 5.1% alone is not 2+) → 1+.
        (counts(zero=899, one=50, two=51), "1+"),
        (counts(zero=899, one=100, two=1), "1+"),
        # 3+ 0.5% (below the 2+ minimum) still counts towards the stained share.
        (counts(zero=899, one=96, three=5), "1+"),
    ],
)
def test_one_plus_cumulative(c: ClassCounts, expected: str) -> None:
    assert call_score(c, RULE).score == Her2Score(expected)


@pytest.mark.parametrize(
    ("c", "subtype"),
    [
        (counts(zero=1000), Her2ZeroSubtype.NULL),
        (counts(zero=999, one=1), Her2ZeroSubtype.ULTRALOW),
        (counts(zero=900, one=100), Her2ZeroSubtype.ULTRALOW),  # exactly 10% stained is still ultralow
        (counts(zero=999, two=1), Her2ZeroSubtype.ULTRALOW),
        (counts(zero=999, three=1), Her2ZeroSubtype.ULTRALOW),  # 0.1% 3+, below the 2+ minimum
    ],
)
def test_zero_ultralow_versus_null(c: ClassCounts, subtype: Her2ZeroSubtype) -> None:
    call = call_score(c, RULE)
    assert call.score == Her2Score.ZERO
    assert call.zero_subtype == subtype
    assert call.status == Her2Status.NEGATIVE
    assert call.her2_low is False


@pytest.mark.parametrize(
    ("c", "score", "status", "her2_low"),
    [
        (counts(zero=100), Her2Score.ZERO, Her2Status.NEGATIVE, False),
        (counts(zero=80, one=20), Her2Score.ONE_PLUS, Her2Status.NEGATIVE, True),
        (counts(zero=80, two=20), Her2Score.TWO_PLUS, Her2Status.EQUIVOCAL, True),
        (counts(zero=80, three=20), Her2Score.THREE_PLUS, Her2Status.POSITIVE, False),
    ],
)
def test_status_and_her2_low_per_score(c: ClassCounts, score: Her2Score, status: Her2Status, her2_low: bool) -> None:
    call = call_score(c, RULE)
    assert call.score == score
    assert call.status == status
    assert call.her2_low is her2_low
    if score != Her2Score.ZERO:
        assert call.zero_subtype is None


@pytest.mark.parametrize(("total", "assessable"), [(0, False), (1, False), (99, False), (100, True), (101, True)])
def test_min_tumour_cells(total: int, assessable: bool) -> None:
    rule = CaseRule(min_tumour_cells=100)
    # All 3+: a case that would be 3+ if it were assessable.
    call = call_score(counts(three=total), rule)
    if assessable:
        assert call.score == Her2Score.THREE_PLUS
        assert call.status == Her2Status.POSITIVE
    else:
        assert call.score is None
        assert call.status == Her2Status.NOT_ASSESSABLE
        assert call.her2_low is False
        assert call.zero_subtype is None
        assert f"{total} tumour cells" in call.reason
        assert "100" in call.reason


def test_default_rule_values() -> None:
    rule = CaseRule()
    assert (rule.cutoff_percent, rule.min_3plus_percent_for_2plus, rule.min_tumour_cells) == (10.0, 1.0, 100)


def test_call_does_not_depend_on_scale() -> None:
    # Percentages, not counts, decide: the same shares at 10x the cells give the same call.
    for c in (counts(zero=89, three=11), counts(zero=85, one=5, two=10), counts(zero=95, one=5)):
        scaled = counts(c.zero * 10, c.one_plus * 10, c.two_plus * 10, c.three_plus * 10)
        assert outcome(call_score(c, RULE)) == outcome(call_score(scaled, RULE))


# ----------------------------------------------------------------------------------------------------
# Exact-boundary arithmetic
# ----------------------------------------------------------------------------------------------------


# Regression: shares summed as rounded floats once made 12/120 (exactly 10%) compare as > 10%.
@pytest.mark.parametrize(
    "c",
    [
        counts(zero=108, one=1, two=10, three=1),  # 12/120 stained = 10% exactly
        counts(zero=117, one=1, two=11, three=1),  # 13/130
        counts(zero=216, one=2, two=20, three=2),  # 24/240
    ],
)
def test_cumulative_share_of_exactly_cutoff_is_not_above_it(c: ClassCounts) -> None:
    assert reference_score(c, RULE) == ("0", "ultralow")
    call = call_score(c, RULE)
    assert call.score == Her2Score.ZERO
    assert call.her2_low is False


# ----------------------------------------------------------------------------------------------------
# Invariants over random cases
# ----------------------------------------------------------------------------------------------------


def _random_cases(n_cases: int) -> list[tuple[ClassCounts, CaseRule]]:
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(n_cases):
        total = int(rng.integers(0, 2000))
        # Mostly-zero cases with a few stained cells exercise the boundaries more than uniform shares do.
        shares = rng.dirichlet(rng.uniform(0.05, 3.0, size=4))
        c0, c1, c2, c3 = (int(v) for v in rng.multinomial(total, shares))
        rule = CaseRule(
            cutoff_percent=float(rng.choice([5.0, 10.0, 10.0, 20.0])),
            min_3plus_percent_for_2plus=float(rng.choice([0.0, 0.5, 1.0, 1.0, 5.0])),
            min_tumour_cells=int(rng.choice([1, 50, 100, 100])),
        )
        cases.append((counts(c0, c1, c2, c3), rule))
    return cases


RANDOM_CASES = _random_cases(3000)


def test_random_cases_match_restated_rule() -> None:
    mismatches = []
    for c, rule in RANDOM_CASES:
        call = call_score(c, rule)
        if outcome(call) != reference_score(c, rule):
            mismatches.append((c.model_dump(by_alias=True), rule.model_dump(), outcome(call)))
    assert mismatches == []


def test_random_cases_consistent_fields() -> None:
    status_of = {
        None: Her2Status.NOT_ASSESSABLE,
        Her2Score.ZERO: Her2Status.NEGATIVE,
        Her2Score.ONE_PLUS: Her2Status.NEGATIVE,
        Her2Score.TWO_PLUS: Her2Status.EQUIVOCAL,
        Her2Score.THREE_PLUS: Her2Status.POSITIVE,
    }
    for c, rule in RANDOM_CASES:
        call = call_score(c, rule)
        assert call.status == status_of[call.score]
        assert call.her2_low is (call.score in (Her2Score.ONE_PLUS, Her2Score.TWO_PLUS))
        assert (call.zero_subtype is not None) is (call.score == Her2Score.ZERO)
        assert call.reason


@pytest.mark.parametrize("added", [1, 5, 50])
@pytest.mark.e2e
def test_adding_3plus_cells_never_lowers_the_score(added: int) -> None:
    lowered = []
    for c, rule in RANDOM_CASES:
        before = outcome(call_score(c, rule))
        more = counts(c.zero, c.one_plus, c.two_plus, c.three_plus + added)
        after = outcome(call_score(more, rule))
        if _RANK[after] < _RANK[before]:
            lowered.append((c.model_dump(by_alias=True), rule.model_dump(), before, after))
    assert lowered == []


def test_random_cases_cover_every_outcome() -> None:
    # Guards the generator: the invariants above are only worth something if every branch is reached.
    seen = {outcome(call_score(c, rule)) for c, rule in RANDOM_CASES}
    assert seen == set(_RANK)


# ----------------------------------------------------------------------------------------------------
# score_case
# ----------------------------------------------------------------------------------------------------


def fov(c: ClassCounts, warnings: tuple[str, ...] = ()) -> FovResult:
    return FovResult(
        counts=c,
        percentages=c.percentages(),
        call=call_score(c, RULE),
        cells=(),
        n_excluded_nuclei=0,
        weak_threshold_od=0.1,
        intense_threshold_od=0.45,
        intense_threshold_source=ThresholdSource.DEFAULT,
        pixel_size_um=0.25,
        analysis_pixel_size_um=0.5,
        tumour_area_mm2=0.1,
        stain_vectors=((0.65, 0.704, 0.286), (0.268, 0.57, 0.776)),
        warnings=warnings,
    )


def control(qc_passed: bool, warnings: tuple[str, ...] = ()) -> ControlCalibration:
    return ControlCalibration(
        intense_threshold_od=0.37,
        source=ThresholdSource.CONTROL,
        membrane_ridge_od=0.62,
        percentile_range=(50.0, 95.0),
        n_membrane_pixels=1000,
        control_counts=counts(zero=10, two=100, three=40),
        control_score=Her2Score.THREE_PLUS if qc_passed else Her2Score.TWO_PLUS,
        qc_passed=qc_passed,
        warnings=warnings,
    )


def test_score_case_sums_counts_over_fovs() -> None:
    # Alone the FOVs are 2+, 3+ and 0; the summed counts decide, not a vote or the worst FOV.
    fovs = [fov(counts(zero=95, three=5)), fov(counts(zero=80, three=20)), fov(counts(zero=100))]
    case = score_case(fovs, CaseRule(), control(qc_passed=True))
    assert case.counts == counts(zero=275, three=25)
    assert case.n_fovs == 3
    assert case.percentages["3+"] == pytest.approx(100 * 25 / 300)
    assert case.percentages["0"] == pytest.approx(100 * 275 / 300)
    assert case.call.score == Her2Score.TWO_PLUS  # 8.3% 3+: unusual pattern, not 3+ (one FOV alone is 3+)
    assert case.call == call_score(case.counts, CaseRule())
    assert case.warnings == ()


def test_score_case_makes_assessable_from_small_fovs() -> None:
    # 60 + 60 cells: neither FOV alone reaches 100 cells, the case does.
    fovs = [fov(counts(zero=60)), fov(counts(zero=50, one=10))]
    case = score_case(fovs, CaseRule(), control(qc_passed=True))
    assert case.counts.total == 120
    assert case.call.score == Her2Score.ZERO
    assert case.call.zero_subtype == Her2ZeroSubtype.ULTRALOW


def test_score_case_accepts_an_iterator() -> None:
    case = score_case((fov(counts(zero=100)) for _ in range(4)), CaseRule(), None)
    assert case.n_fovs == 4
    assert case.counts.total == 400


def test_score_case_warns_without_control() -> None:
    case = score_case([fov(counts(zero=200))], CaseRule(), control=None)
    assert case.control is None
    assert case.warnings == (NO_CONTROL_WARNING,)


def test_score_case_carries_failed_control_qc_warnings() -> None:
    qc_warnings = ("control scored 2+, not 3+", "control membranes faint")
    cal = control(qc_passed=False, warnings=qc_warnings)
    case = score_case([fov(counts(zero=200))], CaseRule(), cal)
    assert case.control == cal
    assert case.warnings == qc_warnings
    assert NO_CONTROL_WARNING not in case.warnings


def test_score_case_passed_control_adds_no_warning() -> None:
    case = score_case([fov(counts(zero=200))], CaseRule(), control(qc_passed=True))
    assert case.warnings == ()


def test_score_case_merges_fov_warnings_once() -> None:
    fovs = [fov(counts(zero=100), ("out of focus",)), fov(counts(zero=100), ("out of focus", "bubble"))]
    case = score_case(fovs, CaseRule(), None)
    assert case.warnings == (NO_CONTROL_WARNING, "out of focus", "bubble")


def test_score_case_not_assessable_gives_reason_as_warning() -> None:
    case = score_case([fov(counts(three=40)), fov(counts(three=59))], CaseRule(), control(qc_passed=True))
    assert case.counts.total == 99
    assert case.call.score is None
    assert case.call.status == Her2Status.NOT_ASSESSABLE
    assert case.warnings == (case.call.reason,)
    assert "99 tumour cells" in case.call.reason


def test_score_case_with_no_fovs_is_not_assessable() -> None:
    case = score_case([], CaseRule(), None)
    assert case.n_fovs == 0
    assert case.counts == ClassCounts()
    assert case.percentages == {"0": 0.0, "1+": 0.0, "2+": 0.0, "3+": 0.0}
    assert case.call.score is None
    assert case.call.status == Her2Status.NOT_ASSESSABLE
    assert case.warnings[0] == NO_CONTROL_WARNING
    assert "0 tumour cells" in case.warnings[1]


def test_a_fov_with_too_few_cells_does_not_warn_about_the_whole_case() -> None:
    # One FOV restricted to a small ROI has few cells; the case, with all its FOVs, has plenty.
    few = ClassCounts(zero=RULE.min_tumour_cells // 2)
    small = fov(few, warnings=(call_score(few, RULE).reason,))  # as analyse_fov words it
    assert small.call.score is None
    large = fov(ClassCounts(zero=RULE.min_tumour_cells * 3, one_plus=RULE.min_tumour_cells))
    case = score_case([small, large], RULE, control=None)
    assert case.call.score is not None
    assert not any("fewer than" in warning for warning in case.warnings)
