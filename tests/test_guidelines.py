"""Guidelines chosen per case (scoring/case.py): the gastric resection and biopsy rules, cohesive clusters, the
breast rule unchanged, and the config fields that choose them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from her2scope.config.app import ConfigError, load_config
from her2scope.config.scoring import CaseRule, Guideline, Specimen
from her2scope.scoring.case import call_score, cluster_sizes, score_case
from her2scope.scoring.results import Cell, ClassCounts, FovResult, Her2Score, Her2Status, ThresholdSource

GASTRIC = CaseRule(guideline=Guideline.GASTRIC, min_tumour_cells=1)
BIOPSY = CaseRule(guideline=Guideline.GASTRIC, specimen=Specimen.BIOPSY)
PIXEL_UM = 0.25
CELL_UM = 12.0  # centre-to-centre spacing of touching tumour cells


def counts(zero: int = 0, one: int = 0, two: int = 0, three: int = 0) -> ClassCounts:
    return ClassCounts(zero=zero, one_plus=one, two_plus=two, three_plus=three)


# --- gastric resection: "≥ 10% of tumor cells" -------------------------------------------------------------


@pytest.mark.parametrize(
    ("c", "expected"),
    [
        (counts(zero=90, three=10), "3+"),  # exactly 10%: "≥ 10%" takes it (breast would say 2+)
        (counts(zero=91, three=9), "0"),  # 3+ 9%: below 10% in every class; no unusual-pattern 2+ in gastric
        (counts(zero=900, two=100), "2+"),  # exactly 10% complete → 2+ (breast: 0, ultralow)
        (counts(zero=901, two=99), "0"),  # 9.9% complete, 9.9% stained → 0
        (counts(zero=900, one=100), "1+"),  # exactly 10% faint → 1+
        (counts(zero=901, one=99), "0"),  # 9.9% → 0
        (counts(zero=900, one=50, two=45, three=5), "1+"),  # complete 5%, stained 10% → 1+
        (counts(zero=900, two=95, three=5), "2+"),  # 3+ 0.5%, complete exactly 10% → 2+
        (counts(zero=1000), "0"),
    ],
)
def test_gastric_resection_boundaries(c: ClassCounts, expected: str) -> None:
    call = call_score(c, GASTRIC)
    assert call.score == Her2Score(expected)
    assert call.guideline == Guideline.GASTRIC and call.specimen == Specimen.RESECTION
    assert call.zero_subtype is None  # no null/ultralow split outside breast
    assert not call.her2_low  # a breast category
    assert call.reason.startswith("gastric (resection): ")


def test_exactly_ten_percent_is_in_for_gastric_and_out_for_breast() -> None:
    c = counts(zero=108, three=12)  # 12 of 120 is exactly 10%
    assert call_score(c, GASTRIC).score == Her2Score.THREE_PLUS
    assert call_score(c, CaseRule(min_tumour_cells=1)).score == Her2Score.TWO_PLUS  # breast: unusual pattern


def test_gastric_resection_reason_names_the_rule_and_share() -> None:
    call = call_score(counts(zero=858, two=100, three=42), GASTRIC)
    assert call.score == Her2Score.TWO_PLUS and call.status == Her2Status.EQUIVOCAL
    assert call.reason == "gastric (resection): complete/basolateral/lateral 2+ and 3+ 14.2% ≥ 10%"


def test_gastric_resection_with_too_few_cells_is_not_assessable() -> None:
    call = call_score(counts(three=99), CaseRule(guideline=Guideline.GASTRIC))
    assert call.score is None and call.status == Her2Status.NOT_ASSESSABLE
    assert call.reason.startswith("gastric (resection): 99 tumour cells")


# --- cohesive clusters -------------------------------------------------------------------------------------


def nest(n: int, her2_class: Her2Score, origin_um: tuple[float, float], spacing_um: float = CELL_UM) -> list[Cell]:
    """``n`` cells in a row, ``spacing_um`` apart, in FOV pixels of PIXEL_UM."""
    r0, c0 = origin_um
    return [Cell(row=r0 / PIXEL_UM, col=(c0 + i * spacing_um) / PIXEL_UM, her2_class=her2_class) for i in range(n)]


def sea_of_zero(rows: int = 12, cols: int = 12, origin_um: tuple[float, float] = (0.0, 0.0)) -> list[Cell]:
    r0, c0 = origin_um
    return [
        Cell(row=(r0 + r * CELL_UM) / PIXEL_UM, col=(c0 + c * CELL_UM) / PIXEL_UM, her2_class=Her2Score.ZERO)
        for r in range(rows)
        for c in range(cols)
    ]


def test_cluster_sizes_are_cumulative_per_class() -> None:
    cells = [
        *nest(3, Her2Score.THREE_PLUS, (0.0, 0.0)),
        *nest(2, Her2Score.TWO_PLUS, (0.0, 3 * CELL_UM)),  # continues the row: 5 cells of 2+ or more
        *nest(4, Her2Score.ONE_PLUS, (500.0, 0.0)),  # far away
    ]
    sizes = cluster_sizes(cells, PIXEL_UM, 1.5 * CELL_UM)
    assert sizes == counts(zero=5, one=5, two=5, three=3)


def test_cluster_sizes_of_no_cells_and_bad_arguments() -> None:
    assert cluster_sizes([], PIXEL_UM, 18.0) == ClassCounts()
    with pytest.raises(ValueError, match="pixel_size_um"):
        cluster_sizes(nest(2, Her2Score.ZERO, (0, 0)), 0.0, 18.0)
    with pytest.raises(ValueError, match="cohesion_distance_um"):
        cluster_sizes(nest(2, Her2Score.ZERO, (0, 0)), PIXEL_UM, float("nan"))


def test_cluster_sizes_do_not_depend_on_cell_order() -> None:
    rng = np.random.default_rng(7)
    cells = [
        Cell(row=float(r), col=float(c), her2_class=Her2Score(k))
        for r, c, k in zip(
            rng.uniform(0, 2000, 400), rng.uniform(0, 2000, 400), rng.choice(["0", "1+", "2+", "3+"], 400), strict=True
        )
    ]
    order = rng.permutation(len(cells))
    assert cluster_sizes(cells, PIXEL_UM, 18.0) == cluster_sizes([cells[i] for i in order], PIXEL_UM, 18.0)


# --- gastric biopsy: "Tumor cell cluster (≥ 5 cells) ... irrespective of percentage" --------------------------


def biopsy_call(cells: list[Cell], rule: CaseRule = BIOPSY) -> tuple[Her2Score | None, str]:
    c = ClassCounts(**{k: sum(cell.her2_class == k for cell in cells) for k in ("0", "1+", "2+", "3+")})
    call = call_score(c, rule, cluster_sizes(cells, PIXEL_UM, rule.cohesion_distance_um))
    assert call.guideline == Guideline.GASTRIC and call.specimen == Specimen.BIOPSY
    return call.score, call.reason


def test_a_cluster_of_five_cohesive_3plus_cells_in_a_sea_of_0_is_3plus() -> None:
    cells = [*sea_of_zero(), *nest(5, Her2Score.THREE_PLUS, (1000.0, 0.0))]  # 5 of 149 cells: 3.4%
    score, reason = biopsy_call(cells)
    assert score == Her2Score.THREE_PLUS
    assert reason == "gastric (biopsy): a cluster of 5 cohesive 3+ cells"


def test_four_cohesive_3plus_cells_are_no_cluster() -> None:
    score, reason = biopsy_call([*sea_of_zero(), *nest(4, Her2Score.THREE_PLUS, (1000.0, 0.0))])
    assert score == Her2Score.ZERO
    assert "no cohesive cluster of ≥ 5" in reason and "largest 4 cells" in reason


def test_five_scattered_3plus_cells_are_no_cluster() -> None:
    scattered = nest(5, Her2Score.THREE_PLUS, (1000.0, 0.0), spacing_um=3 * CELL_UM)  # stroma between them
    assert biopsy_call([*sea_of_zero(), *scattered])[0] == Her2Score.ZERO


def test_3plus_cells_touching_2plus_ones_make_a_2plus_cluster() -> None:
    cells = [
        *sea_of_zero(),
        *nest(3, Her2Score.THREE_PLUS, (1000.0, 0.0)),
        *nest(3, Her2Score.TWO_PLUS, (1000.0, 3 * CELL_UM)),
    ]
    score, reason = biopsy_call(cells)
    assert score == Her2Score.TWO_PLUS
    assert reason == "gastric (biopsy): a cluster of 6 cohesive 2+ or 3+ cells"


def test_a_biopsy_cluster_decides_however_few_cells_were_counted() -> None:
    assert biopsy_call(nest(7, Her2Score.ONE_PLUS, (0.0, 0.0)))[0] == Her2Score.ONE_PLUS
    # without a cluster, too few cells are not assessable rather than 0
    score, reason = biopsy_call(nest(4, Her2Score.THREE_PLUS, (0.0, 0.0)))
    assert score is None and reason.startswith("gastric (biopsy): 4 tumour cells")


def test_a_biopsy_needs_its_clusters() -> None:
    with pytest.raises(ValueError, match="cluster_sizes"):
        call_score(counts(zero=200), BIOPSY)


def fov(cells: list[Cell], rule: CaseRule) -> FovResult:
    c = ClassCounts(**{k: sum(cell.her2_class == k for cell in cells) for k in ("0", "1+", "2+", "3+")})
    clusters = cluster_sizes(cells, PIXEL_UM, rule.cohesion_distance_um)
    return FovResult(
        counts=c,
        percentages=c.percentages(),
        call=call_score(c, rule, clusters),
        cells=tuple(cells),
        n_excluded_nuclei=0,
        weak_threshold_od=0.1,
        intense_threshold_od=0.45,
        intense_threshold_source=ThresholdSource.DEFAULT,
        pixel_size_um=PIXEL_UM,
        analysis_pixel_size_um=0.5,
        tumour_area_mm2=0.1,
        stain_vectors=((0.65, 0.704, 0.286), (0.268, 0.57, 0.776)),
        clusters=clusters,
    )


def test_a_biopsy_case_takes_the_largest_cluster_over_its_fovs() -> None:
    fovs = [
        fov([*sea_of_zero(), *nest(3, Her2Score.THREE_PLUS, (1000.0, 0.0))], BIOPSY),
        fov([*sea_of_zero(), *nest(6, Her2Score.THREE_PLUS, (1000.0, 0.0))], BIOPSY),
    ]
    case = score_case(fovs, BIOPSY)
    assert case.call.score == Her2Score.THREE_PLUS
    assert case.call.reason == "gastric (biopsy): a cluster of 6 cohesive 3+ cells"
    # clusters are not added across FOVs: 3 + 3 cohesive cells in two FOVs are no cluster of 5
    split = [fov([*sea_of_zero(), *nest(3, Her2Score.THREE_PLUS, (1000.0, 0.0))], BIOPSY) for _ in range(2)]
    assert score_case(split, BIOPSY).call.score == Her2Score.ZERO


# --- breast unchanged ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("c", "score", "reason"),
    [
        (counts(zero=89, three=11), "3+", "3+ cells 11.0% > 10%"),
        (counts(zero=899, two=101), "2+", "complete membranes (2+ and 3+) 10.1% > 10%"),
        (counts(zero=899, one=101), "1+", "stained cells (1+ or more) 10.1% > 10%"),
        (counts(zero=1000), "0", "no membrane staining: 0, null"),
    ],
)
def test_breast_calls_and_reasons_are_unchanged(c: ClassCounts, score: str, reason: str) -> None:
    for specimen in Specimen:  # the breast rule ignores the specimen kind
        call = call_score(c, CaseRule(min_tumour_cells=1, specimen=specimen), clusters=counts(three=50))
        assert (call.score, call.reason, call.guideline) == (Her2Score(score), reason, Guideline.BREAST)


# --- configuration -------------------------------------------------------------------------------------------


def test_guideline_and_specimen_round_trip_through_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[case_rule]\nguideline = "gastric"\nspecimen = "biopsy"\ncluster_min_cells = 6\ncohesion_distance_um = 15\n'
    )
    rule = load_config(path).case_rule
    assert rule == CaseRule(guideline="gastric", specimen="biopsy", cluster_min_cells=6, cohesion_distance_um=15.0)
    assert CaseRule.model_validate(rule.model_dump(mode="json")) == rule
    assert CaseRule().guideline == Guideline.BREAST and CaseRule().specimen == Specimen.RESECTION


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[case_rule]\nguideline = "lung"\n', "case_rule.guideline = 'lung'"),
        ('[case_rule]\nspecimen = "cytology"\n', "case_rule.specimen = 'cytology'"),
        ("[case_rule]\ncluster_min_cells = 1\n", "case_rule.cluster_min_cells = 1"),
        ("[case_rule]\ncohesion_distance_um = 0\n", "case_rule.cohesion_distance_um = 0"),
    ],
)
def test_bad_guideline_settings_are_named(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)
    if "guideline" in text:
        assert "breast" in str(info.value) and "gastric" in str(info.value)  # says what is allowed


# --- the overlay panel says which rule applied and why ---------------------------------------------------------


def test_the_overlay_panel_names_the_rule_and_a_biopsys_clusters() -> None:
    from her2scope.scoring.overlay import panel_lines

    biopsy = fov([*sea_of_zero(), *nest(7, Her2Score.THREE_PLUS, (1000.0, 0.0))], BIOPSY)
    texts = [text for text, _ in panel_lines(biopsy)]
    assert "gastric (biopsy): a cluster of 7 cohesive 3+ cells" in texts
    assert "rule: gastric (biopsy), CAP/ASCP/ASCO 2016" in texts
    assert "largest cohesive clusters: 3+ 7, 2+/3+ 7, 1+ or more 7" in texts
    breast = fov(sea_of_zero(), CaseRule())
    texts = [text for text, _ in panel_lines(breast)]
    assert "rule: breast, ASCO/CAP 2018/2023" in texts and not any("clusters" in t for t in texts)
