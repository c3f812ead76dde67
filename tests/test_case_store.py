"""The case store on real files: resume, lossless images, ids, the case summary, atomic writes, a full disk."""

from __future__ import annotations

import errno
import json
import os
import stat
from functools import cache
from pathlib import Path
from typing import IO, Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.daemon import case_store
from her2scope.daemon.case_store import CaseError, CaseState, CaseStore
from her2scope.scoring import ControlCalibration, FovResult, calibrate_from_control, score_case, score_fov

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PARAMS = ScoringParams()
RULE = CaseRule()


def _sample(name: str) -> npt.NDArray[np.uint8]:
    image = cv2.imread(str(SAMPLES / name), cv2.IMREAD_COLOR)
    assert image is not None, f"missing sample {name}"
    return np.asarray(image, dtype=np.uint8)


@cache
def _calibration() -> ControlCalibration:
    return calibrate_from_control(_sample("control_3plus.jpg"), 0.25, PARAMS, rule=RULE, channel_order="BGR")


@cache
def _result(name: str) -> FovResult:
    return score_fov(_sample(name), 0.25, PARAMS, control=_calibration(), rule=RULE, channel_order="BGR")


def _kept(name: str) -> FovResult:
    """The result as the store keeps it in memory: without its cells, which stay in its file."""
    return _result(name).model_copy(update={"cells": ()})


def _image(seed: int, shape: tuple[int, int, int] = (90, 120, 3)) -> npt.NDArray[np.uint8]:
    """Noise: the hardest image for a lossy format, so a lossy write would show."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _on_disk(directory: Path, case_id: str) -> CaseState:
    return CaseState.model_validate_json((directory / "cases" / case_id / "case.json").read_bytes())


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


@pytest.fixture
def store(tmp_path: Path) -> CaseStore:
    store = CaseStore(tmp_path)
    store.start(PARAMS, RULE, case_id="case-1", operator="dr-a")
    return store


def test_start_writes_the_case_and_the_pointer(tmp_path: Path) -> None:
    store = CaseStore(tmp_path)
    assert store.case is None
    assert store.resume() is None
    case = store.start(PARAMS, RULE, case_id="S24-1234.A_1", operator="dr-a")
    assert case.case_id == "S24-1234.A_1"
    assert (case.operator, case.closed_at, case.fovs, case.next_index) == ("dr-a", None, (), 1)
    assert store.case is case
    assert (tmp_path / "current").read_text(encoding="utf-8") == "S24-1234.A_1"
    assert _on_disk(tmp_path, "S24-1234.A_1") == case
    assert store.case_dir == tmp_path / "cases" / "S24-1234.A_1"


def test_a_new_store_resumes_the_same_case(store: CaseStore, tmp_path: Path) -> None:
    control = store.add_capture("control", _image(1), "control", 0.25)
    store.set_result(control.fov_id, _result("control_3plus.jpg"), None, _calibration())
    first = store.add_capture("fov", _image(2), "pedal", 0.25)
    store.set_result(first.fov_id, _result("her2_2plus.jpg"), None)
    second = store.add_capture("fov", _image(3), "auto", 0.2)
    store.set_result(second.fov_id, None, "ValueError: too small")
    store.set_excluded(first.fov_id, True)
    store.set_roi(second.fov_id, ((1.0, 2.0), (3.0, 4.5), (10.0, 2.0)))
    store.set_params(PARAMS.model_copy(update={"weak_threshold_od": 0.05}), "set-weak", {"fov_id": "fov-002"})

    resumed = CaseStore(tmp_path).resume()

    assert resumed == store.case
    assert resumed is not None
    assert [r.fov_id for r in resumed.fovs] == ["control-001", "fov-002", "fov-003"]
    assert [r.status for r in resumed.fovs] == ["scored", "scored", "pending"]
    assert resumed.control == _calibration()
    assert resumed.control_fov_id == "control-001"
    assert resumed.fovs[1].result == _kept("her2_2plus.jpg")
    assert resumed.fovs[1].excluded is True
    assert resumed.fovs[2].roi == ((1.0, 2.0), (3.0, 4.5), (10.0, 2.0))
    assert resumed.fovs[2].error == "ValueError: too small"  # kept until it is re-scored
    assert resumed.fovs[2].pixel_size_um == 0.2
    assert [a.action for a in resumed.adjustments] == ["exclude", "set-roi", "set-weak"]
    assert resumed.params.weak_threshold_od == 0.05
    # each result (cells and rings) lives in a file of its own: case.json stays small whatever the case's size
    case_json = (store.case_dir / "case.json").read_text(encoding="utf-8")
    assert '"cells"' not in case_json and '"ring_radii_um"' not in case_json
    assert {"control-001.result.json", "fov-002.result.json"} <= {p.name for p in store.case_dir.iterdir()}
    assert resumed.next_index == 4


def test_the_case_file_does_not_grow_with_the_results(store: CaseStore) -> None:
    """Persisting the 10th FOV writes about as much as the 1st: per-cell results are not rewritten every time."""
    sizes = []
    for seed in range(10):
        record = store.add_capture("fov", _image(seed), "pedal", 0.25)
        store.set_result(record.fov_id, _result("her2_3plus.jpg"), None)
        sizes.append((store.case_dir / "case.json").stat().st_size)
    result_size = (store.case_dir / "fov-001.result.json").stat().st_size
    assert sizes[-1] - sizes[0] < 9 * 2000  # about a kilobyte of record per FOV ...
    assert result_size > 20 * (sizes[1] - sizes[0])  # ... against tens of kilobytes of cells


def test_a_case_saved_with_results_inline_resumes(tmp_path: Path) -> None:
    """Cases saved before results had files of their own carry them in case.json."""
    store = CaseStore(tmp_path)
    store.start(PARAMS, RULE, case_id="case-old")
    record = store.add_capture("fov", _image(1), "pedal", 0.25)
    store.set_result(record.fov_id, _result("her2_2plus.jpg"), None)
    assert store.case is not None
    inline = store.case.model_copy(
        update={"fovs": tuple(r.model_copy(update={"result": _result("her2_2plus.jpg")}) for r in store.case.fovs)}
    )
    (store.case_dir / "case.json").write_text(inline.model_dump_json(indent=1), encoding="utf-8")
    (store.case_dir / "fov-001.result.json").unlink()
    resumed = CaseStore(tmp_path).resume()
    assert resumed is not None and resumed.fovs[0].result == _result("her2_2plus.jpg")


def test_the_image_is_stored_losslessly(store: CaseStore) -> None:
    image = _image(7)
    record = store.add_capture("fov", image, "pedal", 0.25)
    assert record.image_file == "fov-001.png"
    assert (record.fov_id, record.index, record.kind, record.status) == ("fov-001", 1, "fov", "pending")
    np.testing.assert_array_equal(store.image(record.fov_id), image)  # from memory while being written
    assert store.flush_images(timeout_s=10) and store.unsaved_images == 0
    np.testing.assert_array_equal(store.image(record.fov_id), image)  # from the file
    on_disk = cv2.imread(str(store.case_dir / "fov-001.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(on_disk, image)


def test_ids_number_captures_in_order(store: CaseStore) -> None:
    kinds: tuple[Literal["fov", "control"], ...] = ("fov", "fov", "control", "fov")
    ids = [store.add_capture(kind, _image(i, (20, 20, 3)), "auto", 0.25).fov_id for i, kind in enumerate(kinds)]
    assert ids == ["fov-001", "fov-002", "control-003", "fov-004"]


def test_an_unknown_fov_is_a_case_error(store: CaseStore) -> None:
    with pytest.raises(CaseError, match="no FOV 'fov-009' in case 'case-1'"):
        store.record("fov-009")
    with pytest.raises(CaseError, match="no FOV"):
        store.set_result("fov-009", None, "x")


def test_no_open_case_is_a_case_error(tmp_path: Path) -> None:
    store = CaseStore(tmp_path)
    with pytest.raises(CaseError, match="no case is open"):
        store.add_capture("fov", _image(1), "pedal", 0.25)
    with pytest.raises(CaseError, match="no case is open"):
        store.close()


@pytest.mark.parametrize(
    "case_id", ["", "../escape", "a/b", ".hidden", "-flag", "case 1", "caße", "x" * 81, "ok\n", "a\\b"]
)
def test_bad_case_ids_are_refused(tmp_path: Path, case_id: str) -> None:
    store = CaseStore(tmp_path)
    with pytest.raises(CaseError, match="must be 1-80 letters, digits"):
        store.start(PARAMS, RULE, case_id=case_id)
    assert store.case is None
    assert _files(tmp_path) == set()  # nothing was created


@pytest.mark.parametrize("case_id", ["a", "x" * 80, "S24-1234.A_1", "0"])
def test_good_case_ids_are_taken(tmp_path: Path, case_id: str) -> None:
    assert CaseStore(tmp_path).start(PARAMS, RULE, case_id=case_id).case_id == case_id


def test_a_default_case_id_is_made(tmp_path: Path) -> None:
    case = CaseStore(tmp_path).start(PARAMS, RULE)
    assert case.case_id.startswith("case-")
    assert case_store._CASE_ID.match(case.case_id)


def test_a_duplicate_case_id_is_refused(store: CaseStore, tmp_path: Path) -> None:
    with pytest.raises(CaseError, match="case 'case-1' already exists; choose another id"):
        store.start(PARAMS, RULE, case_id="case-1")
    assert store.case is not None and store.case.closed_at is None  # the open case was left alone
    store.close()
    with pytest.raises(CaseError, match="already exists"):
        CaseStore(tmp_path).start(PARAMS, RULE, case_id="case-1")


def test_starting_a_case_closes_the_open_one(store: CaseStore, tmp_path: Path) -> None:
    store.start(PARAMS, RULE, case_id="case-2")
    assert _on_disk(tmp_path, "case-1").closed_at is not None
    assert (tmp_path / "current").read_text(encoding="utf-8") == "case-2"
    resumed = CaseStore(tmp_path).resume()
    assert resumed is not None and resumed.case_id == "case-2"


def test_close_removes_current_and_nothing_resumes(store: CaseStore, tmp_path: Path) -> None:
    store.add_capture("fov", _image(1), "pedal", 0.25)
    closed = store.close()
    assert closed.case_id == "case-1" and closed.closed_at is not None
    assert store.case is None
    assert not (tmp_path / "current").exists()
    assert _on_disk(tmp_path, "case-1") == closed  # the case stays on disk, closed
    assert CaseStore(tmp_path).resume() is None
    assert store.summary().model_dump(mode="json") == {
        "case_id": None,
        "open": False,
        "operator": None,
        "guideline": None,
        "specimen": None,
        "started_at": None,
        "closed_at": None,
        "adjustments": [],
        "fovs": [],
        "control": None,
        "case": None,
    }
    # what close-case replies: the closed case, with its final score
    closed_summary = store.summary(closed).model_dump(mode="json")
    assert closed_summary["case_id"] == "case-1" and closed_summary["open"] is False


def test_a_pointer_to_a_closed_case_resumes_nothing(store: CaseStore, tmp_path: Path) -> None:
    store.close()
    (tmp_path / "current").write_text("case-1", encoding="utf-8")  # e.g. a crash before the pointer was removed
    assert CaseStore(tmp_path).resume() is None


def test_a_damaged_case_json_is_a_case_error_on_resume(store: CaseStore, tmp_path: Path) -> None:
    (store.case_dir / "case.json").write_text('{"case_id": "case-1"', encoding="utf-8")
    with pytest.raises(CaseError, match="cannot resume case 'case-1' from "):
        CaseStore(tmp_path).resume()


def test_summary_counts_only_included_scored_fovs(store: CaseStore) -> None:
    control = store.add_capture("control", _image(0), "control", 0.25)
    store.set_result(control.fov_id, _result("control_3plus.jpg"), None, _calibration())
    included = store.add_capture("fov", _image(1), "pedal", 0.25)
    store.set_result(included.fov_id, _result("her2_2plus.jpg"), None)
    excluded = store.add_capture("fov", _image(2), "pedal", 0.25)
    store.set_result(excluded.fov_id, _result("her2_3plus.jpg"), None)
    store.set_excluded(excluded.fov_id, True)
    failed = store.add_capture("fov", _image(3), "pedal", 0.25)
    store.set_result(failed.fov_id, None, "scoring took longer than 20000 ms")
    pending = store.add_capture("fov", _image(4), "pedal", 0.25)

    summary = store.summary().model_dump(mode="json")

    expected = score_case([_result("her2_2plus.jpg")], RULE, _calibration())
    case: dict[str, Any] = summary["case"]
    assert case["n_fovs"] == 1
    assert case["counts"] == expected.counts.model_dump(mode="json")
    assert case["total"] == _result("her2_2plus.jpg").counts.total
    assert case["percentages"] == expected.percentages
    assert case["score"] == expected.call.score.value if expected.call.score else case["score"] is None
    assert case["status"] == expected.call.status.value
    # the excluded 3+ FOV would have changed the counts
    assert case["total"] != _result("her2_2plus.jpg").counts.total + _result("her2_3plus.jpg").counts.total
    assert summary["case_id"] == "case-1" and summary["open"] is True and summary["operator"] == "dr-a"
    fovs = {f["fov_id"]: f for f in summary["fovs"]}
    assert list(fovs) == [control.fov_id, included.fov_id, excluded.fov_id, failed.fov_id, pending.fov_id]
    assert fovs[excluded.fov_id]["excluded"] is True
    assert fovs[excluded.fov_id]["score"] == _result("her2_3plus.jpg").call.score
    assert fovs[failed.fov_id]["status"] == "failed"
    assert fovs[failed.fov_id]["error"] == "scoring took longer than 20000 ms"
    assert fovs[failed.fov_id]["counts"] is None and fovs[failed.fov_id]["total"] == 0
    assert fovs[pending.fov_id]["status"] == "pending"
    assert fovs[included.fov_id]["total"] == _result("her2_2plus.jpg").counts.total
    assert summary["control"]["fov_id"] == control.fov_id
    assert summary["control"]["intense_threshold_od"] == _calibration().intense_threshold_od
    json.dumps(summary)  # it goes on the wire as it is


def test_summary_of_a_case_without_scored_fovs(store: CaseStore) -> None:
    summary = store.summary().model_dump(mode="json")
    assert summary["case"]["n_fovs"] == 0
    assert summary["case"]["total"] == 0
    assert summary["case"]["score"] is None
    assert summary["control"] is None


def test_a_controls_calibration_becomes_the_cases(store: CaseStore, tmp_path: Path) -> None:
    control = store.add_capture("control", _image(0), "control", 0.25)
    fov = store.add_capture("fov", _image(1), "pedal", 0.25)
    store.set_result(fov.fov_id, _result("her2_2plus.jpg"), None, _calibration())  # not a control: ignored
    assert store.case is not None and store.case.control is None
    record = store.set_result(control.fov_id, _result("control_3plus.jpg"), None, _calibration())
    assert record.status == "scored"
    assert store.case.control == _calibration()
    assert store.case.control_fov_id == control.fov_id
    assert _on_disk(tmp_path, "case-1").control == _calibration()
    # a failed control keeps the calibration the case had
    store.set_result(control.fov_id, None, "RuntimeError: boom")
    assert store.case.control == _calibration()
    assert store.record(control.fov_id).status == "failed"


def test_set_roi_marks_pending_and_logs_an_adjustment(store: CaseStore, tmp_path: Path) -> None:
    fov = store.add_capture("fov", _image(1), "pedal", 0.25)
    store.set_result(fov.fov_id, _result("her2_2plus.jpg"), None)
    polygon = ((0.0, 0.0), (0.0, 50.5), (40.0, 50.5))
    record = store.set_roi(fov.fov_id, polygon)
    assert record.status == "pending"
    assert record.roi == polygon
    assert record.result == _kept("her2_2plus.jpg")  # the old result stays until the re-score
    assert store.case is not None
    adjustment = store.case.adjustments[-1]
    assert adjustment.action == "set-roi"
    assert adjustment.args == {"fov_id": "fov-001", "polygon": [[0.0, 0.0], [0.0, 50.5], [40.0, 50.5]]}
    assert _on_disk(tmp_path, "case-1").adjustments == store.case.adjustments
    assert store.summary().model_dump(mode="json")["fovs"][0]["roi"] is True

    cleared = store.set_roi(fov.fov_id, None)
    assert cleared.roi is None
    assert store.case.adjustments[-1].args == {"fov_id": "fov-001", "polygon": None}


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "case.json"
    case_store.atomic_write(path, b'{"old": true}')

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "rename failed (test)")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="rename failed"):
        case_store.atomic_write(path, b'{"new": true}')
    assert path.read_bytes() == b'{"old": true}'
    assert _files(tmp_path) == {"case.json"}  # no temporary file left behind


def test_a_failed_persist_leaves_the_case_as_it_was(store: CaseStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add_capture("fov", _image(1), "pedal", 0.25)
    before = store.case
    assert before is not None
    real_replace = os.replace

    def refuse_case_json(src: Any, dst: Any) -> None:
        if Path(dst).name == "case.json":
            raise OSError(errno.EIO, "rename failed (test)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_case_json)
    with pytest.raises(OSError, match="rename failed"):
        store.set_excluded("fov-001", True)
    with pytest.raises(OSError, match="rename failed"):
        store.add_capture("fov", _image(2), "pedal", 0.25)
    monkeypatch.undo()

    assert _on_disk(store.directory, "case-1") == before
    assert store.case == before  # memory says what the disk says: nothing half-applied


class _FullDisk:
    """A file whose writes fail half-way with ENOSPC, like a full disk."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def write(self, data: bytes) -> int:
        self._handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        self._handle.flush()

    def fileno(self) -> int:
        return self._handle.fileno()


def _full_disk_for(monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    def full_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 - wrapped
        return _FullDisk(handle) if Path(path).name.endswith(suffix) else handle

    monkeypatch.setattr(case_store, "open", full_open, raising=False)


def test_a_full_disk_fails_the_capture_when_the_case_cannot_be_written(
    store: CaseStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_capture("fov", _image(1), "pedal", 0.25)
    assert store.flush_images(timeout_s=10)
    before = store.case
    files_before = _files(tmp_path)
    _full_disk_for(monkeypatch, ".case.json.tmp")
    with pytest.raises(OSError) as info:
        store.add_capture("fov", _image(2), "pedal", 0.25)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()

    assert _on_disk(tmp_path, "case-1") == before  # still loads, with the previous content
    assert store.case == before
    # nothing half-written stays behind (it would hold on to the space that ran out), no image was queued
    assert store.flush_images(timeout_s=10)
    assert _files(tmp_path) - files_before == set()
    # the next capture, with space again, takes the id the failed one did not use
    record = store.add_capture("fov", _image(3), "pedal", 0.25)
    assert record.fov_id == "fov-002"
    np.testing.assert_array_equal(store.image("fov-002"), _image(3))


def test_an_image_that_cannot_be_written_is_kept_and_retried(
    store: CaseStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _full_disk_for(monkeypatch, ".png.tmp")
    record = store.add_capture("fov", _image(4), "pedal", 0.25)  # the case itself is written
    assert not store.flush_images(timeout_s=10)
    assert store.unsaved_images == 1
    np.testing.assert_array_equal(store.image(record.fov_id), _image(4))  # nothing is lost: still in memory
    assert not (store.case_dir / "fov-001.png").exists()
    assert not any(name.endswith(".tmp") for name in _files(tmp_path))  # no torn file holds the space
    monkeypatch.undo()  # space again

    monkeypatch.setattr(store, "RETRY_S", 0.0)
    store.poll_images()  # retries the failed write
    assert store.flush_images(timeout_s=10) and store.unsaved_images == 0
    on_disk = cv2.imread(str(store.case_dir / "fov-001.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(on_disk, _image(4))


def test_the_case_folder_is_owner_only(store: CaseStore) -> None:
    mode = stat.S_IMODE(store.case_dir.stat().st_mode)
    assert mode == 0o700, oct(mode)


def test_audit_trail_args_are_stored_as_json(store: CaseStore) -> None:
    store.add_capture("fov", _image(1), "pedal", 0.25)
    store.adjust("rescore", {"fov_ids": ("fov-001",), "threshold_od": 0.25})
    assert store.case is not None
    assert store.case.adjustments[-1].args == {"fov_ids": ["fov-001"], "threshold_od": 0.25}
    assert store.case.adjustments[-1].time.endswith("+00:00")
