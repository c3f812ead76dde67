"""Complete membranes from the contour hierarchy, and the morphology they rely on."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from her2scope.scoring import morphology
from her2scope.scoring.membranes import cell_area_bounds_px, complete_membranes

AREA = (50.0, 5000.0)


def ring(
    shape: tuple[int, int] = (120, 160), centre: tuple[int, int] = (60, 80), radius: int = 20, thickness: int = 2
) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.circle(mask, (centre[1], centre[0]), radius, 1, thickness)
    return mask.astype(bool)


def test_closed_ring_is_one_complete_membrane_at_its_centre() -> None:
    found = complete_membranes(ring(), *AREA)
    assert len(found.centres) == 1
    np.testing.assert_allclose(found.centres[0], (60, 80), atol=0.5)
    assert found.filled[60, 80] and not found.filled[5, 5]
    # the filled interior is the hole: about the disk inside the ring
    assert abs(found.filled.sum() - np.pi * 19**2) < 0.1 * np.pi * 19**2


def test_broken_ring_is_not_complete() -> None:
    mask = np.zeros((120, 160), np.uint8)
    cv2.ellipse(mask, (80, 60), (20, 20), 0, 0, 300, 1, 2)  # a 60° gap
    found = complete_membranes(mask.astype(bool), *AREA)
    assert len(found.centres) == 0 and not found.filled.any()


def test_ring_with_stain_inside_has_a_child_and_is_not_complete() -> None:
    mask = ring()
    mask[58:63, 78:83] = True  # a stained speck inside: the hole has a child contour
    assert len(complete_membranes(mask, *AREA).centres) == 0


def test_rings_outside_the_cell_size_are_dropped() -> None:
    small = ring(radius=3)
    large = ring(shape=(400, 400), centre=(200, 200), radius=150)
    assert len(complete_membranes(small, *AREA).centres) == 0
    assert len(complete_membranes(large, *AREA).centres) == 0


def test_ring_cut_by_the_image_border_is_not_complete() -> None:
    assert len(complete_membranes(ring(centre=(10, 80)), *AREA).centres) == 0


def test_honeycomb_of_touching_cells_gives_one_membrane_per_cell() -> None:
    mask = np.zeros((100, 200), np.uint8)
    for col in (40, 80, 120, 160):
        cv2.rectangle(mask, (col - 20, 30), (col + 20, 70), 1, 2)  # neighbours share a wall
    found = complete_membranes(mask.astype(bool), *AREA)
    assert len(found.centres) == 4
    np.testing.assert_allclose(sorted(found.centres[:, 1]), [40, 80, 120, 160], atol=1.0)


def test_tiny_pockets_in_thick_membrane_do_not_hide_a_cell() -> None:
    mask = ring(thickness=6)
    mask[60 + 22, 80] = False  # a one-pixel pocket inside the thick wall
    assert len(complete_membranes(mask, *AREA).centres) == 1


def test_empty_mask_and_input_unchanged() -> None:
    empty = np.zeros((50, 50), bool)
    found = complete_membranes(empty, *AREA)
    assert found.centres.shape == (0, 2) and found.contours == ()
    mask = ring()
    before = mask.copy()
    complete_membranes(mask, *AREA)
    np.testing.assert_array_equal(mask, before)


@pytest.mark.parametrize("pixel_size", [0.25, 0.5])
def test_cell_area_bounds_follow_the_pixel_size(pixel_size: float) -> None:
    low, high = cell_area_bounds_px(5.0, 30.0, pixel_size)
    assert low == pytest.approx(np.pi * (2.5 / pixel_size) ** 2)
    assert high == pytest.approx(np.pi * (15.0 / pixel_size) ** 2)


def test_dilation_and_erosion_by_distance_match_disks() -> None:
    mask = np.zeros((101, 101), bool)
    mask[50, 50] = True
    disk = morphology.dilate(mask, 10)
    assert disk[50, 60] and disk[57, 57] and not disk[50, 62] and not disk[58, 58]
    assert morphology.erode(disk, 5).sum() < disk.sum()
    np.testing.assert_array_equal(morphology.open_(disk, 3), disk)  # a disk survives a smaller opening
    assert not morphology.open_(mask, 2).any()  # a point does not


def test_within_coarse_is_at_most_one_coarse_pixel_generous() -> None:
    mask = np.zeros((200, 200), bool)
    mask[100, 100] = True
    points = np.array([[100.0, 100.0 + d] for d in range(0, 30)])
    exact = morphology.within(mask, 12, points)
    coarse = morphology.within(mask, 12, points, coarse=2)
    assert exact.sum() == 13
    assert exact.sum() <= coarse.sum() <= exact.sum() + 2


def test_remove_small_drops_specks_only() -> None:
    mask = np.zeros((60, 60), bool)
    mask[5, 5] = True  # a speck
    mask[20:40, 20:40] = True
    mask[30, 30] = False  # a pinhole
    cleaned = morphology.remove_small(mask, 4)
    assert not cleaned[5, 5] and cleaned[25, 25]
    assert not cleaned[30, 30]  # a hole is not a component: it stays a hole


def test_polygon_areas_and_centroids_match_opencv_moments() -> None:
    from her2scope.scoring.membranes import _polygon_areas_and_centroids

    rng = np.random.default_rng(0)
    contours = []
    for _ in range(50):
        mask = np.zeros((80, 80), np.uint8)
        centre = tuple(int(v) for v in rng.integers(20, 60, 2))
        axes = tuple(int(v) for v in rng.integers(3, 15, 2))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        found, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contours.append(found[0])
    area, centre_rc = _polygon_areas_and_centroids(contours)
    for contour, a, (row, col) in zip(contours, area, centre_rc, strict=True):
        moments = cv2.moments(contour)
        assert a == pytest.approx(moments["m00"])
        assert (row, col) == pytest.approx((moments["m01"] / moments["m00"], moments["m10"] / moments["m00"]))
