"""The application configuration: one TOML file, validated by frozen models that name a bad field and value."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from her2scope.config.daemon import DaemonConfig
from her2scope.config.limits import LimitsConfig
from her2scope.config.scoring import MAX_PIXEL_SIZE_UM, MIN_PIXEL_SIZE_UM, CaseRule, PixelSize, ScoringParams


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message names the file, field and value."""


class OpticsConfig(BaseModel):
    """The camera on the microscope: the pixel size in the specimen plane of each objective, and the one in use.

    ``pixel_size_um = X`` alone is short for a microscope with one objective of that pixel size.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    objectives: dict[str, PixelSize] = Field(
        default_factory=lambda: {"20x": 0.5, "40x": 0.25},
        description="µm per camera pixel for each objective (camera and relay lens included): measure yours with a "
        "stage micrometer",
    )
    objective: str = Field("40x", description="The objective in use at start (the control endpoint can change it)")

    @model_validator(mode="before")
    @classmethod
    def _single_pixel_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and "pixel_size_um" in data:
            if "objectives" in data or "objective" in data:
                raise ValueError("give either pixel_size_um (one objective) or objectives and objective, not both")
            value = data["pixel_size_um"]
            in_range = isinstance(value, (int, float)) and MIN_PIXEL_SIZE_UM < value <= MAX_PIXEL_SIZE_UM
            if isinstance(value, bool) or not in_range:
                raise ValueError(
                    f"pixel_size_um = {value!r} must be a number of µm per pixel in ({MIN_PIXEL_SIZE_UM}, "
                    f"{MAX_PIXEL_SIZE_UM:g}] (40x ≈ 0.25, 20x ≈ 0.5)"
                )
            rest = {k: v for k, v in data.items() if k != "pixel_size_um"}
            return {**rest, "objectives": {"objective": data["pixel_size_um"]}, "objective": "objective"}
        return data

    @model_validator(mode="after")
    def _objective_is_known(self) -> OpticsConfig:
        if not self.objectives:
            raise ValueError("objectives must name at least one objective and its pixel size")
        if self.objective not in self.objectives:
            known = ", ".join(repr(name) for name in self.objectives)
            raise ValueError(f"objective {self.objective!r} is not one of the objectives ({known})")
        return self

    @property
    def pixel_size_um(self) -> float:
        """µm per camera pixel with the objective in use."""
        return self.objectives[self.objective]


class AppConfig(BaseModel):
    """Everything her2scope reads from its configuration file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    optics: OpticsConfig = OpticsConfig()
    scoring: ScoringParams = ScoringParams()
    case_rule: CaseRule = CaseRule()
    daemon: DaemonConfig = DaemonConfig()
    limits: LimitsConfig = LimitsConfig()


def default_config_text() -> str:
    """The shipped default configuration file, with its comments."""
    return resources.files("her2scope.config").joinpath("default.toml").read_text(encoding="utf-8")


def load_config(path: Path | None = None) -> AppConfig:
    """Load and validate ``path`` (the shipped default when None).

    Raises
    ------
    ConfigError
        Unreadable file, TOML syntax error, or a field that fails validation (named with its value).
    """
    source = "default configuration" if path is None else str(path)
    try:
        text = default_config_text() if path is None else path.read_text(encoding="utf-8")
        document = tomllib.loads(text)
    except OSError as error:
        raise ConfigError(f"{source}: cannot read ({error.strerror or error})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from None
    try:
        return AppConfig.model_validate(document)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = ".".join(str(part) for part in item["loc"]) or "(top level)"
            value = f" = {item['input']!r}" if "input" in item and not isinstance(item["input"], dict) else ""
            problems.append(f"{field}{value}: {item['msg']}")
        raise ConfigError(f"{source}: invalid configuration: " + "; ".join(problems)) from None
