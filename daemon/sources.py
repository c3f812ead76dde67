"""Frame sources behind the ``FrameSource`` port: USB (V4L2) and GigE Vision cameras, and file/folder replay.

Every source yields :class:`~daemon.frames.Frame` objects whose image is a read-only ``(M, N, 3) uint8`` BGR array.
``open_source`` picks the source for a camera configuration. Nothing here runs a thread: the
:class:`~daemon.grabber.FrameGrabber` drives a source from its own thread and adds the watchdog.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.config.daemon import (
    CameraConfig,
    GigeCameraConfig,
    ReplayCameraConfig,
    UsbCameraConfig,
)
from her2scope.daemon.frames import Frame, FrameSource, SourceError

__all__ = [
    "GENICAM_PIXEL_FORMATS",
    "GigeCamera",
    "ReplaySource",
    "UsbCamera",
    "genicam_to_bgr",
    "gstreamer_pipeline",
    "open_source",
    "opencv_has_gstreamer",
    "to_bgr",
]

IMAGE_SUFFIXES: Final = frozenset({".png", ".tif", ".tiff", ".jpg", ".jpeg"})
"""File name suffixes (any case) a replay folder is read from."""

_ON_LINUX: Final = sys.platform.startswith("linux")
_V4L2_SELECT_TIMEOUT_S: Final = "2"
"""OpenCV's V4L2 backend waits this long for a frame (its own default is 10 s); read once per process."""

_LIST_DEVICES_HINT: Final = (
    "list the cameras with `v4l2-ctl --list-devices` (package v4l-utils) and use a stable path from /dev/v4l/by-id/"
)
_GIGE_EXTRA_HINT: Final = (
    "GigE Vision needs the optional extra: pip install 'her2scope[gige]' (harvesters) and a GenTL producer (.cti), "
    "e.g. Aravis or the camera vendor's"
)

# OpenCV names a Bayer pattern by the second row's pair; the unambiguous 4-letter aliases name the first 2x2 tile,
# as GenICam does. (``COLOR_BayerRG2BGR`` is the BGGR conversion and would swap red and blue for ``BayerRG8``.)
_BAYER_CODES: Final = {
    "BayerRG8": cv2.COLOR_BayerRGGB2BGR,
    "BayerGR8": cv2.COLOR_BayerGRBG2BGR,
    "BayerGB8": cv2.COLOR_BayerGBRG2BGR,
    "BayerBG8": cv2.COLOR_BayerBGGR2BGR,
}
GENICAM_PIXEL_FORMATS: Final = ("Mono8", *_BAYER_CODES, "RGB8", "BGR8")
"""GenICam pixel formats ``genicam_to_bgr`` converts."""


def _now_ms() -> float:
    return time.monotonic() * 1000.0


def _read_only(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    view = image.view()
    view.flags.writeable = False
    return view


def to_bgr(image: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Bring a decoded camera image to the frame format: BGR, uint8, read-only.

    Parameters
    ----------
    image : (M, N) or (M, N, 1) greyscale, (M, N, 3) BGR or (M, N, 4) BGRA uint8 ndarray

    Returns
    -------
    (M, N, 3) uint8 ndarray, BGR, read-only. A BGR input is returned as a read-only view (the input itself is not
    modified); other layouts are converted into a new array.

    Raises
    ------
    SourceError
        When the dtype is not uint8 or the shape is none of the above.
    """
    if image.dtype != np.uint8:
        raise SourceError(
            f"frames must be 8-bit, got {image.dtype}; choose an 8-bit pixel format on the camera (MJPG, YUYV, Mono8)"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 3:
        bgr = image
    elif image.ndim == 3 and image.shape[2] == 4:
        bgr = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    else:
        raise SourceError(
            f"unsupported frame shape {image.shape}; expected (M, N) greyscale, (M, N, 3) BGR or (M, N, 4) BGRA"
        )
    return _read_only(np.asarray(bgr, dtype=np.uint8))


def genicam_to_bgr(data: npt.ArrayLike, width: int, height: int, pixel_format: str) -> npt.NDArray[np.uint8]:
    """Convert the flat payload of a GenICam image buffer to a BGR frame image.

    Parameters
    ----------
    data : (K,) uint8 array-like, the buffer component's data (K >= width * height * channels; padding is ignored)
    width, height : the image size in pixels (columns, rows), as the buffer component reports it
    pixel_format : one of ``GENICAM_PIXEL_FORMATS`` (``Mono8``, ``BayerRG8``, ``BayerGR8``, ``BayerGB8``,
        ``BayerBG8``, ``RGB8``, ``BGR8``)

    Returns
    -------
    (height, width, 3) uint8 ndarray, BGR, read-only, never sharing memory with ``data`` (the buffer is handed
    back to the driver right after).

    Raises
    ------
    SourceError
        For another pixel format, a non-uint8 payload, or a payload shorter than the image (an incomplete buffer).
    """
    flat = np.asarray(data).reshape(-1)
    if pixel_format not in GENICAM_PIXEL_FORMATS:
        raise SourceError(
            f"pixel format {pixel_format!r} is not supported; set the camera's PixelFormat to one of "
            f"{', '.join(GENICAM_PIXEL_FORMATS)}"
        )
    if flat.dtype != np.uint8:
        raise SourceError(f"pixel format {pixel_format} delivered {flat.dtype} data, expected uint8")
    if width <= 0 or height <= 0:
        raise SourceError(f"invalid image size {width}x{height} in the camera buffer")
    channels = 3 if pixel_format in ("RGB8", "BGR8") else 1
    expected = width * height * channels
    if flat.size < expected:
        raise SourceError(
            f"incomplete {pixel_format} buffer: {flat.size} bytes for a {width}x{height} image ({expected} expected)"
        )
    flat = flat[:expected]
    bgr: npt.NDArray[np.uint8]
    if pixel_format == "Mono8":
        bgr = np.asarray(cv2.cvtColor(flat.reshape(height, width), cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    elif pixel_format in _BAYER_CODES:
        bgr = np.asarray(cv2.cvtColor(flat.reshape(height, width), _BAYER_CODES[pixel_format]), dtype=np.uint8)
    elif pixel_format == "RGB8":
        bgr = np.asarray(cv2.cvtColor(flat.reshape(height, width, 3), cv2.COLOR_RGB2BGR), dtype=np.uint8)
    else:  # BGR8
        bgr = flat.reshape(height, width, 3).copy()
    return _read_only(bgr)


def _fourcc_text(code: float) -> str:
    value = int(code)
    chars = bytes((value >> (8 * i)) & 0xFF for i in range(4))
    text = chars.decode("ascii", errors="replace")
    return text if text.isprintable() and len(text.strip()) == 4 else f"0x{value:08x}"


def _close_enough(got: float, wanted: float, tolerance: float) -> bool:
    return abs(got - wanted) <= tolerance


class _CaptureReader:
    """Reads ``cv2.VideoCapture`` frames into Frames; shared by the USB camera and the GStreamer GigE backend."""

    def __init__(self, cap: cv2.VideoCapture, name: str) -> None:
        self.cap = cap
        self._name = name
        self._index = 0

    def read(self) -> Frame:
        ok, image = self.cap.read()
        if not ok or image is None:
            raise SourceError(
                f"camera stopped delivering frames ({self._name}); check the cable and that no other program "
                "uses the camera; it is reopened automatically"
            )
        frame = Frame(to_bgr(np.asarray(image)), self._index, _now_ms())
        self._index += 1
        return frame

    def release(self) -> None:
        self.cap.release()


class UsbCamera:
    """A USB (UVC) camera through OpenCV's V4L2 backend (any backend off Linux).

    ``config.device`` is an index (``0`` is ``/dev/video0``) or a path: a stable ``/dev/v4l/by-id/...`` symlink
    (resolved when opened, so the camera is found after it is replugged into another port), or a **video file**,
    which goes through the same capture code (used by tests and for demos; at its end ``read`` raises SourceError
    like an unplugged camera, and reopening starts it again).

    Every setting is applied with ``VideoCapture.set`` and read back: a setting the backend ignored or changed
    becomes an entry of ``warnings`` (e.g. ``"resolution: asked 1920x1080, got 640x480"``), for the daemon to log.
    The camera's frames are returned with the source's own counter as index.

    ``read`` cannot be interrupted: OpenCV blocks until a frame comes or its backend gives up (V4L2: 2 s here, set
    through ``OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT`` unless the environment sets it); ``timeout_ms`` is not used.
    """

    def __init__(self, config: UsbCameraConfig) -> None:
        self._config = config
        self._reader: _CaptureReader | None = None
        self._warnings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``usb:/dev/video0`` for an index, ``usb:<path>`` for a path as configured."""
        device = self._config.device
        if isinstance(device, int):
            return f"usb:/dev/video{device}" if _ON_LINUX else f"usb:{device}"
        return f"usb:{device}"

    @property
    def warnings(self) -> tuple[str, ...]:
        """Settings the backend ignored or changed at the last ``open``, and frame-size surprises."""
        return self._warnings

    def _target(self) -> tuple[int | str, int]:
        """The argument and API preference for ``cv2.VideoCapture``."""
        device = self._config.device
        camera_api = cv2.CAP_V4L2 if _ON_LINUX else cv2.CAP_ANY
        if isinstance(device, int):
            return device, camera_api
        if device.isdigit():
            return int(device), camera_api
        path = Path(device)
        if not path.exists():
            raise SourceError(f"camera {device} does not exist (unplugged?); {_LIST_DEVICES_HINT}")
        resolved = path.resolve()
        if resolved.is_file():
            return str(resolved), cv2.CAP_ANY
        match = re.fullmatch(r"/dev/video(\d+)", str(resolved))
        if match:
            return int(match.group(1)), camera_api
        return str(resolved), camera_api

    def open(self) -> None:
        """Open the camera and apply the configured settings; SourceError when it cannot be opened."""
        self.close()
        target, api = self._target()
        if api == cv2.CAP_V4L2:
            os.environ.setdefault("OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT", _V4L2_SELECT_TIMEOUT_S)
        cap = cv2.VideoCapture(target, api)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open camera {self.name}: is another program using it, or is the user not in the 'video' "
                f"group? {_LIST_DEVICES_HINT}"
            )
        self._warnings = tuple(self._apply_settings(cap, manual_exposure=1.0 if api == cv2.CAP_V4L2 else 0.25))
        self._reader = _CaptureReader(cap, self.name)

    def _apply_settings(self, cap: cv2.VideoCapture, manual_exposure: float) -> list[str]:
        config = self._config
        warnings: list[str] = []

        def apply(prop: int, value: float) -> tuple[bool, float]:
            return bool(cap.set(prop, value)), float(cap.get(prop))

        def verdict(accepted: bool) -> str:
            return "the backend changed it" if accepted else "the backend ignored it"

        # The order matters for V4L2: pixel format, then size, then rate.
        ok, got = apply(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*config.fourcc))
        if _fourcc_text(got) != config.fourcc:
            warnings.append(f"fourcc: asked {config.fourcc}, got {_fourcc_text(got)} ({verdict(ok)})")
        ok_w, got_w = apply(cv2.CAP_PROP_FRAME_WIDTH, config.width)
        ok_h, got_h = apply(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
        if (round(got_w), round(got_h)) != (config.width, config.height):
            warnings.append(
                f"resolution: asked {config.width}x{config.height}, got {round(got_w)}x{round(got_h)} "
                f"({verdict(ok_w and ok_h)})"
            )
        ok, got = apply(cv2.CAP_PROP_FPS, config.fps)
        if not _close_enough(got, config.fps, 0.5):
            warnings.append(f"fps: asked {config.fps:g}, got {got:g} ({verdict(ok)})")
        if config.exposure is not None:
            ok, got = apply(cv2.CAP_PROP_AUTO_EXPOSURE, manual_exposure)
            if not ok or not _close_enough(got, manual_exposure, 1e-3):
                warnings.append(f"auto exposure could not be turned off (got mode {got:g}, {verdict(ok)})")
            ok, got = apply(cv2.CAP_PROP_EXPOSURE, config.exposure)
            if not _close_enough(got, config.exposure, max(1e-3, abs(config.exposure) * 0.01)):
                warnings.append(f"exposure: asked {config.exposure:g}, got {got:g} ({verdict(ok)})")
        if config.white_balance_k is not None:
            ok, got = apply(cv2.CAP_PROP_AUTO_WB, 0.0)
            if not ok or got != 0.0:
                warnings.append(f"auto white balance could not be turned off (got {got:g}, {verdict(ok)})")
            ok, got = apply(cv2.CAP_PROP_WB_TEMPERATURE, config.white_balance_k)
            if not _close_enough(got, config.white_balance_k, 50.0):
                warnings.append(f"white balance: asked {config.white_balance_k:g} K, got {got:g} K ({verdict(ok)})")
        return warnings

    def read(self, timeout_ms: float) -> Frame | None:
        """The next frame; SourceError when the camera stopped delivering (or the video file ended)."""
        if self._reader is None:
            raise SourceError(f"camera {self.name} is not open")
        frame = self._reader.read()
        if frame.index == 0:
            rows, cols = frame.image.shape[:2]
            if (cols, rows) != (self._config.width, self._config.height):
                note = f"frames are {cols}x{rows}, not the {self._config.width}x{self._config.height} asked for"
                if not any(w.startswith("resolution:") for w in self._warnings):
                    self._warnings = (*self._warnings, note)
        return frame

    def close(self) -> None:
        """Release the camera; safe to call twice."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.release()


def opencv_has_gstreamer(build_information: str | None = None) -> bool:
    """Whether this OpenCV build has the GStreamer video I/O backend (from ``cv2.getBuildInformation()``)."""
    text = cv2.getBuildInformation() if build_information is None else build_information
    match = re.search(r"^\s*GStreamer:\s*(\S+)", text, flags=re.MULTILINE)
    return match is not None and match.group(1).upper() != "NO"


_SAFE_SERIAL = re.compile(r"[A-Za-z0-9._:\- ]+")


def gstreamer_pipeline(config: GigeCameraConfig) -> str:
    """The GStreamer pipeline that reads a GigE Vision camera through the Aravis plugin into OpenCV.

    Raises
    ------
    SourceError
        When the serial holds characters that could change the pipeline (only letters, digits, ``._:-`` and spaces).
    """
    properties = []
    if config.serial is not None:
        if not _SAFE_SERIAL.fullmatch(config.serial):
            raise SourceError(f"camera serial {config.serial!r} has characters other than letters, digits, ._:- ")
        properties.append(f'camera-name="{config.serial}"')
    properties.append(f"frame-rate={config.fps:g}")
    if config.exposure_us is not None:
        properties.append(f"exposure={config.exposure_us:g}")
    return (
        f"aravissrc {' '.join(properties)} ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )


class GigeCamera:
    """A GigE Vision camera, through harvesters (a GenICam/GenTL consumer) or OpenCV's GStreamer + Aravis backend.

    ``backend = "harvesters"`` imports harvesters when opened (the optional ``gige`` extra) and loads the GenTL
    producer ``config.cti_file``; the camera is chosen by serial number, or the first one found. Frames are converted
    from Mono8, Bayer 8-bit and RGB8/BGR8 (``genicam_to_bgr``); set another PixelFormat on the camera to one of those.
    ``backend = "gstreamer"`` needs an OpenCV built with GStreamer and the ``aravissrc`` plugin; the wheels on PyPI
    (opencv-python) are built without GStreamer.
    """

    def __init__(self, config: GigeCameraConfig) -> None:
        self._config = config
        self._harvester: Any = None
        self._acquirer: Any = None
        self._reader: _CaptureReader | None = None
        self._index = 0
        self._warnings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``gige:<backend>:<serial>`` (``first`` when no serial is configured)."""
        return f"gige:{self._config.backend}:{self._config.serial or 'first'}"

    @property
    def warnings(self) -> tuple[str, ...]:
        """Settings the camera refused or changed at the last ``open``."""
        return self._warnings

    def open(self) -> None:
        """Connect to the camera and start acquisition; SourceError with what to install or check otherwise."""
        self.close()
        if self._config.backend == "gstreamer":
            self._open_gstreamer()
        else:
            self._open_harvesters()

    def _open_gstreamer(self) -> None:
        if not opencv_has_gstreamer():
            raise SourceError(
                "this OpenCV build lacks GStreamer (cv2.getBuildInformation() shows GStreamer: NO; the opencv-python "
                "wheels are built without it); use backend = \"harvesters\" (pip install 'her2scope[gige]' and a "
                "GenTL producer), or a system OpenCV built with GStreamer plus the Aravis plugin (gst-plugin-aravis)"
            )
        pipeline = gstreamer_pipeline(self._config)
        cap = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open GigE camera {self.name} with GStreamer pipeline {pipeline!r}; check it with "
                "`gst-launch-1.0` and that the camera is visible to `arv-tool-0.8`"
            )
        self._warnings = ()
        self._reader = _CaptureReader(cap, self.name)

    def _open_harvesters(self) -> None:
        try:
            harvesters_core = importlib.import_module("harvesters.core")
        except ImportError as error:
            raise SourceError(_GIGE_EXTRA_HINT) from error
        cti = self._config.cti_file
        if cti is None:
            raise SourceError(
                "GigE through harvesters needs camera.cti_file: the GenTL producer (.cti) of Aravis or of the "
                "camera vendor's SDK"
            )
        if not cti.is_file():
            raise SourceError(f"GenTL producer {cti} does not exist; install it or correct camera.cti_file")
        harvester = harvesters_core.Harvester()
        self._harvester = harvester
        try:
            harvester.add_file(str(cti))
            harvester.update()
            devices = list(harvester.device_info_list)
            if not devices:
                raise SourceError(
                    f"no GigE Vision camera found through {cti}; check the network link, the camera's IP "
                    "configuration and the firewall (GVSP uses UDP)"
                )
            serial = self._config.serial
            if serial is None:
                acquirer = harvester.create(0)
            else:
                seen = [str(getattr(device, "serial_number", "?")) for device in devices]
                if serial not in seen:
                    raise SourceError(f"no GigE Vision camera with serial {serial}; cameras found: {', '.join(seen)}")
                acquirer = harvester.create({"serial_number": serial})
            self._acquirer = acquirer
            self._warnings = tuple(self._apply_node_settings(acquirer.remote_device.node_map))
            acquirer.start()
        except SourceError:
            self.close()
            raise
        except Exception as error:
            self.close()
            raise SourceError(f"cannot open GigE camera {self.name}: {type(error).__name__}: {error}") from error

    def _apply_node_settings(self, node_map: Any) -> list[str]:
        warnings: list[str] = []

        def write(node: str, value: float | bool | str, *, optional: bool = False) -> None:
            """Set a GenICam feature and read it back; a camera without an optional feature is not warned about."""
            try:
                feature = getattr(node_map, node)
            except AttributeError:
                if not optional:
                    warnings.append(f"{node}: the camera has no such feature")
                return
            try:
                feature.value = value
                got = feature.value
            except Exception as error:
                warnings.append(f"{node}: could not set {value} ({type(error).__name__}: {error})")
                return
            if isinstance(value, bool | str):
                if got != value:
                    warnings.append(f"{node}: asked {value}, got {got}")
            elif not _close_enough(float(got), value, max(1e-3, abs(value) * 0.01)):
                warnings.append(f"{node}: asked {value:g}, got {float(got):g}")

        if self._config.exposure_us is not None:
            write("ExposureAuto", "Off", optional=True)
            write("ExposureTime", self._config.exposure_us)
        write("AcquisitionFrameRateEnable", True, optional=True)
        write("AcquisitionFrameRate", self._config.fps)
        return warnings

    def read(self, timeout_ms: float) -> Frame | None:
        """The next frame, None after ``timeout_ms`` without one; SourceError when the camera is gone."""
        if self._reader is not None:
            return self._reader.read()
        acquirer = self._acquirer
        if acquirer is None:
            raise SourceError(f"camera {self.name} is not open")
        try:
            buffer = acquirer.try_fetch(timeout=max(timeout_ms, 1.0) / 1000.0)
        except Exception as error:
            raise SourceError(
                f"GigE camera {self.name} stopped delivering frames ({type(error).__name__}: {error}); "
                "it is reopened automatically"
            ) from error
        if buffer is None:
            return None
        try:
            component = buffer.payload.components[0]
            image = genicam_to_bgr(component.data, int(component.width), int(component.height), component.data_format)
            frame_id = getattr(buffer, "frame_id", None)
        finally:
            buffer.queue()
        index = int(frame_id) if isinstance(frame_id, int) else self._index
        self._index += 1
        return Frame(image, index, _now_ms())

    def close(self) -> None:
        """Stop acquisition and release the camera and the producer; safe to call twice."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.release()
        acquirer, self._acquirer = self._acquirer, None
        harvester, self._harvester = self._harvester, None
        for action in (
            getattr(acquirer, "stop", None),
            getattr(acquirer, "destroy", None),
            getattr(harvester, "reset", None),
        ):
            if action is not None:
                with contextlib.suppress(Exception):  # releasing a device that is already gone
                    action()


class ReplaySource:
    """Frames replayed from a video file or a folder of images, paced at ``config.fps``.

    A folder is read in file-name order (PNG, TIFF, JPEG); an image that cannot be decoded is skipped and noted in
    ``warnings``; a folder without images is a SourceError. ``read`` blocks until the next frame is due, for at
    most ``timeout_ms``, and returns None when it is not due yet. A replay that falls behind does not burst to
    catch up.

    At the end, with ``config.loop`` the replay starts again (frame indices keep counting up). Without it, the replay
    is *finished*: ``finished`` becomes True and ``read`` returns None forever (after waiting ``timeout_ms``), which is
    not an error; the grabber reports it as ENDED instead of reopening. ``open`` starts the replay from the beginning.
    """

    def __init__(self, config: ReplayCameraConfig) -> None:
        self._config = config
        self._period_s = 1.0 / config.fps
        self._images: list[Path] = []
        self._position = 0
        self._capture: cv2.VideoCapture | None = None
        self._is_open = False
        self._finished = False
        self._next_due = 0.0
        self._index = 0
        self._warnings: list[str] = []

    @property
    def name(self) -> str:
        """``replay:<path>``."""
        return f"replay:{self._config.path}"

    @property
    def warnings(self) -> tuple[str, ...]:
        """Images that could not be read (each once)."""
        return tuple(self._warnings)

    @property
    def finished(self) -> bool:
        """True once a replay without ``loop`` has delivered its last frame."""
        return self._finished

    def open(self) -> None:
        """Start the replay from its first frame; SourceError when the path has nothing to replay."""
        self.close()
        path = self._config.path
        if path.is_dir():
            images = sorted(
                (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda p: p.name,
            )
            if not images:
                raise SourceError(f"no images (PNG, TIFF, JPEG) in replay folder {path}")
            self._images = images
        elif path.is_file():
            self._capture = self._open_video(path)
        else:
            raise SourceError(f"replay path {path} does not exist; give a video file or a folder of images")
        self._position = 0
        self._finished = False
        self._is_open = True
        self._next_due = time.monotonic()

    @staticmethod
    def _open_video(path: Path) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(path), cv2.CAP_ANY)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot read video {path}; is it a video file OpenCV (FFmpeg) can decode?")
        return capture

    def read(self, timeout_ms: float) -> Frame | None:
        """The next frame once it is due (waiting at most ``timeout_ms``), else None; None forever when finished."""
        if not self._is_open:
            raise SourceError(f"replay {self._config.path} is not open")
        timeout_s = max(timeout_ms, 0.0) / 1000.0
        if self._finished:
            time.sleep(timeout_s)
            return None
        wait_s = self._next_due - time.monotonic()
        if wait_s > timeout_s:
            time.sleep(timeout_s)
            return None
        if wait_s > 0:
            time.sleep(wait_s)
        grabbed = time.monotonic()  # the frame's time is when it was due, not when decoding it finished
        image = self._next_image()
        if image is None:
            self._finished = True
            return None
        self._next_due = max(self._next_due + self._period_s, grabbed)
        frame = Frame(image, self._index, grabbed * 1000.0)
        self._index += 1
        return frame

    def _next_image(self) -> npt.NDArray[np.uint8] | None:
        """The next image, looping if configured; None at the end of a replay without loop."""
        if self._capture is not None:
            return self._next_video_frame(self._capture)
        return self._next_folder_image()

    def _next_video_frame(self, capture: cv2.VideoCapture) -> npt.NDArray[np.uint8] | None:
        ok, image = capture.read()
        if not ok:
            if not self._config.loop:
                return None
            capture.release()
            self._capture = capture = self._open_video(self._config.path)
            ok, image = capture.read()
            if not ok:
                raise SourceError(f"video {self._config.path} has no frames OpenCV can decode")
        return to_bgr(np.asarray(image))

    def _next_folder_image(self) -> npt.NDArray[np.uint8] | None:
        skipped = 0
        while skipped < len(self._images):
            if self._position >= len(self._images):
                if not self._config.loop:
                    return None
                self._position = 0
            path = self._images[self._position]
            self._position += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return to_bgr(np.asarray(image))
            skipped += 1
            note = f"cannot read image {path}; skipped"
            if note not in self._warnings:
                self._warnings.append(note)
        raise SourceError(f"none of the images in replay folder {self._config.path} can be read")

    def close(self) -> None:
        """Stop the replay; safe to call twice."""
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()
        self._is_open = False


def open_source(config: CameraConfig, pixel_size_um: float) -> FrameSource:
    """The frame source for a camera configuration (not yet opened).

    Parameters
    ----------
    config : the ``camera`` section of the daemon configuration
    pixel_size_um : size of a camera pixel in the specimen plane, used by the simulated microscope only

    Raises
    ------
    SourceError
        When the simulated microscope is not available.
    """
    if isinstance(config, UsbCameraConfig):
        return UsbCamera(config)
    if isinstance(config, GigeCameraConfig):
        return GigeCamera(config)
    if isinstance(config, ReplayCameraConfig):
        return ReplaySource(config)
    try:
        simulator = importlib.import_module("her2scope.daemon.simulator")
    except ImportError as error:
        raise SourceError(f"the simulated microscope is not available: {error}") from error
    source = simulator.SimulatedMicroscope(config, pixel_size_um)
    if not isinstance(source, FrameSource):
        raise SourceError(f"{type(source).__name__} does not implement FrameSource")
    return source
