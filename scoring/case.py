"""The HER2 IHC rule of the case's guideline over counted tumour cells, for one FOV or a whole case.

Which rule applies is the case's choice (``CaseRule.guideline`` and ``CaseRule.specimen``); every
:class:`ScoreCall` names it (``guideline``, ``specimen``) and its ``reason`` says which branch decided.

**Breast** (the default; ASCO/CAP 2018, reaffirmed 2023), with p(k) the share of tumour cells of class k:

- 3+ if p(3+) > 10% (circumferential, complete, intense staining);
- else 2+ if p(2+) + p(3+) > 10% (complete weak-to-moderate staining; an intense complete cell is also a
  complete one), or if 3+ cells are present in at most 10% (the guideline's unusual, heterogeneous pattern,
  reported 2+) — but only from ``min_3plus_percent_for_2plus`` on, so that a handful of misread cells
  cannot alone make a case equivocal;
- else 1+ if p(1+) + p(2+) + p(3+) > 10% (incomplete, faint staining);
- else 0, split by the 2025 international consensus into *ultralow* (some staining, in more than 0% and at
  most 10% of cells) and *null* (no membrane staining at all).

**Gastric** (CAP/ASCP/ASCO 2016 guideline for gastroesophageal adenocarcinoma, Bartley et al., Arch Pathol Lab
Med 2016;140:1345, which keeps the Hofmann/Rüschoff criteria of the trastuzumab trials). Its scoring table words
the surgical (resection) specimen's classes with "≥ 10% of tumor cells" — "Strong complete, basolateral or
lateral membranous reactivity in ≥ 10% of tumor cells" is 3+, "Weak to moderate complete, basolateral or lateral
membranous reactivity in ≥ 10% of tumor cells" 2+, "Faint/barely perceptible membranous reactivity in ≥ 10% of
tumor cells" 1+ — and 0 as "No reactivity or membranous reactivity in < 10% of tumor cells": so exactly 10% is
*in*, unlike the breast rule's "> 10%" (some secondary tables print "> 10%"; the guideline's ≥ and < leave no
gap). A biopsy is scored by a "Tumor cell cluster (≥ 5 cells)" with that reactivity "irrespective of percentage
of tumor cells stained"; 0 is "no membranous reactivity in any (or < 5 clustered) tumor cells".

- Resection: 3+ if p(3+) ≥ 10%; else 2+ if p(2+) + p(3+) ≥ 10%; else 1+ if p(1+) + p(2+) + p(3+) ≥ 10%;
  else 0. The gastric guideline scores lateral and basolateral (U-shaped) membranes like complete ones;
  recognising them is the per-cell classification's task: this module only counts the classes it is given. No
  unusual-pattern 2+ (the gastric guideline has none) and no null/ultralow split (a breast consensus); HER2-low
  is a breast category and stays false.
- Biopsy: the highest class k for which a cohesive cluster of at least ``cluster_min_cells`` cells, each of
  class k or higher, exists (3+, then 2+, then 1+), whatever their share and however few the case's cells;
  else 0 — but only with ``min_tumour_cells`` counted, else "not assessable". Clusters come from
  :func:`cluster_sizes`: cells whose centres lie within ``cohesion_distance_um`` of each other touch.

Cumulative shares are used because each higher class also meets the lower class's description.
Fewer tumour cells than ``min_tumour_cells`` give no score at all: "not assessable", never a guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from her2scope.config.scoring import CaseRule, Guideline, Specimen
from her2scope.scoring.results import (
    HER2_SCORES,
    CaseResult,
    Cell,
    ClassCounts,
    ControlCalibration,
    FovResult,
    Her2Score,
    Her2Status,
    Her2ZeroSubtype,
    ScoreCall,
)

NO_CONTROL_WARNING = "no positive control: the default intense threshold was used"

#: The publication each guideline's rule follows, as the panel, the report and the table cite it.
GUIDELINE_SOURCES: dict[Guideline, str] = {
    Guideline.BREAST: "ASCO/CAP 2018/2023",
    Guideline.GASTRIC: "CAP/ASCP/ASCO 2016",
}


def call_score(counts: ClassCounts, rule: CaseRule, clusters: ClassCounts | None = None) -> ScoreCall:
    """Apply the case's guideline to ``counts``; see the module docstring.

    Parameters
    ----------
    counts : tumour cells per class.
    rule : the case's rule; ``rule.guideline`` and ``rule.specimen`` choose the branch below.
    clusters : per class k, the largest cohesive cluster of cells of class k or higher (:func:`cluster_sizes`,
        the largest over the FOVs for a case). Needed for a gastric biopsy only; ignored otherwise.

    Raises
    ------
    ValueError : a gastric biopsy without ``clusters``.
    """
    if rule.guideline == Guideline.GASTRIC:
        if rule.specimen == Specimen.BIOPSY:
            if clusters is None:
                raise ValueError(
                    "a gastric biopsy is scored by its cohesive clusters: pass clusters=cluster_sizes(...) "
                    "(for a case, the largest per class over its FOVs)"
                )
            return _gastric_biopsy(counts, rule, clusters)
        return _gastric_resection(counts, rule)
    total = counts.total
    if total < rule.min_tumour_cells:
        return _not_assessable(total, rule)
    n3, n2_or_more, n1_or_more = (
        counts.at_least(s) for s in (Her2Score.THREE_PLUS, Her2Score.TWO_PLUS, Her2Score.ONE_PLUS)
    )
    cut = rule.cutoff_percent

    def above(n: int, percent: float) -> bool:
        # exact: compare counts, not rounded shares (12 of 120 is exactly 10%, not above it)
        return 100 * n > percent * total

    p3, p2_or_more, p1_or_more = (100.0 * n / total for n in (n3, n2_or_more, n1_or_more))
    if above(n3, cut):
        return _call(Her2Score.THREE_PLUS, f"3+ cells {p3:.1f}% > {cut:g}%", rule=rule)
    if above(n2_or_more, cut):
        return _call(Her2Score.TWO_PLUS, f"complete membranes (2+ and 3+) {p2_or_more:.1f}% > {cut:g}%", rule=rule)
    if n3 > 0 and 100 * n3 >= rule.min_3plus_percent_for_2plus * total:
        return _call(
            Her2Score.TWO_PLUS,
            f"3+ cells present in {p3:.1f}% (≤ {cut:g}%): unusual heterogeneous pattern, reported 2+",
            rule=rule,
        )
    if above(n1_or_more, cut):
        return _call(Her2Score.ONE_PLUS, f"stained cells (1+ or more) {p1_or_more:.1f}% > {cut:g}%", rule=rule)
    if n1_or_more > 0:
        return _call(
            Her2Score.ZERO,
            f"faint/incomplete staining in {p1_or_more:.1f}% (> 0%, ≤ {cut:g}%): 0, ultralow",
            Her2ZeroSubtype.ULTRALOW,
            rule=rule,
        )
    return _call(Her2Score.ZERO, "no membrane staining: 0, null", Her2ZeroSubtype.NULL, rule=rule)


def _rule_name(rule: CaseRule) -> str:
    """How a reason names a gastric rule: "gastric (resection)" or "gastric (biopsy)"."""
    return f"{rule.guideline.value} ({rule.specimen.value})"


def _not_assessable(total: int, rule: CaseRule) -> ScoreCall:
    reason = f"{total} tumour cells counted, fewer than the {rule.min_tumour_cells} needed to score"
    if rule.guideline != Guideline.BREAST:
        reason = f"{_rule_name(rule)}: {reason}"
    return ScoreCall(
        score=None,
        status=Her2Status.NOT_ASSESSABLE,
        her2_low=False,
        zero_subtype=None,
        reason=reason,
        guideline=rule.guideline,
        specimen=rule.specimen,
    )


def _gastric_resection(counts: ClassCounts, rule: CaseRule) -> ScoreCall:
    total = counts.total
    if total < rule.min_tumour_cells:
        return _not_assessable(total, rule)
    n3, n2_or_more, n1_or_more = (
        counts.at_least(s) for s in (Her2Score.THREE_PLUS, Her2Score.TWO_PLUS, Her2Score.ONE_PLUS)
    )
    cut = rule.cutoff_percent
    name = _rule_name(rule)

    def share(n: int) -> str:
        return f"{100.0 * n / total:.1f}%"

    # exact: compare counts, not rounded shares (12 of 120 is exactly 10%, and "≥ 10%" takes it)
    if 100 * n3 >= cut * total:
        return _call(
            Her2Score.THREE_PLUS, f"{name}: strong complete/basolateral/lateral 3+ {share(n3)} ≥ {cut:g}%", rule=rule
        )
    if 100 * n2_or_more >= cut * total:
        return _call(
            Her2Score.TWO_PLUS,
            f"{name}: complete/basolateral/lateral 2+ and 3+ {share(n2_or_more)} ≥ {cut:g}%",
            rule=rule,
        )
    if 100 * n1_or_more >= cut * total:
        return _call(
            Her2Score.ONE_PLUS, f"{name}: stained cells (1+ or more) {share(n1_or_more)} ≥ {cut:g}%", rule=rule
        )
    return _call(Her2Score.ZERO, f"{name}: stained cells (1+ or more) {share(n1_or_more)} < {cut:g}%", rule=rule)


_CLASS_WORDS = {
    Her2Score.THREE_PLUS: "3+",
    Her2Score.TWO_PLUS: "2+ or 3+",
    Her2Score.ONE_PLUS: "1+ or more",
}


def _gastric_biopsy(counts: ClassCounts, rule: CaseRule, clusters: ClassCounts) -> ScoreCall:
    name = _rule_name(rule)
    need = rule.cluster_min_cells
    for score in (Her2Score.THREE_PLUS, Her2Score.TWO_PLUS, Her2Score.ONE_PLUS):
        if clusters[score] >= need:  # "irrespective of percentage": decides however few cells were counted
            return _call(
                score, f"{name}: a cluster of {clusters[score]} cohesive {_CLASS_WORDS[score]} cells", rule=rule
            )
    total = counts.total
    if total < rule.min_tumour_cells:
        return _not_assessable(total, rule)
    largest = clusters.one_plus
    detail = f"largest {largest} cell{'s' if largest != 1 else ''}" if largest else "no stained cell"
    return _call(
        Her2Score.ZERO, f"{name}: no cohesive cluster of ≥ {need} stained (1+ or more) cells ({detail})", rule=rule
    )


def _call(
    score: Her2Score,
    reason: str,
    zero_subtype: Her2ZeroSubtype | None = None,
    *,
    rule: CaseRule,
) -> ScoreCall:
    status = {
        Her2Score.ZERO: Her2Status.NEGATIVE,
        Her2Score.ONE_PLUS: Her2Status.NEGATIVE,
        Her2Score.TWO_PLUS: Her2Status.EQUIVOCAL,
        Her2Score.THREE_PLUS: Her2Status.POSITIVE,
    }[score]
    # HER2-low (1+, or 2+ with a negative ISH) is a breast category
    her2_low = rule.guideline == Guideline.BREAST and score in (Her2Score.ONE_PLUS, Her2Score.TWO_PLUS)
    return ScoreCall(
        score=score,
        status=status,
        her2_low=her2_low,
        zero_subtype=zero_subtype,
        reason=reason,
        guideline=rule.guideline,
        specimen=rule.specimen,
    )


def cluster_sizes(cells: Sequence[Cell], pixel_size_um: float, cohesion_distance_um: float) -> ClassCounts:
    """The largest cohesive cluster of cells at or above each class.

    Two cells are joined when their centres are at most ``cohesion_distance_um`` apart; a cluster is a connected
    group of joined cells (single linkage), so a chain of touching cells is one cluster.

    Parameters
    ----------
    cells : sequence of Cell
        Counted tumour cells, ``row``/``col`` in FOV pixels.
    pixel_size_um : float
        µm per FOV pixel (positive).
    cohesion_distance_um : float
        Greatest centre distance, in µm, of two touching cells (non-negative).

    Returns
    -------
    ClassCounts
        For each class k, the number of cells in the largest cluster of cells whose class is k or higher (so the
        "0" entry is the largest cluster of any cells); 0 where there is no such cell.
    """
    if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number of µm per pixel, got {pixel_size_um!r}")
    if not (np.isfinite(cohesion_distance_um) and cohesion_distance_um >= 0):
        raise ValueError(f"cohesion_distance_um must be a non-negative distance in µm, got {cohesion_distance_um!r}")
    n = len(cells)
    if n == 0:
        return ClassCounts()
    rank = {score: i for i, score in enumerate(HER2_SCORES)}
    centres_um = np.array([(cell.row, cell.col) for cell in cells], dtype=np.float64) * pixel_size_um
    classes = np.array([rank[cell.her2_class] for cell in cells], dtype=np.intp)
    pairs = cKDTree(centres_um).query_pairs(cohesion_distance_um, output_type="ndarray")
    largest = []
    for k in range(len(HER2_SCORES)):
        members = classes >= k
        if not members.any():
            largest.append(0)
            continue
        edges = pairs[members[pairs[:, 0]] & members[pairs[:, 1]]]
        graph = coo_array((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        largest.append(int(np.bincount(labels[members]).max()))
    return ClassCounts(zero=largest[0], one_plus=largest[1], two_plus=largest[2], three_plus=largest[3])


def largest_clusters(fovs: Iterable[FovResult]) -> ClassCounts:
    """Per class, the largest cohesive cluster over ``fovs`` (clusters do not cross FOV borders)."""
    best = ClassCounts()
    for fov in fovs:
        c = fov.clusters
        best = ClassCounts(
            zero=max(best.zero, c.zero),
            one_plus=max(best.one_plus, c.one_plus),
            two_plus=max(best.two_plus, c.two_plus),
            three_plus=max(best.three_plus, c.three_plus),
        )
    return best


def score_case(fovs: Iterable[FovResult], rule: CaseRule, control: ControlCalibration | None = None) -> CaseResult:
    """The case score over the counts of all ``fovs`` (summed), with the control's QC and defaults noted.

    A gastric biopsy is called on the largest cohesive cluster per class over the FOVs.
    """
    fov_list = list(fovs)
    counts = sum((fov.counts for fov in fov_list), ClassCounts())
    call = call_score(counts, rule, largest_clusters(fov_list))
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
