"""Frozen result models of per-FOV and per-case scoring; they serialise to the documented JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from her2scope.config.scoring import Guideline, Specimen


class Her2Score(StrEnum):
    """An ASCO/CAP HER2 IHC score, of one cell, one FOV or one case."""

    ZERO = "0"
    ONE_PLUS = "1+"
    TWO_PLUS = "2+"
    THREE_PLUS = "3+"


HER2_SCORES: tuple[Her2Score, ...] = tuple(Her2Score)


class Her2Status(StrEnum):
    """What the IHC score means for the patient's HER2 status (ASCO/CAP 2018/2023)."""

    NEGATIVE = "negative"
    EQUIVOCAL = "equivocal, reflex ISH"
    POSITIVE = "positive"
    NOT_ASSESSABLE = "not assessable"


class Her2ZeroSubtype(StrEnum):
    """The 2025 international consensus split of IHC 0."""

    NULL = "null"
    ULTRALOW = "ultralow"


class ThresholdSource(StrEnum):
    """Where the intense (or weak) DAB threshold of a result came from."""

    DEFAULT = "default"
    CONTROL = "positive control"
    CONTROL_REGION = "positive control region"
    REGION = "selected region"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClassCounts(_Frozen):
    """Tumour cells per HER2 class; serialised with the keys "0", "1+", "2+", "3+"."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    zero: int = Field(0, ge=0, alias="0")
    one_plus: int = Field(0, ge=0, alias="1+")
    two_plus: int = Field(0, ge=0, alias="2+")
    three_plus: int = Field(0, ge=0, alias="3+")

    @property
    def total(self) -> int:
        """All counted tumour cells."""
        return self.zero + self.one_plus + self.two_plus + self.three_plus

    def __getitem__(self, score: Her2Score | str) -> int:
        return {
            Her2Score.ZERO: self.zero,
            Her2Score.ONE_PLUS: self.one_plus,
            Her2Score.TWO_PLUS: self.two_plus,
            Her2Score.THREE_PLUS: self.three_plus,
        }[Her2Score(score)]

    def at_least(self, score: Her2Score | str) -> int:
        """Cells of class ``score`` or higher (a higher class also meets a lower one's description)."""
        lowest = HER2_SCORES.index(Her2Score(score))
        return sum(self[s] for s in HER2_SCORES[lowest:])

    def __add__(self, other: ClassCounts) -> ClassCounts:
        return ClassCounts(
            zero=self.zero + other.zero,
            one_plus=self.one_plus + other.one_plus,
            two_plus=self.two_plus + other.two_plus,
            three_plus=self.three_plus + other.three_plus,
        )

    def percentages(self) -> dict[str, float]:
        """Share of each class in percent of all counted cells (all 0.0 when there are none)."""
        total = self.total
        return {s.value: (100.0 * self[s] / total if total else 0.0) for s in HER2_SCORES}


class ScoreCall(_Frozen):
    """The case's guideline applied to a set of counts: score, status and the HER2-low / ultralow reading."""

    score: Her2Score | None = Field(description="None when too few tumour cells were counted to score")
    status: Her2Status
    her2_low: bool = Field(description="1+, or 2+ pending ISH (HER2-low if ISH is negative)")
    zero_subtype: Her2ZeroSubtype | None = Field(description="null / ultralow for a score of 0, else None")
    reason: str = Field(description="Which branch of the rule decided, in words")
    guideline: Guideline = Field(Guideline.BREAST, description="The guideline whose rule made this call")
    specimen: Specimen = Field(Specimen.RESECTION, description="The specimen kind the rule was applied for")


class MembranePattern(StrEnum):
    """Where a cell's membrane is stained, in the guidelines' words."""

    COMPLETE = "complete"
    BASOLATERAL = "basolateral"
    LATERAL = "lateral"
    PARTIAL = "partial"
    NONE = "none"


class Cell(_Frozen):
    """One counted tumour cell: its position in FOV pixels, its class, and (per-cell method) its measures.

    The ring is ``N`` rays cast from the nucleus centre (``row``, ``col``) at angles 2πk/N, k = 0.., measured from
    the +col axis towards +row: ``ring_radii_um[k]`` is where ray k crosses the membrane (or ends, unstained), and
    ``ring_levels[k]`` is "0" unstained, "1" weak to moderate, "2" intense there. The contour-hierarchy method
    leaves the measures empty.
    """

    row: float
    col: float
    her2_class: Her2Score
    pattern: MembranePattern | None = Field(None, description="Where the membrane is stained (weak level or above)")
    completeness: float | None = Field(None, ge=0.0, le=1.0, description="Share of the ring stained")
    intense_completeness: float | None = Field(None, ge=0.0, le=1.0, description="Share of the ring intense")
    membrane_od: float | None = Field(None, description="Median DAB OD of the ring where stained")
    nucleus_area_um2: float | None = None
    ring_radii_um: tuple[float, ...] = ()
    ring_levels: str = ""

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence[Any]]) -> tuple[Cell, ...]:
        """Cells from one column of values per field, values the scorer made and that are valid by construction.

        What :meth:`model_construct` does without its per-field work, which costs more than measuring the cells
        (a 20x FOV has 1,500–3,000): the instances are set up as ``model_construct`` sets them up (a test compares
        the two). Every field must have a column, all of the same length.
        """
        names = tuple(cls.model_fields)
        if set(columns) != set(names):
            raise ValueError(f"Cell.from_columns needs a column for each of {', '.join(names)}")
        fields_set = set(names)
        new, assign = object.__new__, object.__setattr__
        cells = []
        for values in zip(*(columns[name] for name in names), strict=True):
            cell = new(cls)
            assign(cell, "__dict__", dict(zip(names, values, strict=True)))
            assign(cell, "__pydantic_fields_set__", fields_set)
            assign(cell, "__pydantic_extra__", None)
            assign(cell, "__pydantic_private__", None)
            cells.append(cell)
        return tuple(cells)


class ControlCalibration(_Frozen):
    """The intense DAB threshold derived from the positive control, and the control's own quality check."""

    intense_threshold_od: float = Field(gt=0.0)
    source: ThresholdSource
    membrane_ridge_od: float = Field(
        description="The control's intense level: per-cell method, the median ring OD of its stained tumour cells; "
        "contour method, the mean DAB OD of its stained membrane pixels over the percentile range"
    )
    percentile_range: tuple[float, float]
    n_membrane_pixels: int
    control_counts: ClassCounts
    control_score: Her2Score | None
    qc_passed: bool
    warnings: tuple[str, ...] = ()


class FovResult(_Frozen):
    """Everything scored on one FOV, in FOV pixel coordinates."""

    counts: ClassCounts
    percentages: dict[str, float]
    call: ScoreCall
    cells: tuple[Cell, ...]
    n_excluded_nuclei: int = Field(
        description="Nuclei counted in no class: per-cell method, nuclei that are not tumour (stroma, muscle, "
        "lymphocytes); contour-hierarchy method, clear nuclei next to intense staining"
    )
    weak_threshold_od: float
    intense_threshold_od: float
    intense_threshold_source: ThresholdSource
    pixel_size_um: float
    analysis_pixel_size_um: float
    tumour_area_mm2: float
    stain_vectors: tuple[tuple[float, float, float], tuple[float, float, float]]
    warnings: tuple[str, ...] = ()
    clusters: ClassCounts = Field(
        ClassCounts(),
        description="Per class k: the largest cohesive cluster of cells of class k or higher in this FOV",
    )

    @property
    def total(self) -> int:
        """All counted tumour cells of the FOV."""
        return self.counts.total


class CaseResult(_Frozen):
    """The case score over all included FOVs of a case."""

    counts: ClassCounts
    percentages: dict[str, float]
    call: ScoreCall
    n_fovs: int
    control: ControlCalibration | None
    warnings: tuple[str, ...] = ()
