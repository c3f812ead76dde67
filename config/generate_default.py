"""Write ``config/default.toml`` from the models' defaults and descriptions: ``python -m config.generate_default``.

The test suite checks that the shipped file equals the models' defaults, so run this after changing a model.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from pydantic import BaseModel

from her2scope.config.app import AppConfig
from her2scope.config.daemon import GigeCameraConfig, ReplayCameraConfig, UsbCameraConfig

HEADER = """\
# her2scope configuration. Sizes in µm, stain levels in optical density (OD, log10), times in ms.
# Every field is optional; a missing one takes the value shown here. Unknown fields are errors.
"""

OTHER_CAMERAS = """\
# Other cameras: replace the [daemon.camera] table above with one of these.
# [daemon.camera]            # a USB (UVC) camera through OpenCV / V4L2
# kind = "usb"
# device = "/dev/v4l/by-id/usb-Your_Camera-video-index0"   # or an index: 0
# fourcc = "MJPG"
# width = 1920
# height = 1080
# fps = 30.0
# exposure = 100.0           # backend units; omit for auto exposure
# white_balance_k = 5500.0   # omit for auto white balance
#
# [daemon.camera]            # a GigE Vision camera (pip install 'her2scope[gige]')
# kind = "gige"
# backend = "harvesters"     # or "gstreamer" (an OpenCV build with GStreamer and Aravis)
# cti_file = "/opt/aravis/lib/aravis-gentl.cti"
# serial = "12345678"
# fps = 30.0
#
# [daemon.camera]            # replay a video file or a folder of images
# kind = "replay"
# path = "/data/her2/fovs"
# fps = 10.0
# loop = true
"""


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_value(v)}' for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _section(name: str, model: BaseModel, out: list[str]) -> None:
    nested: list[tuple[str, BaseModel]] = []
    out.append(f"[{name}]")
    for field_name, field in type(model).model_fields.items():
        value = getattr(model, field_name)
        if isinstance(value, BaseModel):
            nested.append((f"{name}.{field_name}", value))
            continue
        if field.description:
            out.extend("# " + line for line in textwrap.wrap(field.description, 110))
        dumped = model.model_dump(mode="json", include={field_name})[field_name]
        out.append(f"# {field_name} = (unset)" if dumped is None else f"{field_name} = {_value(dumped)}")
    out.append("")
    for nested_name, nested_model in nested:
        _section(nested_name, nested_model, out)
        if nested_name == "daemon.camera":
            out.append(OTHER_CAMERAS)


def render() -> str:
    """The default configuration file's text."""
    out = [HEADER]
    config = AppConfig()
    for field_name in type(config).model_fields:
        _section(field_name, getattr(config, field_name), out)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    """Write config/default.toml."""
    path = Path(__file__).with_name("default.toml")
    path.write_text(render(), encoding="utf-8")
    print(path)


# Referenced so that a renamed camera model breaks this script loudly rather than the example silently.
_CAMERA_MODELS = (UsbCameraConfig, GigeCameraConfig, ReplayCameraConfig)

if __name__ == "__main__":
    main()
