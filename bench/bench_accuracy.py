"""Accuracy benchmark: case scores on four real TMA cores against a pathologist's, per-cell figures on synthetic
fields with exact ground truth.

Run: ``python -m bench.bench_accuracy [--data DIR] [--guideline breast|gastric|both] [--real-only |
--synthetic-only] [--fields-only] [--overlay-dir DIR] [--json FILE] [--membrane-method per-cell|contour-hierarchy]``,
or ``--docs`` to regenerate the overlay figures of ``docs/real_cores/``.

Real cores
----------
The data are four oesophageal adenocarcinoma HER2 IHC tissue-microarray cores (about 5468 x 5468 px at about
0.25 µm/px), one per pathologist score 0, 1+, 2+, 3+ (``MANIFEST.tsv`` of the data folder, by default
``<repo root>/../shared/data/her2-tma``). Each core is cut into five 1920 x 1080 fields by a fixed rule, so that no
field is picked by hand:

1. Tissue mask: the core is averaged over 8 x 8 pixel blocks (2 µm at 0.25 µm/px). The glass level is the 99th
   percentile of each RGB channel over the blocks (a core is a disk on a square image, whose corners are glass).
   A block is tissue when its total optical density above glass, the sum over R, G, B of
   ``max(0, -log10(block / glass))``, exceeds ``TISSUE_OD`` (0.08; glass blocks measure about 0.02, pale stroma
   about 0.25). Lumina, tears and glass are therefore not tissue.
2. Candidate windows: every 1920 x 1080 window whose top-left corner lies on a 128-pixel grid (both row and
   column multiples of 128) and that lies wholly inside the image; its tissue fraction is the share of its mask
   blocks that are tissue.
3. Greedy choice: candidates sorted by tissue fraction, largest first, ties by row then column (top-left
   first); a candidate is taken if it overlaps none of those already taken, until five are taken.

The positive control is the 3+ core's first field (its most tissue-rich window) with this same rule. With four
cores there is no other 3+ tissue, so the 3+ core's own fields are scored with a control cut from that core.

Each core's five fields are one case: ``analyse_fov`` per field at 0.25 µm/px, then ``score_case`` over them,
with the control's calibration and again without any control (the documented default intense threshold), under
the gastric guideline (the tissue's, ``CaseRule(guideline="gastric")``) and the breast one. The summary gives
the exact matches, the matches within one class and the quadratic-weighted Cohen's κ of our case scores
against the pathologist's; a case scored "not assessable" counts as a miss and is left out of κ.

Synthetic fields
----------------
``her2scope.synthetic`` renders fields whose every tumour cell is known, with its hard renderers
(``render_hard_fov`` / ``render_hard_control``: ring gaps, basolateral/lateral gland cells, pale and crowded nuclei,
lymphocytes, fibroblasts, vignetting). For batch strengths 0.6, 0.8, 1.0, 1.25 and 1.5 and five class mixes (pure
0, 1+, 2+, 3+ and a mixed one, true shares under the gastric guideline) one field and one 3+ control of the same
batch strength are rendered; the field is scored with and without that control, under each guideline, against the
truth class of each cell under that guideline (``SyntheticCell.truth_class``). Per field:

- class-share error: the mean over the four classes of |detected share − true share|, shares as fractions;
- count ratio: detected tumour cells / true tumour cells;
- per-cell agreement: each detected cell is matched to at most one truth cell and vice versa, nearest pairs
  first, when it lies within half a tumour cell diameter (6 µm) of the truth cell's centre or of its nucleus'
  centre. Found: matched truth cells / truth cells; in class: matched cells whose detected class is the truth
  class (under the guideline scored) / matched cells; false positives: detected cells matched to no truth cell
  (FP oth: those of them on a lymphocyte, fibroblast or smooth-muscle nucleus of the truth, matched likewise).

Fields without tumour (stroma, muscle, lymphocytes, glass) must be called "not assessable"; their call and
their number of counted cells are reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from her2scope import synthetic
from her2scope.clients.images import read_rgb, write_rgb
from her2scope.config.scoring import CaseRule, Guideline, MembraneMethod, ScoringParams
from her2scope.scoring import (
    CaseResult,
    ControlCalibration,
    FovAnalysis,
    FovResult,
    analyse_fov,
    calibrate_from_control,
    call_score,
    score_case,
)
from her2scope.scoring.overlay import DEFAULT_LAYERS, render_overlay
from her2scope.scoring.results import HER2_SCORES, ClassCounts

ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_DATA: Final = ROOT.parent / "shared" / "data" / "her2-tma"
DOCS_DIR: Final = ROOT / "docs" / "real_cores"

PIXEL_SIZE_UM: Final = 0.25
FIELD_SHAPE: Final = (1080, 1920)
N_FIELDS: Final = 5
MASK_DOWNSCALE: Final = 8
WINDOW_STRIDE_PX: Final = 128
GLASS_PERCENTILE: Final = 99.0
TISSUE_OD: Final = 0.08

GUIDELINES: Final = ("gastric", "breast")
CLASSES: Final = tuple(score.value for score in HER2_SCORES)
BATCH_STRENGTHS: Final = (0.6, 0.8, 1.0, 1.25, 1.5)
CLASS_MIXES: Final[Mapping[str, Mapping[str, float]]] = {
    "pure 0": {"0": 1.0},
    "pure 1+": {"1+": 1.0},
    "pure 2+": {"2+": 1.0},
    "pure 3+": {"3+": 1.0},
    "mixed": {"0": 0.4, "1+": 0.3, "2+": 0.25, "3+": 0.05},
}
NON_TUMOUR_FIELDS: Final = ("stroma", "muscle", "lymphocytes", "glass")
MIX_GUIDELINE: Final = "gastric"  # the hard generator's class mixes are true shares under this guideline
MATCH_RADIUS_CELLS: Final = 0.5
DOCS_WIDTH: Final = 1600
DETAIL_SHAPE: Final = (500, 800)
DETAIL_STRIDE_PX: Final = 20

FloatArray = npt.NDArray[np.float64]
RGBImage = npt.NDArray[np.uint8]


# ------------------------------------------------------------------------------------------------ fields


@dataclass(frozen=True, slots=True)
class FieldWindow:
    """One field cut from a core: top-left corner (row, col) in core pixels and its tissue fraction."""

    row: int
    col: int
    tissue_fraction: float
    shape: tuple[int, int] = FIELD_SHAPE

    def cut(self, image: RGBImage) -> RGBImage:
        """The field's pixels of ``image`` (a view, not a copy)."""
        return image[self.row : self.row + self.shape[0], self.col : self.col + self.shape[1]]

    def overlaps(self, other: FieldWindow) -> bool:
        """Whether the two windows share at least one pixel."""
        return (
            self.row < other.row + other.shape[0]
            and other.row < self.row + self.shape[0]
            and self.col < other.col + other.shape[1]
            and other.col < self.col + self.shape[1]
        )


def tissue_mask(
    image: RGBImage, downscale: int = MASK_DOWNSCALE, tissue_od: float = TISSUE_OD
) -> npt.NDArray[np.bool_]:
    """The tissue mask of a core at 1/``downscale`` resolution (see the module docstring, rule step 1).

    Parameters
    ----------
    image : (M, N, 3) uint8 ndarray
        The core, RGB; not modified.
    downscale : int
        Block size; mask pixel (i, j) covers ``image[i*d:(i+1)*d, j*d:(j+1)*d]``. Trailing rows and columns that
        fill no whole block are left out.
    tissue_od : float
        Least total optical density above glass of a tissue block.

    Returns
    -------
    (M // downscale, N // downscale) bool ndarray
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (M, N, 3) uint8 RGB image, got {image.dtype} of shape {image.shape}")
    if downscale < 1:
        raise ValueError(f"downscale must be a positive integer, got {downscale}")
    rows, cols = image.shape[0] // downscale, image.shape[1] // downscale
    if rows < 1 or cols < 1:
        raise ValueError(f"image of shape {image.shape} is smaller than one {downscale}-pixel block")
    cropped = image[: rows * downscale, : cols * downscale]
    # INTER_AREA at an integer factor is the exact block mean.
    blocks = cv2.resize(cropped, (cols, rows), interpolation=cv2.INTER_AREA).astype(np.float64)
    glass = np.maximum(np.percentile(blocks.reshape(-1, 3), GLASS_PERCENTILE, axis=0), 1.0)
    od = np.maximum(0.0, -np.log10(np.maximum(blocks, 1.0) / glass))
    mask: npt.NDArray[np.bool_] = od.sum(axis=2) > tissue_od
    return mask


def field_windows(
    image: RGBImage,
    n_fields: int = N_FIELDS,
    shape: tuple[int, int] = FIELD_SHAPE,
    stride: int = WINDOW_STRIDE_PX,
    downscale: int = MASK_DOWNSCALE,
) -> list[FieldWindow]:
    """Cut a core into ``n_fields`` non-overlapping windows by the module docstring's rule.

    Parameters
    ----------
    image : (M, N, 3) uint8 ndarray
        The core, RGB.
    n_fields : int
        How many windows to take; fewer are returned when no more fit without overlap.
    shape : (int, int)
        (rows, cols) of a window, multiples of ``downscale``.
    stride : int
        Grid step of the windows' top-left corners, a multiple of ``downscale``.
    downscale : int
        Block size of the tissue mask.

    Returns
    -------
    list of FieldWindow
        In the order taken: the most tissue-rich first.
    """
    if shape[0] % downscale or shape[1] % downscale or stride % downscale or stride <= 0:
        raise ValueError(
            f"window shape {shape} and stride {stride} must be positive multiples of the mask block {downscale}"
        )
    if image.shape[0] < shape[0] or image.shape[1] < shape[1]:
        raise ValueError(f"image of shape {image.shape[:2]} is smaller than one {shape[1]}x{shape[0]} window")
    mask = tissue_mask(image, downscale)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    h, w, s = shape[0] // downscale, shape[1] // downscale, stride // downscale
    tops = np.arange(0, mask.shape[0] - h + 1, s)
    lefts = np.arange(0, mask.shape[1] - w + 1, s)
    top, left = np.meshgrid(tops, lefts, indexing="ij")
    tissue = integral[top + h, left + w] - integral[top, left + w] - integral[top + h, left] + integral[top, left]
    # Sort by tissue blocks (integers, so ties are exact), largest first, then row, then column.
    order = np.lexsort((left.ravel(), top.ravel(), -tissue.ravel()))
    taken: list[FieldWindow] = []
    for index in order:
        candidate = FieldWindow(
            row=int(top.flat[index]) * downscale,
            col=int(left.flat[index]) * downscale,
            tissue_fraction=float(tissue.flat[index]) / (h * w),
            shape=shape,
        )
        if not any(candidate.overlaps(other) for other in taken):
            taken.append(candidate)
            if len(taken) == n_fields:
                break
    return taken


# ------------------------------------------------------------------------------------------------ statistics


def quadratic_weighted_kappa(rater_a: Sequence[int], rater_b: Sequence[int], n_classes: int = 4) -> float:
    """Cohen's κ of two raters' ordinal ratings with quadratic weights.

    κ = 1 − Σ w·O / Σ w·E, with O the confusion matrix of the counts, E the outer product of its marginals
    divided by the number of items, and w_ij = (i − j)² / (n_classes − 1)².

    Parameters
    ----------
    rater_a, rater_b : sequences of int
        Ratings in ``range(n_classes)`` of the same items, in the same order.
    n_classes : int
        Number of ordered classes (4 for 0, 1+, 2+, 3+).

    Returns
    -------
    float
        κ in [-1, 1]; NaN when it is undefined (no items, or both raters gave every item the same class).
    """
    a = np.asarray(rater_a, dtype=np.int64)
    b = np.asarray(rater_b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"the raters must rate the same items: got {a.shape} and {b.shape} ratings")
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n_classes):
        raise ValueError(f"ratings must lie in range({n_classes})")
    if a.size == 0:
        return math.nan
    observed = np.zeros((n_classes, n_classes), dtype=np.float64)
    np.add.at(observed, (a, b), 1.0)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / a.size
    i, j = np.indices((n_classes, n_classes))
    weights = (i - j) ** 2 / (n_classes - 1) ** 2
    disagreement_expected = float((weights * expected).sum())
    if disagreement_expected == 0.0:
        return math.nan
    return 1.0 - float((weights * observed).sum()) / disagreement_expected


def match_cells(
    detected_rc: FloatArray, truth_centres_rc: FloatArray, truth_nuclei_rc: FloatArray, max_distance_px: float
) -> list[tuple[int, int]]:
    """Match detected cells to truth cells one to one, nearest pairs first.

    The distance of a detected cell to a truth cell is the smaller of its distances to the truth cell's centre
    and to its nucleus' centre; pairs farther apart than ``max_distance_px`` never match. Pairs are taken in
    order of distance (ties by detected, then truth index) when neither cell is taken yet.

    Parameters
    ----------
    detected_rc : (N, 2) float ndarray
        Detected cell positions (row, col), pixels.
    truth_centres_rc, truth_nuclei_rc : (M, 2) float ndarrays
        Truth cell centres and nucleus centres (row, col), pixels.
    max_distance_px : float
        Largest matching distance, pixels.

    Returns
    -------
    list of (int, int)
        (detected index, truth index) pairs, sorted by detected index.
    """
    detected = np.asarray(detected_rc, dtype=np.float64).reshape(-1, 2)
    centres = np.asarray(truth_centres_rc, dtype=np.float64).reshape(-1, 2)
    nuclei = np.asarray(truth_nuclei_rc, dtype=np.float64).reshape(-1, 2)
    if centres.shape != nuclei.shape:
        raise ValueError(f"{len(centres)} truth centres but {len(nuclei)} truth nuclei")
    if len(detected) == 0 or len(centres) == 0:
        return []
    pairs: list[tuple[float, int, int]] = []
    chunk = max(1, 4_000_000 // len(centres))
    for start in range(0, len(detected), chunk):
        part = detected[start : start + chunk, None, :]
        distance = np.minimum(
            np.hypot(*(part - centres[None]).transpose(2, 0, 1)), np.hypot(*(part - nuclei[None]).transpose(2, 0, 1))
        )
        det, tru = np.nonzero(distance <= max_distance_px)
        pairs.extend(zip(distance[det, tru].tolist(), (det + start).tolist(), tru.tolist(), strict=True))
    pairs.sort()
    used_detected: set[int] = set()
    used_truth: set[int] = set()
    matches: list[tuple[int, int]] = []
    for _, d, t in pairs:
        if d not in used_detected and t not in used_truth:
            used_detected.add(d)
            used_truth.add(t)
            matches.append((d, t))
    return sorted(matches)


def class_share_error(detected: Mapping[str, int], truth: Mapping[str, int]) -> float:
    """Mean over the four classes of |detected share − true share|, shares as fractions (0 cells: all shares 0)."""

    def shares(counts: Mapping[str, int]) -> list[float]:
        total = sum(counts.get(k, 0) for k in CLASSES)
        return [counts.get(k, 0) / total if total else 0.0 for k in CLASSES]

    return float(np.mean(np.abs(np.subtract(shares(detected), shares(truth)))))


# ------------------------------------------------------------------------------------------------ guideline


def case_rule(guideline: str) -> CaseRule:
    """The case rule of ``guideline`` ("breast" or "gastric"; a gastric case is a resection, scored by shares)."""
    return CaseRule(guideline=Guideline(guideline))


def score_label(result: CaseResult | FovResult | None) -> str:
    """The score of a result as printed: "0", "1+", "2+", "3+", or "n/a" (not assessable)."""
    if result is None or result.call.score is None:
        return "n/a"
    return result.call.score.value


# ------------------------------------------------------------------------------------------------ real cores


@dataclass(frozen=True, slots=True)
class Core:
    """One TMA core of the data folder: file name, the pathologist's score and the image (RGB)."""

    file: str
    pathologist: str
    image: RGBImage

    @property
    def label(self) -> str:
        """Short name: the pathologist's score."""
        return f"core {self.pathologist}"

    @property
    def slug(self) -> str:
        """File-name-safe label: core_0, core_1plus, ..."""
        return "core_" + self.pathologist.replace("+", "plus")


@dataclass(slots=True)
class CaseRun:
    """One core scored as a case under one guideline, with or without the control."""

    core: str
    pathologist: str
    guideline: str
    control: bool
    case: CaseResult
    fields: list[FovAnalysis] = field(default_factory=list)

    @property
    def ours(self) -> str:
        """Our case score, or "n/a"."""
        return score_label(self.case)

    @property
    def correct(self) -> bool:
        """Whether our case score is the pathologist's."""
        return self.ours == self.pathologist

    @property
    def not_assessable_fields(self) -> int:
        """Fields whose own call is "not assessable"."""
        return sum(1 for analysis in self.fields if analysis.result.call.score is None)

    def document(self) -> dict[str, Any]:
        """The run's figures as JSON-ready data."""
        return {
            "core": self.core,
            "pathologist": self.pathologist,
            "guideline": self.guideline,
            "control": self.control,
            "ours": self.ours,
            "correct": self.correct,
            "status": self.case.call.status.value,
            "reason": self.case.call.reason,
            "counts": self.case.counts.model_dump(by_alias=True),
            "percentages": self.case.percentages,
            "cells": self.case.counts.total,
            "not_assessable_fields": self.not_assessable_fields,
            "fields": [
                {
                    "score": score_label(analysis.result),
                    "counts": analysis.result.counts.model_dump(by_alias=True),
                    "warnings": list(analysis.result.warnings),
                }
                for analysis in self.fields
            ],
            "warnings": list(self.case.warnings),
        }


def load_cores(data: Path) -> list[Core]:
    """Read the cores listed in ``data/MANIFEST.tsv`` (columns ``file`` and ``ihc_score``), in score order."""
    manifest = data / "MANIFEST.tsv"
    with manifest.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    cores = []
    for row in rows:
        image = read_rgb(data / row["file"])
        if image.dtype != np.uint8:
            raise ValueError(f"{row['file']}: expected an 8-bit image, got {image.dtype}")
        cores.append(Core(file=row["file"], pathologist=row["ihc_score"], image=image.astype(np.uint8, copy=False)))
    order = {score: i for i, score in enumerate(CLASSES)}
    return sorted(cores, key=lambda core: order.get(core.pathologist, len(order)))


def control_core(cores: Sequence[Core]) -> Core:
    """The positive-control core: the pathologist's 3+ core."""
    for core in cores:
        if core.pathologist == "3+":
            return core
    raise SystemExit("error: no 3+ core in the manifest; the 3+ core is the positive control")


def score_cores(
    cores: Sequence[Core],
    windows: Mapping[str, Sequence[FieldWindow]],
    control_field: RGBImage,
    guideline: str,
    params: ScoringParams,
) -> tuple[list[CaseRun], ControlCalibration | None, list[str]]:
    """Score every core as a case of its fields under ``guideline``, with the control and without one.

    Returns
    -------
    runs : list of CaseRun
        Per core, the run with the control then the run without.
    calibration : ControlCalibration or None
        None when the control field could not be calibrated from (its runs then use no control).
    notes : list of str
        What the reader must know about this table (a calibration failure).
    """
    rule = case_rule(guideline)
    notes: list[str] = []
    calibration: ControlCalibration | None
    try:
        calibration = calibrate_from_control(control_field, PIXEL_SIZE_UM, params, rule=rule)
    except ValueError as error:
        calibration = None
        notes.append(f"the control field could not be calibrated from ({error}); no control was used")
    runs = []
    for core in cores:
        for control in _control_modes(calibration):
            fields = [
                analyse_fov(window.cut(core.image), PIXEL_SIZE_UM, params, control=control, rule=rule)
                for window in windows[core.file]
            ]
            case = score_case([analysis.result for analysis in fields], rule, control)
            runs.append(CaseRun(core.label, core.pathologist, guideline, control is not None, case, fields))
    return runs, calibration, notes


def agreement(runs: Sequence[CaseRun]) -> dict[str, Any]:
    """Exact matches, within-one-class matches and quadratic-weighted κ of ``runs`` against the pathologist."""
    index = {score: i for i, score in enumerate(CLASSES)}
    scored = [run for run in runs if run.ours in index]
    within_one = sum(1 for run in scored if abs(index[run.ours] - index[run.pathologist]) <= 1)
    kappa = quadratic_weighted_kappa([index[run.pathologist] for run in scored], [index[run.ours] for run in scored])
    return {
        "cores": len(runs),
        "exact": sum(1 for run in runs if run.correct),
        "within_one": within_one,
        "assessable": len(scored),
        "kappa": None if math.isnan(kappa) else kappa,
    }


def describe_rule() -> list[str]:
    """The field-cutting rule, as printed."""
    return [
        f"Fields: {N_FIELDS} windows of {FIELD_SHAPE[1]}x{FIELD_SHAPE[0]} px per core, by a fixed rule:",
        f"  tissue = {MASK_DOWNSCALE}x{MASK_DOWNSCALE} px blocks whose total OD above glass (glass = the "
        f"{GLASS_PERCENTILE:g}th percentile of each channel) exceeds {TISSUE_OD};",
        f"  windows on a {WINDOW_STRIDE_PX} px grid, wholly inside the image, taken greedily by tissue fraction "
        "(largest first, ties top-left first), never overlapping.",
        "Control: the 3+ core's first (most tissue-rich) field. With four cores, the 3+ core's own fields are "
        "scored with a control cut from that same core.",
    ]


def print_fields(cores: Sequence[Core], windows: Mapping[str, Sequence[FieldWindow]]) -> None:
    """Print every core's windows: corner (row, col) and tissue fraction."""
    for line in describe_rule():
        print(line)
    print("per core: f<k> (top row, left column) in core pixels, tissue fraction; f1 is taken first")
    for core in cores:
        spots = "  ".join(
            f"f{i + 1} ({w.row},{w.col}) {100 * w.tissue_fraction:.1f}%" for i, w in enumerate(windows[core.file])
        )
        print(f"{core.label:9} {core.image.shape[1]}x{core.image.shape[0]}  {spots}")


def print_cases(
    guideline: str, runs: Sequence[CaseRun], calibration: ControlCalibration | None, notes: Sequence[str]
) -> None:
    """Print one guideline's table of case scores and its summary."""
    print()
    print(f"Real cores, {guideline} guideline (5 fields per core as one case, {PIXEL_SIZE_UM} µm/px)")
    for note in notes:
        print(f"  note: {note}")
    if calibration is not None:
        qc = "passed" if calibration.qc_passed else "FAILED: " + "; ".join(calibration.warnings)
        print(
            f"  control: intense threshold {calibration.intense_threshold_od:.3f} OD, control scored "
            f"{calibration.control_score.value if calibration.control_score else 'n/a'}, QC {qc}"
        )
    header = (
        f"{'core':9} {'path.':>5} {'control':8} {'ours':>4} {'right':>5} {'0':>6} {'1+':>6} {'2+':>6} {'3+':>6} "
        f"{'cells':>6} {'n/a fields':>10}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        p = run.case.percentages
        print(
            f"{run.core:9} {run.pathologist:>5} {'3+ ctrl' if run.control else 'default':8} {run.ours:>4} "
            f"{'yes' if run.correct else 'NO':>5} {p['0']:5.1f}% {p['1+']:5.1f}% {p['2+']:5.1f}% {p['3+']:5.1f}% "
            f"{run.case.counts.total:6d} {run.not_assessable_fields:>7d}/{len(run.fields)}"
        )
    for control in (True, False):
        stats = agreement([run for run in runs if run.control == control])
        kappa = "undefined" if stats["kappa"] is None else f"{stats['kappa']:.3f}"
        print(
            f"summary {'with the 3+ control' if control else 'without a control':20}: exact {stats['exact']}/"
            f"{stats['cores']}, within one class {stats['within_one']}/{stats['cores']}, quadratic-weighted κ "
            f"{kappa} (over {stats['assessable']} assessable cores)"
        )


def write_overlay(path: Path, analysis: FovAnalysis, image: RGBImage, case: CaseResult | None) -> None:
    """Write ``analysis``'s overlay (default layers) composed over ``image`` at full resolution as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rgb(path, render_overlay(analysis, case).compose(image, DEFAULT_LAYERS))


def densest_window(
    cells_rc: FloatArray, field_shape: tuple[int, int], shape: tuple[int, int], stride: int
) -> tuple[int, int]:
    """Top-left (row, col) of the ``shape`` window, on a ``stride`` grid, holding the most cells (ties top-left)."""
    best = (-1, 0, 0)
    for row in range(0, field_shape[0] - shape[0] + 1, stride):
        in_rows = (cells_rc[:, 0] >= row) & (cells_rc[:, 0] < row + shape[0])
        for col in range(0, field_shape[1] - shape[1] + 1, stride):
            n = int(np.count_nonzero(in_rows & (cells_rc[:, 1] >= col) & (cells_rc[:, 1] < col + shape[1])))
            if n > best[0]:
                best = (n, row, col)
    return best[1], best[2]


def write_png(path: Path, rgb: RGBImage) -> None:
    """Write an RGB image as a PNG at the highest compression (documentation figures live in the repository)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise OSError(f"{path}: could not encode the image")
    path.write_bytes(encoded.tobytes())


def write_docs(
    cores: Sequence[Core], windows: Mapping[str, Sequence[FieldWindow]], runs: Sequence[CaseRun]
) -> list[Path]:
    """Write ``docs/real_cores/``: per core, the overlay of its field with the most tumour cells (calibrated run).

    Files: ``<core>_overlay.png`` (the field downscaled to ``DOCS_WIDTH`` px wide) and ``<core>_detail.png``
    (a 1:1 crop of ``DETAIL_SHAPE``, the crop of that field holding the most counted cells).
    """
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for core in cores:
        run = next(r for r in runs if r.pathologist == core.pathologist and r.control)
        best = max(range(len(run.fields)), key=lambda i: (run.fields[i].result.counts.total, -i))
        analysis = run.fields[best]
        image = windows[core.file][best].cut(core.image)
        height = round(image.shape[0] * DOCS_WIDTH / image.shape[1])
        small: RGBImage = np.asarray(
            cv2.resize(image, (DOCS_WIDTH, height), interpolation=cv2.INTER_AREA), dtype=np.uint8
        )
        overlay = render_overlay(analysis, run.case, width=DOCS_WIDTH).compose(small, DEFAULT_LAYERS)
        path = DOCS_DIR / f"{core.slug}_overlay.png"
        write_png(path, overlay)
        written.append(path)
        cells = np.array([[c.row, c.col] for c in analysis.result.cells], dtype=np.float64).reshape(-1, 2)
        # The panel sits in the top-left corner; the crop is the densest in cells, found on a 20 px grid.
        row, col = densest_window(cells, image.shape[:2], DETAIL_SHAPE, DETAIL_STRIDE_PX)
        full = render_overlay(analysis, run.case).compose(image, ("cells", "completeness", "region"))
        path = DOCS_DIR / f"{core.slug}_detail.png"
        write_png(path, np.ascontiguousarray(full[row : row + DETAIL_SHAPE[0], col : col + DETAIL_SHAPE[1]]))
        written.append(path)
        print(f"{core.label}: field f{best + 1} ({analysis.result.counts.total} cells), detail at ({row},{col})")
    return written


# ------------------------------------------------------------------------------------------------ synthetic


@dataclass(frozen=True, slots=True)
class SyntheticFigures:
    """The figures of one synthetic field scored under one guideline, with or without the control."""

    batch_strength: float
    mix: str
    guideline: str
    control: bool
    n_truth: int
    n_detected: int
    class_share_error: float
    count_ratio: float
    found: float
    in_class: float
    false_positives: int
    false_positives_on_other_nuclei: int
    ours: str
    truth_call: str


@dataclass(frozen=True, slots=True)
class NonTumourFigures:
    """The call on a field without tumour cells; ``ours`` is None when the generator cannot render that field."""

    kind: str
    guideline: str
    control: bool
    ours: str | None
    cells: int

    @property
    def passed(self) -> bool:
        """Whether the field was called "not assessable", as it must be."""
        return self.ours == "n/a"


def fov_figures(
    fov: synthetic.SyntheticFov, result: FovResult, guideline: str, rule: CaseRule, params: ScoringParams
) -> dict[str, Any]:
    """Class-share error, count ratio and per-cell agreement of ``result`` against ``fov``'s truth."""
    truth_classes = [cell.truth_class(guideline) for cell in fov.cells]
    truth_counts = {k: truth_classes.count(k) for k in CLASSES}
    detected_counts = {k: result.counts[k] for k in CLASSES}
    detected = np.array([[c.row, c.col] for c in result.cells], dtype=np.float64).reshape(-1, 2)
    centres = np.array([[c.row, c.col] for c in fov.cells], dtype=np.float64).reshape(-1, 2)
    nuclei = np.array([[c.nucleus_row, c.nucleus_col] for c in fov.cells], dtype=np.float64).reshape(-1, 2)
    radius_px = MATCH_RADIUS_CELLS * params.tumour_cell_diameter_um / fov.pixel_size_um
    matches = match_cells(detected, centres, nuclei, radius_px)
    same = sum(1 for d, t in matches if result.cells[d].her2_class.value == truth_classes[t])
    n_truth = len(fov.cells)
    truth_call = call_score(ClassCounts.model_validate(truth_counts), rule)
    # False positives on a lymphocyte, fibroblast or smooth-muscle nucleus of the truth.
    unmatched = np.delete(detected, [d for d, _ in matches], axis=0)
    other_rc = np.array([[n.row, n.col] for n in fov.other_nuclei], dtype=np.float64).reshape(-1, 2)
    on_others = len(match_cells(unmatched, other_rc, other_rc, radius_px))
    return {
        "n_truth": n_truth,
        "n_detected": len(result.cells),
        "class_share_error": class_share_error(detected_counts, truth_counts),
        "count_ratio": len(result.cells) / n_truth if n_truth else math.nan,
        "found": len(matches) / n_truth if n_truth else math.nan,
        "in_class": same / len(matches) if matches else math.nan,
        "false_positives": len(result.cells) - len(matches),
        "false_positives_on_other_nuclei": on_others,
        "truth_call": truth_call.score.value if truth_call.score else "n/a",
    }


GENERATOR_NOTE: Final = (
    "generator: render_hard_fov / render_hard_control (ring gaps, basolateral/lateral gland cells, pale and crowded "
    f"nuclei, lymphocytes, fibroblasts, vignetting); mixes are true shares under the {MIX_GUIDELINE} guideline"
)


def render_tumour_field(
    batch_strength: float, mix: Mapping[str, float], seed: int, shape: tuple[int, int] = FIELD_SHAPE
) -> synthetic.SyntheticFov:
    """Render one hard synthetic tumour field of ``mix`` (true shares under ``MIX_GUIDELINE``)."""
    return synthetic.render_hard_fov(
        shape, PIXEL_SIZE_UM, dict(mix), batch_strength=batch_strength, seed=seed, guideline=MIX_GUIDELINE
    )


def render_synthetic_control(
    batch_strength: float, seed: int, shape: tuple[int, int] = FIELD_SHAPE
) -> synthetic.SyntheticFov:
    """Render a hard synthetic 3+ positive control at ``batch_strength``."""
    return synthetic.render_hard_control(shape, PIXEL_SIZE_UM, batch_strength=batch_strength, seed=seed)


def render_non_tumour(kind: str, seed: int, shape: tuple[int, int] = FIELD_SHAPE) -> RGBImage | None:
    """Render a hard field without tumour cells of ``kind``, or None when the generator has no such tissue."""
    if kind == "tumour" or kind not in synthetic.TISSUES:
        return None
    return synthetic.render_hard_fov(shape, PIXEL_SIZE_UM, tissue=kind, seed=seed).rgb


def run_synthetic(
    guidelines: Sequence[str],
    params: ScoringParams,
    strengths: Sequence[float] = BATCH_STRENGTHS,
    mixes: Mapping[str, Mapping[str, float]] = CLASS_MIXES,
    non_tumour: Sequence[str] = NON_TUMOUR_FIELDS,
    shape: tuple[int, int] = FIELD_SHAPE,
) -> tuple[list[SyntheticFigures], list[NonTumourFigures], list[str]]:
    """Render, score and measure the synthetic fields (see the module docstring).

    Returns
    -------
    figures : per field, guideline and control mode
    non_tumour : per non-tumour field, guideline and control mode
    notes : what the reader must know (the generator used, fields it cannot render, calibration failures)
    """
    rules = {g: case_rule(g) for g in guidelines}
    notes = [GENERATOR_NOTE]
    figures: list[SyntheticFigures] = []
    controls: dict[float, dict[str, ControlCalibration | None]] = {}
    for s_index, strength in enumerate(strengths):
        control_rgb = render_synthetic_control(strength, seed=900 + s_index, shape=shape).rgb
        controls[strength] = {}
        for guideline in guidelines:
            try:
                controls[strength][guideline] = calibrate_from_control(
                    control_rgb, PIXEL_SIZE_UM, params, rule=rules[guideline]
                )
            except ValueError as error:
                controls[strength][guideline] = None
                notes.append(f"batch {strength}: the synthetic control could not be calibrated from ({error})")
        for m_index, (mix_name, mix) in enumerate(mixes.items()):
            fov = render_tumour_field(strength, mix, seed=100 * s_index + m_index, shape=shape)
            for guideline in guidelines:
                rule = rules[guideline]
                for control in _control_modes(controls[strength][guideline]):
                    result = analyse_fov(fov.rgb, PIXEL_SIZE_UM, params, control=control, rule=rule).result
                    numbers = fov_figures(fov, result, guideline, rule, params)
                    figures.append(
                        SyntheticFigures(
                            batch_strength=strength,
                            mix=mix_name,
                            guideline=guideline,
                            control=control is not None,
                            ours=score_label(result),
                            **numbers,
                        )
                    )
    calls: list[NonTumourFigures] = []
    reference_control = controls.get(1.0) or next(iter(controls.values()), {})
    for k_index, kind in enumerate(non_tumour):
        image = render_non_tumour(kind, seed=700 + k_index, shape=shape)
        if image is None:
            notes.append(f"the synthetic generator has no {kind} field: not scored")
        for guideline in guidelines:
            rule = rules[guideline]
            for control in _control_modes(reference_control.get(guideline)):
                if image is None:
                    calls.append(NonTumourFigures(kind, guideline, control is not None, None, 0))
                    continue
                result = analyse_fov(image, PIXEL_SIZE_UM, params, control=control, rule=rule).result
                calls.append(NonTumourFigures(kind, guideline, control is not None, score_label(result), result.total))
    return figures, calls, notes


def _control_modes(calibration: ControlCalibration | None) -> tuple[ControlCalibration | None, ...]:
    """The controls to score with: the calibration then none, or only none when there is no calibration."""
    return (calibration, None) if calibration is not None else (None,)


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def print_synthetic(
    guideline: str, figures: Sequence[SyntheticFigures], calls: Sequence[NonTumourFigures], notes: Sequence[str]
) -> None:
    """Print one guideline's synthetic per-field table, its averages and the non-tumour calls."""
    print()
    print(
        f"Synthetic fields, {guideline} guideline ({FIELD_SHAPE[1]}x{FIELD_SHAPE[0]} at {PIXEL_SIZE_UM} µm/px; "
        "control: a synthetic 3+ control of the same batch strength)"
    )
    for note in notes:
        print(f"  note: {note}")
    header = (
        f"{'batch':>5} {'mix':8} {'control':8} {'truth':>5} {'cells':>5} {'ratio':>5} {'share err':>9} "
        f"{'found':>5} {'in class':>8} {'FP':>4} {'FP oth':>6} {'ours':>4} {'truth call':>10}"
    )
    print(header)
    print("-" * len(header))
    rows = [f for f in figures if f.guideline == guideline]
    for f in rows:
        print(
            f"{f.batch_strength:5.2f} {f.mix:8} {'3+ ctrl' if f.control else 'default':8} {f.n_truth:5d} "
            f"{f.n_detected:5d} {f.count_ratio:5.2f} {f.class_share_error:9.3f} {f.found:5.2f} {f.in_class:8.2f} "
            f"{f.false_positives:4d} {f.false_positives_on_other_nuclei:6d} {f.ours:>4} {f.truth_call:>10}"
        )
    print("averages:")
    for control in (True, False):
        for strength in (None, *sorted({f.batch_strength for f in rows})):
            group = [f for f in rows if f.control == control and (strength is None or f.batch_strength == strength)]
            if not group:
                continue
            right = sum(1 for f in group if f.ours == f.truth_call)
            print(
                f"  {'3+ ctrl' if control else 'default':8} batch "
                f"{'all' if strength is None else f'{strength:.2f}':>4}:"
                f" share err {_mean(f.class_share_error for f in group):.3f}, count ratio "
                f"{_mean(f.count_ratio for f in group):.2f}, found {_mean(f.found for f in group):.2f}, in class "
                f"{_mean(f.in_class for f in group):.2f}, FP {_mean(f.false_positives for f in group):.0f}/field "
                f"({_mean(f.false_positives_on_other_nuclei for f in group):.0f} on other nuclei), "
                f"field calls right {right}/{len(group)}"
            )
    print("fields without tumour (must be 'not assessable'):")
    for call in (c for c in calls if c.guideline == guideline):
        verdict = "not rendered" if call.ours is None else ("ok" if call.passed else "WRONG")
        ours = "-" if call.ours is None else call.ours
        print(
            f"  {call.kind:12} {'3+ ctrl' if call.control else 'default':8} call {ours:>4}  "
            f"cells {call.cells:5d}  {verdict}"
        )


# ------------------------------------------------------------------------------------------------ main


def _jsonable(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _relative(path: Path) -> str:
    try:
        return os.path.relpath(path.absolute(), ROOT)
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the process exit status (2: the data folder is missing)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the cores and MANIFEST.tsv")
    parser.add_argument("--guideline", choices=("breast", "gastric", "both"), default="both")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--real-only", action="store_true", help="only the real cores")
    only.add_argument("--synthetic-only", action="store_true", help="only the synthetic fields")
    only.add_argument("--fields-only", action="store_true", help="only print the real cores' field windows")
    only.add_argument("--docs", action="store_true", help="only regenerate the overlays of docs/real_cores/")
    parser.add_argument("--overlay-dir", type=Path, help="write every real field's overlay here (PNG)")
    parser.add_argument("--json", type=Path, help="write all figures to this JSON file")
    parser.add_argument(
        "--membrane-method",
        choices=[m.value for m in MembraneMethod],
        default=ScoringParams().membrane_method.value,
        help="how membranes are measured (default: the configuration's default)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    guidelines = list(GUIDELINES) if args.guideline == "both" else [args.guideline]
    params = ScoringParams(membrane_method=MembraneMethod(args.membrane_method))
    print(f"membrane method: {params.membrane_method.value}")
    document: dict[str, Any] = {
        "pixel_size_um": PIXEL_SIZE_UM,
        "guidelines": guidelines,
        "field_rule": " ".join(describe_rule()),
    }

    if not args.synthetic_only:
        if not (args.data / "MANIFEST.tsv").is_file():
            print(
                f"error: no TMA data at {args.data} (expected MANIFEST.tsv and the core JPEGs there); "
                "give the folder with --data DIR, or use --synthetic-only",
                file=sys.stderr,
            )
            return 2
        cores = load_cores(args.data)
        windows = {core.file: field_windows(core.image) for core in cores}
        print(f"data: {_relative(args.data)} ({len(cores)} cores)")
        print_fields(cores, windows)
        document["fields"] = {
            core.pathologist: {"file": core.file, "windows": [asdict(w) for w in windows[core.file]]} for core in cores
        }
        if not args.fields_only:
            positive = control_core(cores)
            control_field = windows[positive.file][0].cut(positive.image)
            if args.docs:
                runs, _, notes = score_cores(cores, windows, control_field, "gastric", params)
                for note in notes:
                    print(f"note: {note}")
                for path in write_docs(cores, windows, runs):
                    print(f"wrote {_relative(path)}")
                return 0
            document["real"] = {}
            for guideline in guidelines:
                runs, calibration, notes = score_cores(cores, windows, control_field, guideline, params)
                print_cases(guideline, runs, calibration, notes)
                document["real"][guideline] = {
                    "notes": notes,
                    "control": None if calibration is None else calibration.model_dump(mode="json"),
                    "cores": [run.document() for run in runs],
                    "summary": {
                        "with_control": agreement([r for r in runs if r.control]),
                        "without_control": agreement([r for r in runs if not r.control]),
                    },
                }
                if args.overlay_dir is not None:
                    for run in runs:
                        core = next(c for c in cores if c.pathologist == run.pathologist)
                        mode = "control" if run.control else "default"
                        for i, analysis in enumerate(run.fields):
                            name = f"{core.slug}_f{i + 1}_{guideline}_{mode}.png"
                            write_overlay(
                                args.overlay_dir / name, analysis, windows[core.file][i].cut(core.image), run.case
                            )
                    print(f"overlays written to {args.overlay_dir}")

    if not (args.real_only or args.fields_only):
        figures, calls, notes = run_synthetic(guidelines, params)
        for guideline in guidelines:
            print_synthetic(guideline, figures, calls, notes)
        document["synthetic"] = {
            "notes": notes,
            "batch_strengths": list(BATCH_STRENGTHS),
            "mixes": {name: dict(mix) for name, mix in CLASS_MIXES.items()},
            "fields": [asdict(f) for f in figures],
            "non_tumour": [{**asdict(c), "passed": c.passed} for c in calls],
        }

    elapsed = time.perf_counter() - started
    document["runtime_s"] = elapsed
    print(f"\nruntime {elapsed:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(_jsonable(document), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
