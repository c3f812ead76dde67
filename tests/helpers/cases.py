"""A closed case folder made in the test process from synthetic fields, through the recorder's own functions (its
documents, its folder, its exports), as the recorder writes one when it follows a daemon."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from her2scope.clients.recorder import CaseFolder, compose_start, fov_data
from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.daemon.protocol import AuditEntry, CaseCall, CaseSummary, ControlEntry, FovEntry
from her2scope.scoring import analyse_fov, calibrate_from_control, score_case
from her2scope.scoring.results import FovResult
from her2scope.synthetic import render_control, render_fov

PIXEL_SIZE = 0.5
SHAPE = (540, 960)
#: An ROI on fov-002, [row, col] FOV pixels.
ROI = [[30.0, 40.0], [30.0, 600.0], [450.0, 600.0], [450.0, 40.0]]


@dataclass
class SyntheticCase:
    """The folder, the images as captured (BGR) and the results the folder records, by FOV."""

    path: Path
    images: dict[str, np.ndarray]
    results: dict[str, FovResult]


def synthetic_case(out: Path, case_id: str = "case-synthetic", *, with_results: bool = True) -> SyntheticCase:
    """A closed case: a control (control-001), two tumour FOVs (fov-002 with an ROI, fov-003), scored as the
    daemon's worker scores them (BGR, the control's calibration, the ROI); ``with_results``: the recorder wrote
    each FOV's whole result and QuPath files beside its event (else only the log and the images, as before)."""
    params, rule = ScoringParams(), CaseRule()
    bgr = {
        "control-001": render_control(SHAPE, PIXEL_SIZE, seed=11).rgb[:, :, ::-1],
        "fov-002": render_fov(SHAPE, PIXEL_SIZE, {"0": 0.3, "1+": 0.3, "2+": 0.2, "3+": 0.2}, seed=3).rgb[:, :, ::-1],
        "fov-003": render_fov(SHAPE, PIXEL_SIZE, {"0": 0.5, "2+": 0.2, "3+": 0.3}, seed=4).rgb[:, :, ::-1],
    }
    images = {fov_id: np.ascontiguousarray(image) for fov_id, image in bgr.items()}
    roi = tuple((row, col) for row, col in ROI)
    calibration = calibrate_from_control(images["control-001"], PIXEL_SIZE, params, rule=rule, channel_order="BGR")
    results = {
        fov_id: analyse_fov(
            image,
            PIXEL_SIZE,
            params,
            control=calibration,
            roi_polygon=roi if fov_id == "fov-002" else None,
            rule=rule,
            channel_order="BGR",
        ).result
        for fov_id, image in images.items()
    }
    case = score_case([results["fov-002"], results["fov-003"]], rule, calibration)
    control = ControlEntry(fov_id="control-001", **dict(calibration))
    summary = CaseSummary(
        case_id=case_id,
        closed_at="2026-01-02T03:04:05+00:00",
        case=CaseCall.of(case),
        control=control,
        fovs=tuple(
            FovEntry(fov_id=fov_id, kind="control" if fov_id.startswith("control") else "fov", index=i, status="scored")
            for i, fov_id in enumerate(images, start=1)
        ),
    )
    folder = CaseFolder(out / case_id)
    start, run = compose_start(
        case_id=case_id,
        operator="Dr Test",
        started_at="2026-01-02T03:00:00+00:00",
        software={"name": "her2scope", "version": "test"},
        params=params,
        rule=rule,
        params_source="case message",
        pixel_size_um=PIXEL_SIZE,
        control=control,
        daemon_session=None,
    )
    folder.append(start)
    folder.append(run.make_descriptor())
    folder.append(
        run.action(
            0,
            AuditEntry(time="2026-01-02T03:01:00+00:00", action="set-roi", args={"fov_id": "fov-002", "polygon": ROI}),
        )
    )
    for fov_id, image in images.items():
        ok, png = cv2.imencode(".png", image)
        assert ok
        folder.write_file(f"images/{fov_id}.png", png.tobytes())
        body = {
            "result": results[fov_id].model_dump(mode="json"),
            "calibration": calibration.model_dump(mode="json") if fov_id == "control-001" else None,
        }
        folder.append(
            run.event(
                fov_id=fov_id,
                kind="control" if fov_id.startswith("control") else "fov",
                status="scored",
                rescore=False,
                source="live",
                daemon_session=None,
                daemon_seq=None,
                data=fov_data(fov_id, body, summary),
            )
        )
        if with_results:
            folder.write_exports(fov_id, results[fov_id])
    folder.append(run.stop(summary, "success", "case closed by the pathologist"))
    assert folder.pending == 0
    return SyntheticCase(folder.path, images, results)
