"""The ASCO/CAP HER2 IHC rule over counted tumour cells, for one FOV or a whole case.

Reading of the rule (breast, ASCO/CAP 2018, reaffirmed 2023), with p(k) the share of tumour cells of class k:

- 3+ if p(3+) > 10% (circumferential, complete, intense staining);
- else 2+ if p(2+) + p(3+) > 10% (complete weak-to-moderate staining; an intense complete cell is also a
  complete one), or if 3+ cells are present in at most 10% (the guideline's unusual, heterogeneous pattern,
  reported 2+) — but only from ``min_3plus_percent_for_2plus`` on, so that a handful of misread cells
  cannot alone make a case equivocal;
- else 1+ if p(1+) + p(2+) + p(3+) > 10% (incomplete, faint staining);
- else 0, split by the 2025 international consensus into *ultralow* (some staining, in more than 0% and at
  most 10% of cells) and *null* (no membrane staining at all).

Cumulative shares are used because each higher class also meets the lower class's description.
Fewer tumour cells than ``min_tumour_cells`` give no score at all: "not assessable", never a guess.
"""

from __future__ import annotations

from collections.abc import Iterable

from config.scoring import CaseRule
from scoring.results import (
    CaseResult,
    ClassCounts,
    ControlCalibration,
    FovResult,
    Her2Score,
    Her2Status,
    Her2ZeroSubtype,
    ScoreCall,
)

NO_CONTROL_WARNING = "no positive control: the default intense threshold was used"


def call_score(counts: ClassCounts, rule: CaseRule) -> ScoreCall:
    """Apply the rule to ``counts``; see the module docstring."""
    total = counts.total
    if total < rule.min_tumour_cells:
        return ScoreCall(
            score=None,
            status=Her2Status.NOT_ASSESSABLE,
            her2_low=False,
            zero_subtype=None,
            reason=f"{total} tumour cells counted, fewer than the {rule.min_tumour_cells} needed to score",
        )
    n3 = counts.three_plus
    n2_or_more = counts.two_plus + n3
    n1_or_more = counts.one_plus + n2_or_more
    cut = rule.cutoff_percent

    def above(n: int, percent: float) -> bool:
        # exact: compare counts, not rounded shares (12 of 120 is exactly 10%, not above it)
        return 100 * n > percent * total

    p3, p2_or_more, p1_or_more = (100.0 * n / total for n in (n3, n2_or_more, n1_or_more))
    if above(n3, cut):
        return _call(Her2Score.THREE_PLUS, f"3+ cells {p3:.1f}% > {cut:g}%")
    if above(n2_or_more, cut):
        return _call(Her2Score.TWO_PLUS, f"complete membranes (2+ and 3+) {p2_or_more:.1f}% > {cut:g}%")
    if n3 > 0 and 100 * n3 >= rule.min_3plus_percent_for_2plus * total:
        return _call(
            Her2Score.TWO_PLUS,
            f"3+ cells present in {p3:.1f}% (≤ {cut:g}%): unusual heterogeneous pattern, reported 2+",
        )
    if above(n1_or_more, cut):
        return _call(Her2Score.ONE_PLUS, f"stained cells (1+ or more) {p1_or_more:.1f}% > {cut:g}%")
    if n1_or_more > 0:
        return _call(
            Her2Score.ZERO,
            f"faint/incomplete staining in {p1_or_more:.1f}% (> 0%, ≤ {cut:g}%): 0, ultralow",
            Her2ZeroSubtype.ULTRALOW,
        )
    return _call(Her2Score.ZERO, "no membrane staining: 0, null", Her2ZeroSubtype.NULL)


def _call(score: Her2Score, reason: str, zero_subtype: Her2ZeroSubtype | None = None) -> ScoreCall:
    status = {
        Her2Score.ZERO: Her2Status.NEGATIVE,
        Her2Score.ONE_PLUS: Her2Status.NEGATIVE,
        Her2Score.TWO_PLUS: Her2Status.EQUIVOCAL,
        Her2Score.THREE_PLUS: Her2Status.POSITIVE,
    }[score]
    her2_low = score in (Her2Score.ONE_PLUS, Her2Score.TWO_PLUS)
    return ScoreCall(score=score, status=status, her2_low=her2_low, zero_subtype=zero_subtype, reason=reason)


def score_case(fovs: Iterable[FovResult], rule: CaseRule, control: ControlCalibration | None = None) -> CaseResult:
    """The case score over the counts of all ``fovs`` (summed), with the control's QC and defaults noted."""
    fov_list = list(fovs)
    counts = sum((fov.counts for fov in fov_list), ClassCounts())
    call = call_score(counts, rule)
    warnings: list[str] = []
    if control is None:
        warnings.append(NO_CONTROL_WARNING)
    elif not control.qc_passed:
        warnings.extend(control.warnings)
    if call.score is None:
        warnings.append(call.reason)
    for fov in fov_list:
        for warning in fov.warnings:
            # one FOV with few cells (a small ROI, say) says nothing about the case: its cells still count
            if fov.call.score is None and warning == fov.call.reason:
                continue
            if warning not in warnings:
                warnings.append(warning)
    return CaseResult(
        counts=counts,
        percentages=counts.percentages(),
        call=call,
        n_fovs=len(fov_list),
        control=control,
        warnings=tuple(warnings),
    )
