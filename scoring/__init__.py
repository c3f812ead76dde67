"""Pure, explainable HER2 IHC scoring: arrays and frozen parameters in, frozen results out.

No I/O, logging, clocks or sockets here; the daemon and the clients do those.
"""

from her2scope.scoring.calibration import calibrate_from_control, weak_threshold_from_region
from her2scope.scoring.case import call_score, score_case
from her2scope.scoring.pipeline import FovAnalysis, analyse_fov, score_fov
from her2scope.scoring.results import (
    CaseResult,
    Cell,
    ClassCounts,
    ControlCalibration,
    FovResult,
    Her2Score,
    Her2Status,
    Her2ZeroSubtype,
    ScoreCall,
    ThresholdSource,
)

__all__ = [
    "CaseResult",
    "Cell",
    "ClassCounts",
    "ControlCalibration",
    "FovAnalysis",
    "FovResult",
    "Her2Score",
    "Her2Status",
    "Her2ZeroSubtype",
    "ScoreCall",
    "ThresholdSource",
    "analyse_fov",
    "calibrate_from_control",
    "call_score",
    "score_case",
    "score_fov",
    "weak_threshold_from_region",
]
