"""The application configuration: one TOML file, validated by frozen models that name a bad field and value."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config.daemon import DaemonConfig
from config.scoring import CaseRule, ScoringParams


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message names the file, field and value."""


class OpticsConfig(BaseModel):
    """The camera on the microscope: the pixel size in the specimen plane for the objective in use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pixel_size_um: float = Field(0.25, gt=0.05, le=5.0, description="µm per camera pixel (40x ≈ 0.25, 20x ≈ 0.5)")


class AppConfig(BaseModel):
    """Everything her2scope reads from its configuration file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    optics: OpticsConfig = OpticsConfig()
    scoring: ScoringParams = ScoringParams()
    case_rule: CaseRule = CaseRule()
    daemon: DaemonConfig = DaemonConfig()


def default_config_text() -> str:
    """The shipped default configuration file, with its comments."""
    return resources.files("config").joinpath("default.toml").read_text(encoding="utf-8")


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
