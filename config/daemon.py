"""Configuration of the daemon: camera, capture, triggers, ZeroMQ endpoints, state and the scoring worker.

Times are in ms, sizes in µm; endpoints bind to loopback unless the file says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

Ms = Annotated[float, Field(gt=0.0, le=3_600_000.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UsbCameraConfig(_Frozen):
    """A USB (UVC, V4L2) camera through OpenCV."""

    kind: Literal["usb"] = "usb"
    device: int | str = Field(0, description="Index (0) or a stable path such as /dev/v4l/by-id/usb-...-video-index0")
    fourcc: str = Field("MJPG", min_length=4, max_length=4, description="Pixel format; MJPG gives 1080p at 30 fps")
    width: int = Field(1920, ge=16, le=16384)
    height: int = Field(1080, ge=16, le=16384)
    fps: float = Field(30.0, gt=0.0, le=1000.0)
    exposure: float | None = Field(None, description="Manual exposure in the backend's units; None keeps auto")
    white_balance_k: float | None = Field(None, ge=1000, le=15000, description="Manual white balance in kelvin")


class GigeCameraConfig(_Frozen):
    """A GigE Vision camera through a GenICam consumer (harvesters) or OpenCV's GStreamer/Aravis backend."""

    kind: Literal["gige"] = "gige"
    backend: Literal["harvesters", "gstreamer"] = "harvesters"
    cti_file: Path | None = Field(None, description="GenTL producer (.cti) for harvesters")
    serial: str | None = Field(None, description="Camera serial number; the first camera if None")
    fps: float = Field(30.0, gt=0.0, le=1000.0)
    exposure_us: float | None = Field(None, gt=0.0)


class ReplayCameraConfig(_Frozen):
    """Frames replayed from a video file or a folder of images (sorted by name)."""

    kind: Literal["replay"] = "replay"
    path: Path
    fps: float = Field(10.0, gt=0.0, le=1000.0)
    loop: bool = True


class SimulatedFaults(_Frozen):
    """Faults the simulated microscope injects, for testing the daemon's resilience."""

    drop_probability: Fraction = 0.0
    freeze_probability: Fraction = 0.0
    corrupt_probability: Fraction = 0.0
    disconnect_after_ms: Ms | None = Field(None, description="Unplug the camera this long after it opens")
    disconnect_for_ms: Ms = 2000.0


class SimulatedCameraConfig(_Frozen):
    """The simulated microscope: a virtual slide under a stage that pans, pauses and refocuses."""

    kind: Literal["simulated"] = "simulated"
    width: int = Field(1920, ge=64, le=8192)
    height: int = Field(1080, ge=64, le=8192)
    fps: float = Field(30.0, gt=0.0, le=240.0)
    class_fractions: dict[str, float] = Field(
        default_factory=lambda: {"0": 0.3, "1+": 0.3, "2+": 0.3, "3+": 0.1},
        description="HER2 classes of the tumour cells on the virtual slide's tumour region",
    )
    batch_strength: float = Field(1.0, gt=0.0, le=3.0, description="DAB strength of this staining batch")
    slide_fields: tuple[int, int] = Field((3, 3), description="Virtual tumour area in FOVs (rows, cols)")
    pan_ms: Ms = Field(1500.0, description="Time to pan from one field to the next")
    dwell_ms: Ms = Field(2500.0, description="Time the stage rests on a field")
    script: tuple[str, ...] = Field(
        ("control", "fields 6"),
        description="Stage script, run in a loop: 'control' visits the control tissue, 'fields N' N tumour "
        "fields, 'pause MS' holds still, 'defocus MS' blurs then refocuses",
    )
    faults: SimulatedFaults = SimulatedFaults()
    seed: int = 0


def _camera_kind(value: Any) -> str:
    # A [daemon.camera] table without "kind" is the simulated microscope, the default camera.
    kind = value.get("kind", "simulated") if isinstance(value, dict) else getattr(value, "kind", "simulated")
    return str(kind)


CameraConfig = Annotated[
    Annotated[UsbCameraConfig, Tag("usb")]
    | Annotated[GigeCameraConfig, Tag("gige")]
    | Annotated[ReplayCameraConfig, Tag("replay")]
    | Annotated[SimulatedCameraConfig, Tag("simulated")],
    Discriminator(
        _camera_kind,
        custom_error_type="camera_kind",
        custom_error_message="camera kind must be one of 'usb', 'gige', 'replay', 'simulated'",
    ),
]


class WatchdogConfig(_Frozen):
    """Detects a camera that stopped delivering and reopens it."""

    frame_timeout_ms: Ms = Field(2000.0, description="No new frame for this long: the camera is lost")
    frozen_frames: int = Field(
        30, ge=2, description="This many identical frames in a row: the camera is frozen (a real sensor is noisy)"
    )
    reopen_interval_ms: Ms = Field(1000.0, description="Wait between attempts to reopen a lost camera")


class CaptureConfig(_Frozen):
    """When a field of view is captured: stability (motion and focus) and triggers."""

    auto: bool = Field(True, description="Capture each field once when it becomes stable")
    max_motion_um: float = Field(
        2.0, gt=0.0, le=1000.0, description="A field moving less than this between frames is still"
    )
    settle_ms: Ms = Field(400.0, description="Still and in focus for this long: stable")
    min_focus_ratio: Fraction = Field(
        0.85, description="In focus: sharpness at least this share of the best seen on this field"
    )
    analysis_width_px: int = Field(
        320, ge=64, le=2048, description="Width frames are reduced to for stability checks (a display size)"
    )


class PreviewConfig(_Frozen):
    """The live preview and the overlays published for the viewer."""

    max_fps: float = Field(10.0, gt=0.0, le=120.0)
    width_px: int = Field(960, ge=64, le=8192, description="Width of preview frames (a display size)")
    jpeg_quality: int = Field(80, ge=10, le=100)
    overlay_width_px: int = Field(
        960, ge=64, le=8192, description="Width overlay layers are drawn at (a display size; full FOV is slower)"
    )


class PedalConfig(_Frozen):
    """A USB foot pedal (a HID keyboard) read with python-evdev and grabbed so its keys do not leak."""

    enabled: bool = False
    device: Path = Field(Path("/dev/input/by-id/usb-foot-pedal-event-kbd"), description="evdev device node")
    capture_key: str = Field("KEY_B", description="Key that captures a FOV")
    control_key: str | None = Field("KEY_C", description="Key that captures the positive control")
    grab: bool = True


class ZmqConfig(_Frozen):
    """ZeroMQ endpoints."""

    publish: str = Field("tcp://127.0.0.1:5560", description="PUB endpoint for preview/capture/result/overlay/status")
    control: str = Field("tcp://127.0.0.1:5561", description="ROUTER endpoint for control requests")
    heartbeat_ms: Ms = 1000.0
    replay_buffer: int = Field(200, ge=1, le=100_000, description="Messages kept for late joiners (not previews)")
    replay_buffer_mib: int = Field(
        64, ge=1, le=4096, description="... and at most this many MiB of them (overlays are about 0.5 MiB each)"
    )
    allow_remote: bool = Field(
        False, description="Allow binding to addresses other than loopback (needs the CURVE keys: curve_directory)"
    )
    curve_directory: Path | None = Field(
        None,
        description="CurveZMQ keys: server.key_secret and the allow-list clients/NAME.key (her2scope keys); "
        "default: <state directory>/curve",
    )
    require_curve: bool = Field(
        False, description="CURVE authentication and encryption on loopback and ipc:// too (on with allow_remote)"
    )
    client_key: Path | None = Field(
        None, description="Clients (view, record, ctl): this client's secret key file NAME.key_secret (--key)"
    )
    server_key: Path | None = Field(
        None, description="Clients: the daemon's public key file server.key; default: <curve_directory>/server.key"
    )

    @property
    def curve(self) -> bool:
        """Whether the daemon's sockets use CURVE."""
        return self.allow_remote or self.require_curve

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> ZmqConfig:
        for name in ("publish", "control"):
            endpoint = getattr(self, name)
            if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"{name} endpoint {endpoint!r} must start with tcp://, ipc:// or inproc://")
            if endpoint.startswith("tcp://") and not self.allow_remote:
                host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
                if host not in ("127.0.0.1", "localhost", "[::1]"):
                    raise ValueError(
                        f"{name} endpoint {endpoint!r} is not loopback; set zmq.allow_remote = true to expose it"
                    )
        return self


class StateConfig(_Frozen):
    """Where the current case is persisted so that a restarted daemon resumes it."""

    directory: Path = Field(
        Path("~/.local/state/her2scope"), description="Case state folder (created if missing; ~ is expanded)"
    )


class WorkerConfig(_Frozen):
    """The scoring worker process."""

    timeout_ms: Ms = Field(20_000.0, description="A FOV not scored in this time fails; the worker is restarted")


class DaemonConfig(_Frozen):
    """Everything the daemon reads from the configuration file's daemon sections."""

    camera: CameraConfig = SimulatedCameraConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    capture: CaptureConfig = CaptureConfig()
    preview: PreviewConfig = PreviewConfig()
    pedal: PedalConfig = PedalConfig()
    zmq: ZmqConfig = ZmqConfig()
    state: StateConfig = StateConfig()
    worker: WorkerConfig = WorkerConfig()
