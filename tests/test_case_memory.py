"""The case store keeps each scored FOV's counts in memory and its cells on disk: a long case at 20x does not grow
the daemon by megabytes per FOV, and the whole result is still there when it is published again."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.daemon.case_store import CaseError, CaseStore
from her2scope.scoring import score_fov

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "her2_3plus.jpg"


def test_results_in_memory_hold_no_cells_and_their_files_hold_all(tmp_path: Path) -> None:
    image = cv2.imread(str(SAMPLE), cv2.IMREAD_COLOR)
    assert image is not None
    result = score_fov(image, 0.25, ScoringParams(), channel_order="BGR")
    assert len(result.cells) > 100
    store = CaseStore(tmp_path)
    store.start(ScoringParams(), CaseRule(), case_id="case-1")
    record = store.add_capture("fov", np.asarray(image, np.uint8), "pedal", 0.25)
    store.set_result(record.fov_id, result, None)

    kept = store.record(record.fov_id).result
    assert kept is not None and kept.cells == () and kept.counts == result.counts and kept.call == result.call
    assert store.full_result(record.fov_id) == result  # the cells come back from the file, every one
    summary = store.summary()
    assert summary.case is not None and summary.case.counts == result.counts

    assert store.flush_images()
    resumed = CaseStore(tmp_path)
    assert resumed.resume() is not None  # a restart reads the results back, also without their cells
    again = resumed.record(record.fov_id).result
    assert again is not None and again.cells == () and again.clusters == result.clusters
    (tmp_path / "cases" / "case-1" / f"{record.fov_id}.result.json").unlink()
    with pytest.raises(CaseError, match="cannot be read"):
        resumed.full_result(record.fov_id)
