"""The per-FOV pipeline against synthetic ground truth, across staining batches, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest

from her2scope.config.scoring import ScoringParams
from her2scope.scoring import Her2Score, ThresholdSource, analyse_fov, calibrate_from_control, score_fov
from her2scope.scoring.case import NO_CONTROL_WARNING
from her2scope.synthetic import blank_fov, render_fov
from tests.helpers.synthetic import PIXEL_SIZE_40X, match_cells, synthetic_control, synthetic_fov

pytestmark = pytest.mark.e2e  # the whole pipeline on full-size fields, seconds per test

CLASSES = ("0", "1+", "2+", "3+")


def _positions(result, her2_class=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    cells = [c for c in result.cells if her2_class is None or c.her2_class == her2_class]
    return np.array([(c.row, c.col) for c in cells]).reshape(-1, 2)


@pytest.mark.parametrize("batch_strength", [0.8, 1.0, 1.4])
@pytest.mark.parametrize("her2_class", CLASSES)
def test_pure_fovs_are_counted_and_classified_across_batches(her2_class: str, batch_strength: float) -> None:
    fov = synthetic_fov(((her2_class, 1.0),), batch_strength)
    control = synthetic_control(batch_strength)
    result = score_fov(fov.rgb, PIXEL_SIZE_40X, control=control)
    truth = fov.counts()[her2_class]
    # Most true cells are found (isolated cells outside compact nests are left out by the tumour region) ...
    assert 0.8 * truth <= result.counts.total <= 1.1 * truth
    # ... and nearly all of them get the true class.
    assert result.counts[her2_class] >= 0.9 * result.counts.total
    assert result.call.score == Her2Score(her2_class)


@pytest.mark.parametrize("batch_strength", [0.8, 1.0, 1.4])
def test_mixed_fov_class_shares_follow_ground_truth(batch_strength: float) -> None:
    mix = (("0", 0.4), ("1+", 0.3), ("2+", 0.2), ("3+", 0.1))
    fov = synthetic_fov(mix, batch_strength, seed=7)
    result = score_fov(fov.rgb, PIXEL_SIZE_40X, control=synthetic_control(batch_strength))
    truth = fov.counts()
    total_truth = sum(truth.values())
    for her2_class in CLASSES:
        true_share = 100.0 * truth[her2_class] / total_truth
        assert abs(result.percentages[her2_class] - true_share) < 8.0, (her2_class, result.percentages, truth)


def test_cells_are_reported_where_they_are_with_their_class() -> None:
    mix = (("0", 0.25), ("1+", 0.25), ("2+", 0.25), ("3+", 0.25))
    fov = synthetic_fov(mix, seed=8)
    result = score_fov(fov.rgb, PIXEL_SIZE_40X, control=synthetic_control())
    truth_rc = np.array([(c.row, c.col) for c in fov.cells])
    truth_class = np.array([c.her2_class for c in fov.cells])
    # membrane classes are placed at the contour centre, 0/1+ at the nucleus: both lie near the cell centre
    detected, matched_truth = match_cells(_positions(result), truth_rc, max_distance_px=3.0 / PIXEL_SIZE_40X)
    assert len(detected) >= 0.8 * len(fov.cells)
    assert len(detected) >= 0.95 * result.counts.total  # hardly any cell where there is none
    detected_class = np.array([c.her2_class.value for c in result.cells])[detected]
    agreement = float(np.mean(detected_class == truth_class[matched_truth]))
    assert agreement >= 0.9


def test_intense_threshold_follows_the_batch() -> None:
    thresholds = {b: synthetic_control(b).intense_threshold_od for b in (0.8, 1.0, 1.4)}
    assert thresholds[0.8] < thresholds[1.0] < thresholds[1.4]
    assert thresholds[1.4] / thresholds[0.8] == pytest.approx(1.4 / 0.8, rel=0.1)
    for batch in (0.8, 1.0, 1.4):
        assert synthetic_control(batch).qc_passed
        assert synthetic_control(batch).control_score == Her2Score.THREE_PLUS


def test_without_control_the_default_applies_and_the_result_says_so() -> None:
    fov = synthetic_fov((("3+", 1.0),))
    result = score_fov(fov.rgb, PIXEL_SIZE_40X)
    assert result.intense_threshold_source == ThresholdSource.DEFAULT
    assert result.intense_threshold_od == ScoringParams().default_intense_threshold_od
    assert NO_CONTROL_WARNING in result.warnings
    calibrated = score_fov(fov.rgb, PIXEL_SIZE_40X, control=synthetic_control())
    assert calibrated.intense_threshold_source == ThresholdSource.CONTROL
    assert NO_CONTROL_WARNING not in calibrated.warnings


def test_a_strong_batch_without_control_overcalls_and_the_control_corrects_it() -> None:
    # Why calibrate: in a strongly stained batch, 2+ membranes pass a fixed intense threshold.
    fov = synthetic_fov((("2+", 1.0),), 2.0)
    uncalibrated = score_fov(fov.rgb, PIXEL_SIZE_40X)
    calibrated = score_fov(fov.rgb, PIXEL_SIZE_40X, control=synthetic_control(2.0))
    assert uncalibrated.counts["3+"] > 0.5 * uncalibrated.counts.total
    assert calibrated.call.score == Her2Score.TWO_PLUS


def test_a_control_that_is_not_3plus_fails_qc() -> None:
    weak_tissue = synthetic_fov((("2+", 1.0),))
    calibration = calibrate_from_control(weak_tissue.rgb, PIXEL_SIZE_40X)
    assert not calibration.qc_passed
    assert any("QC failed" in w for w in calibration.warnings)


def test_a_blank_control_cannot_calibrate() -> None:
    with pytest.raises(ValueError, match="stained membrane"):
        calibrate_from_control(blank_fov(), PIXEL_SIZE_40X)


@pytest.mark.parametrize("pixel_size_um", [0.25, 0.5])
def test_20x_and_40x_fovs_both_work(pixel_size_um: float) -> None:
    fov = synthetic_fov((("2+", 0.5), ("3+", 0.5)), pixel_size_um=pixel_size_um, seed=9)
    result = score_fov(fov.rgb, pixel_size_um, control=synthetic_control(pixel_size_um=pixel_size_um))
    truth = fov.counts()
    assert result.counts.total >= 0.8 * sum(truth.values())
    assert abs(result.percentages["3+"] - 100.0 * truth["3+"] / sum(truth.values())) < 10.0
    assert result.pixel_size_um == pytest.approx(pixel_size_um)
    assert result.analysis_pixel_size_um == pytest.approx(max(pixel_size_um, 0.5), rel=0.01)


def test_jpeg_noise_and_blur_do_not_change_the_call() -> None:
    clean = synthetic_fov((("1+", 0.6), ("2+", 0.4)), seed=12)
    jpeg = synthetic_fov((("1+", 0.6), ("2+", 0.4)), seed=12, jpeg_quality=70)
    control = synthetic_control()
    a = score_fov(clean.rgb, PIXEL_SIZE_40X, control=control)
    b = score_fov(jpeg.rgb, PIXEL_SIZE_40X, control=control)
    assert a.call.score == b.call.score
    for her2_class in CLASSES:
        assert abs(a.percentages[her2_class] - b.percentages[her2_class]) < 5.0


def test_input_unchanged_deterministic_and_channel_orders_agree() -> None:
    fov = synthetic_fov((("1+", 0.5), ("3+", 0.5)), seed=3)
    image = np.array(fov.rgb)  # writeable copy
    before = image.copy()
    first = score_fov(image, PIXEL_SIZE_40X)
    second = score_fov(image, PIXEL_SIZE_40X)
    np.testing.assert_array_equal(image, before)
    assert first == second
    from_bgr = score_fov(np.ascontiguousarray(image[:, :, ::-1]), PIXEL_SIZE_40X, channel_order="BGR")
    assert from_bgr.counts == first.counts
    as_uint16 = score_fov(image.astype(np.uint16) * 257, PIXEL_SIZE_40X)
    as_float = score_fov(image.astype(np.float32) / 255.0, PIXEL_SIZE_40X)
    for other in (as_uint16, as_float):
        assert abs(other.counts.total - first.counts.total) <= 0.02 * first.counts.total


def test_masks_are_nested_and_cells_lie_in_the_tumour_region() -> None:
    fov = synthetic_fov((("0", 0.4), ("1+", 0.3), ("2+", 0.2), ("3+", 0.1)), seed=7)
    analysis = analyse_fov(fov.rgb, PIXEL_SIZE_40X, control=synthetic_control())
    assert not (analysis.intense & ~analysis.weak).any()  # M_intense ⊆ M_weak
    small = analysis.image.from_fov(_positions(analysis.result))
    rows, cols = np.rint(small).astype(int).T
    assert analysis.tumour_region[rows, cols].all()


def test_blank_and_tissue_free_fovs_give_zero_cells_not_a_crash() -> None:
    for image in (blank_fov(), np.full((1080, 1920, 3), 30, np.uint8), np.zeros((1080, 1920, 3), np.uint8)):
        result = score_fov(image, PIXEL_SIZE_40X)
        assert result.counts.total == 0
        assert result.call.score is None
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (540, 960, 3), dtype=np.uint8)
    noisy = score_fov(noise, PIXEL_SIZE_40X)  # a frame of noise is refused as such, not scored
    assert noisy.call.score is None and noisy.counts.total == 0
    assert any("too noisy" in warning for warning in noisy.warnings)


def test_roi_polygon_restricts_counting_to_it() -> None:
    fov = synthetic_fov((("2+", 1.0),))
    full = score_fov(fov.rgb, PIXEL_SIZE_40X, control=synthetic_control())
    left_half = [(0.0, 0.0), (0.0, 960.0), (1080.0, 960.0), (1080.0, 0.0)]
    half = score_fov(fov.rgb, PIXEL_SIZE_40X, control=synthetic_control(), roi_polygon=left_half)
    assert 0 < half.counts.total < full.counts.total
    assert all(cell.col <= 962 for cell in half.cells)
    truth_left = sum(1 for c in fov.cells if c.col < 960)
    assert abs(half.counts.total - truth_left) <= 0.2 * truth_left


@pytest.mark.parametrize(
    ("polygon", "message"),
    [
        ([(0, 0), (10, 10)], "at least 3"),
        ([(0, 0), (10, 10), (float("nan"), 3)], "non-finite"),
        ([(5000, 5000), (5000, 6000), (6000, 6000)], "outside"),
    ],
)
def test_bad_roi_polygons_are_refused(polygon: list[tuple[float, float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_fov(blank_fov((256, 256)), PIXEL_SIZE_40X, roi_polygon=polygon)


@pytest.mark.parametrize("pixel_size", [0.0, -0.25, 0.01, 50.0, float("nan")])
def test_implausible_pixel_sizes_are_refused(pixel_size: float) -> None:
    with pytest.raises(ValueError, match="pixel size"):
        score_fov(blank_fov((256, 256)), pixel_size)


def test_estimated_stain_vectors_score_like_the_defaults_on_default_stains() -> None:
    fov = synthetic_fov((("1+", 0.5), ("3+", 0.5)), seed=4)
    params = ScoringParams.model_validate({"stains": {"estimate_from_image": True}})
    estimated = score_fov(fov.rgb, PIXEL_SIZE_40X, params, control=synthetic_control())
    default = score_fov(fov.rgb, PIXEL_SIZE_40X, control=synthetic_control())
    assert estimated.call.score == default.call.score
    assert abs(estimated.counts.total - default.counts.total) <= 0.1 * default.counts.total


def test_real_tma_crops_score_as_the_pathologist_did(sample) -> None:  # type: ignore[no-untyped-def]
    control = calibrate_from_control(sample("control_3plus.jpg"), PIXEL_SIZE_40X)
    assert control.qc_passed
    for name, expected in (
        ("her2_0.jpg", Her2Score.ZERO),
        ("her2_1plus.jpg", Her2Score.ONE_PLUS),
        ("her2_2plus.jpg", Her2Score.TWO_PLUS),
        ("her2_3plus.jpg", Her2Score.THREE_PLUS),
    ):
        result = score_fov(sample(name), PIXEL_SIZE_40X, control=control)
        assert result.counts.total > 200, name
        assert result.call.score == expected, (name, result.counts)


def test_weak_threshold_from_a_region_of_weak_staining() -> None:
    from her2scope.scoring import weak_threshold_from_region

    fov = render_fov((540, 960), PIXEL_SIZE_40X, {"1+": 1.0}, seed=2)
    whole = [(0.0, 0.0), (0.0, 959.0), (539.0, 959.0), (539.0, 0.0)]
    threshold = weak_threshold_from_region(fov.rgb, PIXEL_SIZE_40X, whole)
    assert 0.02 < threshold < 0.2
    with pytest.raises(ValueError, match="no DAB contrast"):
        weak_threshold_from_region(blank_fov((540, 960)), PIXEL_SIZE_40X, whole)


CASES = {
    Her2Score.THREE_PLUS: (("0", 0.2), ("1+", 0.2), ("2+", 0.3), ("3+", 0.3)),
    Her2Score.TWO_PLUS: (("0", 0.6), ("1+", 0.2), ("2+", 0.2)),
    Her2Score.ONE_PLUS: (("0", 0.6), ("1+", 0.4)),
    Her2Score.ZERO: (("0", 0.97), ("1+", 0.03)),
}


@pytest.mark.parametrize("batch_strength", [0.7, 1.3])
@pytest.mark.parametrize("expected", list(CASES))
def test_case_score_over_several_fovs_across_batches(expected: Her2Score, batch_strength: float) -> None:
    from her2scope.config.scoring import CaseRule
    from her2scope.scoring import score_case

    control = synthetic_control(batch_strength)
    fovs = [synthetic_fov(CASES[expected], batch_strength, seed=seed) for seed in (21, 22, 23)]
    results = [score_fov(fov.rgb, PIXEL_SIZE_40X, control=control) for fov in fovs]
    case = score_case(results, CaseRule(), control)
    truth = {k: sum(fov.counts()[k] for fov in fovs) for k in CLASSES}
    assert case.call.score == expected, (case.counts, truth)
    assert case.counts.total >= 0.8 * sum(truth.values())
    assert case.n_fovs == 3 and case.control == control and case.warnings == ()
    if expected == Her2Score.ZERO:
        assert case.call.zero_subtype is not None


def test_control_calibrated_from_a_chosen_region() -> None:
    from her2scope.synthetic import render_control

    control = render_control(pixel_size_um=PIXEL_SIZE_40X, seed=11)
    whole = calibrate_from_control(control.rgb, PIXEL_SIZE_40X)
    left = [(0.0, 0.0), (0.0, 960.0), (1079.0, 960.0), (1079.0, 0.0)]
    region = calibrate_from_control(control.rgb, PIXEL_SIZE_40X, region_polygon=left)
    assert region.source == ThresholdSource.CONTROL_REGION and whole.source == ThresholdSource.CONTROL
    assert region.n_membrane_pixels < whole.n_membrane_pixels
    assert region.intense_threshold_od == pytest.approx(whole.intense_threshold_od, rel=0.1)
    result = score_fov(synthetic_fov((("3+", 1.0),)).rgb, PIXEL_SIZE_40X, control=region)
    assert result.intense_threshold_source == ThresholdSource.CONTROL_REGION


def test_scikit_image_ihc_sample_is_scored() -> None:
    from skimage import data

    image = data.immunohistochemistry()  # 512x512 real IHC (DAB + haematoxylin), about 0.5 µm/px
    analysis = analyse_fov(image, 0.5)
    result = analysis.result
    assert result.counts.total > 50
    assert result.counts["3+"] + result.counts["2+"] > 0  # its strongly stained glands have closed outlines
    assert not (analysis.intense & ~analysis.weak).any()
    assert analyse_fov(image, 0.5).result == result
