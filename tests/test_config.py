"""Configuration loading and validation: config/app.py and config/scoring.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from her2scope.config.app import AppConfig, ConfigError, OpticsConfig, default_config_text, load_config
from her2scope.config.scoring import CaseRule, ScoringParams, StainVectors


def write(tmp_path: Path, text: str, name: str = "her2scope.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# The shipped default
# ----------------------------------------------------------------------------------------------------


def test_default_config_equals_model_defaults() -> None:
    assert load_config(None) == AppConfig()
    assert load_config() == AppConfig()


def test_default_toml_lists_every_field_with_its_default() -> None:
    # "Every field is optional; a missing one takes the value shown here": the file must show all of them.
    document = tomllib.loads(default_config_text())
    assert document == AppConfig().model_dump(mode="json", exclude_none=True)  # TOML has no null: unset = absent


def test_explicit_default_file_loads_the_same(tmp_path: Path) -> None:
    path = write(tmp_path, default_config_text())
    assert load_config(path) == AppConfig()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == AppConfig()


def test_partial_file_overrides_only_its_fields(tmp_path: Path) -> None:
    text = "[case_rule]\nmin_tumour_cells = 50\n\n[scoring.stains]\nestimate_from_image = true\n"
    path = write(tmp_path, text)
    config = load_config(path)
    assert config.case_rule == CaseRule(min_tumour_cells=50)
    assert config.scoring.stains == StainVectors(estimate_from_image=True)
    assert config.scoring.weak_threshold_od == ScoringParams().weak_threshold_od
    assert config.optics == OpticsConfig()


def test_tuples_load_from_toml_arrays(tmp_path: Path) -> None:
    path = write(tmp_path, "[scoring]\ncontrol_percentile_range = [40.0, 90.0]\n")
    assert load_config(path).scoring.control_percentile_range == (40.0, 90.0)


# ----------------------------------------------------------------------------------------------------
# Errors name the file, the field and the value
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[scoring]\nweak_treshold_od = 0.1\n", "scoring.weak_treshold_od"),
        ("[case_rule]\ncutoff = 10.0\n", "case_rule.cutoff"),
        ("[scoring.stains]\neosin = [0.1, 0.2, 0.3]\n", "scoring.stains.eosin"),
        ("[optic]\npixel_size_um = 0.25\n", "optic"),
        ("pixel_size_um = 0.25\n", "pixel_size_um"),
    ],
)
def test_unknown_field_is_an_error_naming_it(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert field in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("[scoring]\nweak_threshold_od = -1\n", "scoring.weak_threshold_od", "-1"),
        ("[scoring]\nweak_threshold_od = 3.5\n", "scoring.weak_threshold_od", "3.5"),
        ("[scoring]\nweak_threshold_od = 'faint'\n", "scoring.weak_threshold_od", "'faint'"),
        ("[optics]\npixel_size_um = 0\n", "optics", "pixel_size_um = 0 "),
        ("[optics]\npixel_size_um = 50.0\n", "optics", "pixel_size_um = 50.0 "),
        ('[optics]\nobjectives = {"20x" = 9.0}\nobjective = "20x"\n', "optics.objectives.20x", "9.0"),
        ('[optics]\nobjective = "60x"\n', "optics", "objective '60x' is not one of the objectives ('20x', '40x')"),
        ("[case_rule]\nmin_tumour_cells = 0\n", "case_rule.min_tumour_cells", "0"),
        ("[case_rule]\ncutoff_percent = 120.0\n", "case_rule.cutoff_percent", "120.0"),
        ("[scoring]\nmembrane_width_um = -2.0\n", "scoring.membrane_width_um", "-2.0"),
        # Cross-field checks: the message comes from the model validator and names the fields and values.
        ("[scoring]\nmin_cell_diameter_um = 40.0\n", "min_cell_diameter_um", "40.0"),
        ("[scoring]\nmin_cell_diameter_um = 30.0\n", "max_cell_diameter_um", "30.0"),
        ("[scoring]\ntumour_cell_diameter_um = 4.0\n", "tumour_cell_diameter_um", "4.0"),
        ("[scoring]\ncontrol_percentile_range = [95.0, 50.0]\n", "control_percentile_range", "(95.0, 50.0)"),
        ("[scoring]\nweak_threshold_od = 0.5\n", "weak_threshold_od", "0.5"),
    ],
)
def test_wrong_value_names_field_and_value(tmp_path: Path, text: str, field: str, value: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid configuration: ")
    assert field in message
    assert value in message


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "[optics]\npixel_size_um = 0\n\n[case_rule]\nmin_tumour_cells = -5\nbogus = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for part in ("optics: Value error, pixel_size_um = 0", "case_rule.min_tumour_cells = -5", "case_rule.bogus = 1"):
        assert part in message


def test_broken_toml_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, "[scoring\nweak_threshold_od = 0.1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("# pixel size in \xb5m\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (AppConfig(), "optics", OpticsConfig()),
        (OpticsConfig(), "pixel_size_um", 0.5),
        (ScoringParams(), "weak_threshold_od", 0.2),
        (StainVectors(), "estimate_from_image", True),
        (CaseRule(), "min_tumour_cells", 10),
    ],
)
def test_models_are_frozen(model: BaseModel, field: str, value: object) -> None:
    before = getattr(model, field)
    with pytest.raises(ValidationError, match="frozen"):
        setattr(model, field, value)
    assert getattr(model, field) == before


@pytest.mark.parametrize("model", [AppConfig, OpticsConfig, ScoringParams, StainVectors, CaseRule])
def test_models_reject_unknown_keyword(model: type[BaseModel]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        model(not_a_field=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dab": (0.65, 0.704, 0.286)}, "parallel"),  # identical to haematoxylin
        ({"dab": (1.30, 1.408, 0.572)}, "parallel"),  # same direction, twice as long
        ({"dab": (-0.268, 0.57, 0.776)}, "non-negative"),
        ({"haematoxylin": (0.65, -0.01, 0.286)}, "non-negative"),
        ({"dab": (0.268, float("inf"), 0.776)}, "finite"),
        ({"haematoxylin": (float("nan"), 0.704, 0.286)}, "finite"),
        ({"dab": (0.0, 0.0, 0.0)}, "non-zero"),
    ],
)
def test_stain_vectors_rejected(kwargs: dict[str, tuple[float, float, float]], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        StainVectors(**kwargs)


def test_stain_vectors_accepted() -> None:
    vectors = StainVectors(haematoxylin=(0.6, 0.7, 0.3), dab=(0.3, 0.6, 0.7))
    assert vectors.dab == (0.3, 0.6, 0.7)


def test_parallel_stain_vectors_through_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[scoring.stains]\ndab = [0.65, 0.704, 0.286]\n")
    with pytest.raises(ConfigError, match=r"scoring\.stains.*parallel"):
        load_config(path)


@pytest.mark.parametrize(("weak", "ok"), [(0.45, False), (0.5, False), (0.44, True)])
def test_weak_threshold_below_default_intense(weak: float, ok: bool) -> None:
    if ok:
        params = ScoringParams(weak_threshold_od=weak, default_intense_threshold_od=0.45)
        assert params.weak_threshold_od == weak
    else:
        with pytest.raises(ValidationError, match="must be below default_intense_threshold_od"):
            ScoringParams(weak_threshold_od=weak, default_intense_threshold_od=0.45)


def test_min_cell_diameter_below_max() -> None:
    with pytest.raises(ValidationError, match=r"min_cell_diameter_um \(30\.0\) must be below"):
        ScoringParams(min_cell_diameter_um=30.0, max_cell_diameter_um=30.0)


# --- the daemon's sections -------------------------------------------------------------------------------------


def test_daemon_camera_kind_selects_its_section(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon.camera]\nkind = "usb"\ndevice = "/dev/v4l/by-id/usb-cam-video-index0"\n')
    camera = load_config(path).daemon.camera
    assert camera.kind == "usb" and camera.device == "/dev/v4l/by-id/usb-cam-video-index0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[daemon.camera]\nkind = "webcam"\n', "daemon.camera"),
        ('[daemon.zmq]\npublish = "tcp://0.0.0.0:5560"\n', "not loopback"),
        ('[daemon.zmq]\ncontrol = "udp://127.0.0.1:5561"\n', "must start with tcp://"),
        ("[daemon.capture]\nsettle_ms = -5\n", "daemon.capture.settle_ms = -5"),
        ('[daemon.camera]\nkind = "simulated"\nfps = "fast"\n', "daemon.camera.simulated.fps = 'fast'"),
        ("[daemon.camera.faults]\ndrop_probability = 1.5\n", "drop_probability = 1.5"),
    ],
)
def test_bad_daemon_settings_are_named(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert expected in str(info.value)


def test_remote_endpoints_need_an_explicit_opt_in(tmp_path: Path) -> None:
    text = '[daemon.zmq]\npublish = "tcp://0.0.0.0:5560"\nallow_remote = true\n'
    assert load_config(write(tmp_path, text)).daemon.zmq.publish == "tcp://0.0.0.0:5560"


def test_objectives_give_the_pixel_size_and_a_single_pixel_size_is_one_objective(tmp_path: Path) -> None:
    assert AppConfig().optics.pixel_size_um == 0.25  # the default objective, 40x
    text = '[optics]\nobjectives = {"10x" = 1.0, "20x" = 0.5}\nobjective = "10x"\n'
    assert load_config(write(tmp_path, text)).optics.pixel_size_um == 1.0
    assert load_config(write(tmp_path, "[optics]\npixel_size_um = 0.3\n")).optics.pixel_size_um == 0.3
    with pytest.raises(ConfigError, match="either pixel_size_um"):
        load_config(write(tmp_path, '[optics]\npixel_size_um = 0.3\nobjective = "40x"\n'))
