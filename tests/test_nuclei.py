"""Clear nuclei from haematoxylin, and the tumour region."""

from __future__ import annotations

import cv2
import numpy as np

from her2scope.scoring import nuclei


def blobs(
    centres: list[tuple[int, int]], shape: tuple[int, int] = (200, 200), radius: int = 6, od: float = 0.6
) -> np.ndarray:
    image = np.zeros(shape, np.float32)
    for row, col in centres:
        cv2.circle(image, (col, row), radius, od, -1)
    return cv2.GaussianBlur(image, (0, 0), 1.0)


def test_each_nucleus_is_found_once_at_its_centre() -> None:
    centres = [(40, 40), (40, 70), (100, 60), (150, 150), (60, 160)]
    h_od = blobs(centres)
    mask = nuclei.nucleus_mask(h_od, 0.15, 6)
    found = nuclei.clear_nuclei(h_od, mask, 6)
    assert len(found) == len(centres)
    for centre in centres:
        assert np.min(np.hypot(*(found - centre).T)) < 1.5


def test_specks_below_the_opening_are_not_nuclei() -> None:
    h_od = np.zeros((100, 100), np.float32)
    h_od[50, 50] = 1.0
    h_od[20:22, 20:22] = 1.0
    mask = nuclei.nucleus_mask(h_od, 0.15, 6)
    assert not mask.any()
    assert len(nuclei.clear_nuclei(h_od, mask, 6)) == 0


def test_tumour_region_keeps_nests_and_drops_scattered_nuclei() -> None:
    tissue = np.zeros((300, 300), bool)
    for row in range(40, 140, 12):  # a nest: nuclei on a 12 px grid
        for col in range(40, 140, 12):
            cv2.circle(tissue.view(np.uint8), (col, row), 3, 1, -1)
    for row, col in ((250, 60), (200, 250), (260, 250)):  # scattered stroma nuclei
        cv2.circle(tissue.view(np.uint8), (col, row), 3, 1, -1)
    region = nuclei.tumour_region(tissue, 8, 14)
    assert region[90, 90] and region[45, 45]
    assert not region[250, 60] and not region[200, 250]
    coarse = nuclei.tumour_region(tissue, 8, 14, work_scale=4)
    assert coarse.shape == tissue.shape
    assert coarse[90, 90] and not coarse[250, 60]
