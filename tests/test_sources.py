"""Frame sources: the real OpenCV capture path on a video file, replay of folders and videos, GigE error paths."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from her2scope.config.daemon import (
    GigeCameraConfig,
    ReplayCameraConfig,
    SimulatedCameraConfig,
    UsbCameraConfig,
)
from her2scope.daemon.frames import Frame, FrameSource, SourceError
from her2scope.daemon.sources import (
    GENICAM_PIXEL_FORMATS,
    GigeCamera,
    ReplaySource,
    UsbCamera,
    genicam_to_bgr,
    gstreamer_pipeline,
    open_source,
    opencv_has_gstreamer,
    to_bgr,
)

N_FRAMES = 64
ROWS, COLS = 240, 320


def frame_image(i: int, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """A test picture whose mean brightness encodes its number (survives MJPG compression)."""
    image = np.zeros((rows, cols, 3), np.uint8)
    image[:] = (20 + 3 * i) % 256
    image[: rows // 4, : cols // 4] = (255, 0, 0)  # a blue corner, to check the channel order
    return image


@pytest.fixture
def video_file(tmp_path: Path) -> Path:
    """A 64-frame 320x240 MJPG AVI at 30 fps, written with OpenCV."""
    path = tmp_path / "camera.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30.0, (COLS, ROWS))
    assert writer.isOpened(), "OpenCV cannot write MJPG AVI here"
    for i in range(N_FRAMES):
        writer.write(frame_image(i))
    writer.release()
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three PNGs, named so that sorting by name gives 0, 1, 2, plus a file that is not an image."""
    folder = tmp_path / "fovs"
    folder.mkdir()
    for i in (2, 0, 1):
        assert cv2.imwrite(str(folder / f"fov_{i:02d}.png"), frame_image(i, 48, 64))
    (folder / "notes.txt").write_text("not an image")
    return folder


def brightness(frame: Frame) -> int:
    """Undo ``frame_image``: the picture's number from its brightness away from the blue corner."""
    rows, cols = frame.image.shape[:2]
    return round((float(frame.image[rows // 2 :, cols // 2 :].mean()) - 20) / 3)


def usb_config(device: int | str, **overrides: Any) -> UsbCameraConfig:
    settings: dict[str, Any] = {"device": device, "width": COLS, "height": ROWS, "fps": 30.0, "fourcc": "MJPG"}
    return UsbCameraConfig(**(settings | overrides))


# -- USB camera, through OpenCV's capture code on a video file -------------------------------------------------------


def test_usb_camera_reads_a_video_file_through_the_capture_path(video_file: Path) -> None:
    camera = UsbCamera(usb_config(str(video_file)))
    assert isinstance(camera, FrameSource)
    assert camera.name == f"usb:{video_file}"
    camera.open()
    try:
        assert camera.warnings == ()
        frames = [camera.read(timeout_ms=500) for _ in range(N_FRAMES)]
        with pytest.raises(SourceError, match="camera stopped delivering frames"):
            camera.read(timeout_ms=500)
    finally:
        camera.close()
    camera.close()  # twice is fine
    assert all(f is not None for f in frames)
    real = [f for f in frames if f is not None]
    assert [f.index for f in real] == list(range(N_FRAMES))
    assert all(np.diff([f.timestamp_ms for f in real]) >= 0)
    for i, frame in enumerate(real):
        assert frame.image.shape == (ROWS, COLS, 3) and frame.image.dtype == np.uint8
        assert not frame.image.flags.writeable
        assert abs(brightness(frame) - i) <= 1
    corner = real[0].image[5, 5]
    assert corner[0] > 200 and corner[2] < 50, f"expected BGR blue, got {corner}"


def test_usb_camera_warns_about_settings_the_backend_ignored(video_file: Path) -> None:
    camera = UsbCamera(
        usb_config(str(video_file), width=1920, height=1080, fps=60.0, exposure=100.0, white_balance_k=4500)
    )
    camera.open()
    try:
        frame = camera.read(timeout_ms=500)
    finally:
        camera.close()
    assert frame is not None and frame.image.shape == (ROWS, COLS, 3)
    warnings = "\n".join(camera.warnings)
    assert f"resolution: asked 1920x1080, got {COLS}x{ROWS}" in warnings
    assert "fps: asked 60, got 30" in warnings
    assert "exposure" in warnings
    assert "white balance" in warnings


def test_usb_camera_resolves_a_stable_symlink(video_file: Path, tmp_path: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    link = by_id / "usb-Microscope_Cam-video-index0"
    link.symlink_to(video_file)
    camera = UsbCamera(usb_config(str(link)))
    camera.open()
    try:
        frame = camera.read(timeout_ms=500)
    finally:
        camera.close()
    assert frame is not None and frame.index == 0
    assert camera.name == f"usb:{link}"


def test_usb_camera_path_that_does_not_exist_says_how_to_find_cameras(tmp_path: Path) -> None:
    camera = UsbCamera(usb_config(str(tmp_path / "usb-gone-video-index0")))
    with pytest.raises(SourceError, match=r"does not exist.*v4l2-ctl --list-devices"):
        camera.open()


def test_usb_camera_index_that_cannot_be_opened() -> None:
    camera = UsbCamera(usb_config(97))
    assert camera.name in ("usb:/dev/video97", "usb:97")
    with pytest.raises(SourceError, match="cannot open camera"):
        camera.open()


def test_usb_camera_read_before_open() -> None:
    with pytest.raises(SourceError, match="not open"):
        UsbCamera(usb_config(0)).read(timeout_ms=10)


@pytest.mark.parametrize(
    ("image", "expected_pixel"),
    [
        (np.full((4, 5), 7, np.uint8), (7, 7, 7)),
        (np.full((4, 5, 1), 9, np.uint8), (9, 9, 9)),
        (np.dstack([np.full((4, 5), v, np.uint8) for v in (1, 2, 3)]), (1, 2, 3)),
        (np.dstack([np.full((4, 5), v, np.uint8) for v in (1, 2, 3, 255)]), (1, 2, 3)),
    ],
    ids=["grey", "grey1", "bgr", "bgra"],
)
def test_to_bgr_gives_read_only_bgr_and_leaves_the_input(image: np.ndarray, expected_pixel: tuple[int, ...]) -> None:
    before = image.copy()
    bgr = to_bgr(image)
    assert bgr.shape == (4, 5, 3) and bgr.dtype == np.uint8
    assert tuple(bgr[2, 3]) == expected_pixel
    assert not bgr.flags.writeable
    assert image.flags.writeable and np.array_equal(image, before)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 5, 3), np.float32), "8-bit"),
        (np.zeros((4, 5, 3), np.uint16), "8-bit"),
        (np.zeros((4, 5, 2), np.uint8), "unsupported frame shape"),
        (np.zeros(20, np.uint8), "unsupported frame shape"),
    ],
)
def test_to_bgr_rejects_other_images(image: np.ndarray, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        to_bgr(image)


# -- GigE Vision ----------------------------------------------------------------------------------------------------


def test_gige_without_harvesters_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "harvesters", None)
    monkeypatch.setitem(sys.modules, "harvesters.core", None)
    camera = GigeCamera(GigeCameraConfig(cti_file=tmp_path / "x.cti", serial="ABC"))
    assert isinstance(camera, FrameSource)
    assert camera.name == "gige:harvesters:ABC"
    with pytest.raises(SourceError, match=r"pip install 'her2scope\[gige\]'.*GenTL producer \(\.cti\)"):
        camera.open()


def test_gige_gstreamer_unavailable_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "  Video I/O:\n    GStreamer:                   NO\n")
    camera = GigeCamera(GigeCameraConfig(backend="gstreamer", serial="ABC"))
    assert camera.name == "gige:gstreamer:ABC"
    with pytest.raises(SourceError, match=r"lacks GStreamer.*harvesters"):
        camera.open()


def test_opencv_has_gstreamer_reads_the_build_information() -> None:
    assert opencv_has_gstreamer("  Video I/O:\n    GStreamer:                   YES (1.22.0)\n")
    assert not opencv_has_gstreamer("  Video I/O:\n    GStreamer:                   NO\n")
    assert not opencv_has_gstreamer("  Video I/O:\n    FFMPEG: YES\n")
    assert isinstance(opencv_has_gstreamer(), bool)  # this machine's real build


def test_gstreamer_pipeline_for_aravis() -> None:
    pipeline = gstreamer_pipeline(GigeCameraConfig(backend="gstreamer", serial="Basler-2311", fps=25.0))
    assert pipeline.startswith('aravissrc camera-name="Basler-2311" frame-rate=25 ! videoconvert ! ')
    assert pipeline.endswith("appsink drop=true max-buffers=1 sync=false")
    assert "camera-name" not in gstreamer_pipeline(GigeCameraConfig(backend="gstreamer"))
    with pytest.raises(SourceError, match="characters"):
        gstreamer_pipeline(GigeCameraConfig(backend="gstreamer", serial='x" ! filesink location=/tmp/p'))


@pytest.mark.parametrize(
    ("pixel_format", "red_site"),
    [("BayerRG8", (0, 0)), ("BayerGR8", (0, 1)), ("BayerGB8", (1, 0)), ("BayerBG8", (1, 1))],
)
def test_genicam_bayer_red_stays_red(pixel_format: str, red_site: tuple[int, int]) -> None:
    raw = np.zeros((8, 10), np.uint8)
    raw[red_site[0] :: 2, red_site[1] :: 2] = 200
    bgr = genicam_to_bgr(raw.reshape(-1), 10, 8, pixel_format)
    assert bgr.shape == (8, 10, 3)
    blue, green, red = (int(v) for v in bgr[4, 4])
    assert red == 200 and blue == 0 and green == 0, (pixel_format, bgr[4, 4])


def test_genicam_mono_rgb_bgr() -> None:
    mono = np.arange(12, dtype=np.uint8)
    bgr = genicam_to_bgr(mono, 4, 3, "Mono8")
    assert bgr.shape == (3, 4, 3) and np.array_equal(bgr[..., 0], mono.reshape(3, 4))
    assert np.array_equal(bgr[..., 0], bgr[..., 2])
    rgb = np.tile(np.array([10, 20, 30], np.uint8), 12)
    assert tuple(genicam_to_bgr(rgb, 4, 3, "RGB8")[1, 2]) == (30, 20, 10)
    assert tuple(genicam_to_bgr(rgb, 4, 3, "BGR8")[1, 2]) == (10, 20, 30)


@pytest.mark.parametrize("pixel_format", GENICAM_PIXEL_FORMATS)
def test_genicam_result_is_read_only_and_owns_its_memory(pixel_format: str) -> None:
    channels = 3 if pixel_format in ("RGB8", "BGR8") else 1
    payload = np.random.default_rng(1).integers(0, 255, 6 * 4 * channels + 5, dtype=np.uint8)  # 5 padding bytes
    before = payload.copy()
    bgr = genicam_to_bgr(payload, 6, 4, pixel_format)
    assert bgr.shape == (4, 6, 3) and bgr.dtype == np.uint8
    assert not bgr.flags.writeable
    assert not np.shares_memory(bgr, payload)
    assert np.array_equal(payload, before)


@pytest.mark.parametrize(
    ("data", "pixel_format", "message"),
    [
        (np.zeros(12, np.uint8), "Mono12", "Mono8, BayerRG8"),
        (np.zeros(11, np.uint8), "Mono8", "incomplete"),
        (np.zeros(12, np.uint16), "Mono8", "expected uint8"),
    ],
)
def test_genicam_rejects(data: np.ndarray, pixel_format: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        genicam_to_bgr(data, 4, 3, pixel_format)


class _FakeFeature:
    def __init__(self, value: Any) -> None:
        self.value = value


class _FakeBuffer:
    def __init__(self, frame_id: int) -> None:
        data = np.full(6 * 4, 50 + frame_id, np.uint8)
        component = types.SimpleNamespace(data=data, width=6, height=4, data_format="Mono8")
        self.payload = types.SimpleNamespace(components=[component])
        self.frame_id = frame_id
        self.queued = False

    def queue(self) -> None:
        self.queued = True


class _FakeAcquirer:
    """Stands in for harvesters' ImageAcquirer: two frames, then timeouts."""

    def __init__(self) -> None:
        self.remote_device = types.SimpleNamespace(
            node_map=types.SimpleNamespace(
                ExposureAuto=_FakeFeature("Continuous"),
                ExposureTime=_FakeFeature(1000.0),
                AcquisitionFrameRate=_FakeFeature(10.0),
            )
        )
        self.buffers = [_FakeBuffer(7), _FakeBuffer(8)]
        self.handed_out: list[_FakeBuffer] = []
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def try_fetch(self, *, timeout: float) -> _FakeBuffer | None:
        assert timeout > 0
        if not self.buffers:
            return None
        self.handed_out.append(self.buffers.pop(0))
        return self.handed_out[-1]

    def stop(self) -> None:
        self.calls.append("stop")

    def destroy(self) -> None:
        self.calls.append("destroy")


class _FakeHarvester:
    last: _FakeHarvester | None = None

    def __init__(self) -> None:
        self.files: list[str] = []
        self.device_info_list: list[Any] = []
        self.acquirer = _FakeAcquirer()
        self.created_with: Any = None
        self.was_reset = False
        _FakeHarvester.last = self

    def add_file(self, path: str) -> None:
        self.files.append(path)

    def update(self) -> None:
        self.device_info_list = [types.SimpleNamespace(serial_number="S1"), types.SimpleNamespace(serial_number="S2")]

    def create(self, key: Any) -> _FakeAcquirer:
        self.created_with = key
        return self.acquirer

    def reset(self) -> None:
        self.was_reset = True


@pytest.fixture
def fake_harvesters(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Installs a stand-in ``harvesters.core`` and returns the path of a (dummy) .cti file."""
    package = types.ModuleType("harvesters")
    core = types.ModuleType("harvesters.core")
    core.Harvester = _FakeHarvester  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "harvesters", package)
    monkeypatch.setitem(sys.modules, "harvesters.core", core)
    cti = tmp_path / "producer.cti"
    cti.write_bytes(b"")
    return cti


def test_gige_harvesters_acquisition(fake_harvesters: Path) -> None:
    camera = GigeCamera(GigeCameraConfig(cti_file=fake_harvesters, serial="S2", fps=20.0, exposure_us=2500.0))
    camera.open()
    harvester = _FakeHarvester.last
    assert harvester is not None
    assert harvester.files == [str(fake_harvesters)]
    assert harvester.created_with == {"serial_number": "S2"}
    node_map = harvester.acquirer.remote_device.node_map
    assert (node_map.ExposureAuto.value, node_map.ExposureTime.value) == ("Off", 2500.0)
    assert node_map.AcquisitionFrameRate.value == 20.0
    assert camera.warnings == ()  # AcquisitionFrameRateEnable is optional: this camera has none
    frames = [camera.read(timeout_ms=50) for _ in range(3)]
    camera.close()
    camera.close()
    assert frames[2] is None
    assert [f.index for f in frames if f is not None] == [7, 8]
    first = frames[0]
    assert first is not None and first.image.shape == (4, 6, 3) and int(first.image[0, 0, 0]) == 57
    assert all(buffer.queued for buffer in harvester.acquirer.handed_out)
    assert harvester.acquirer.calls == ["start", "stop", "destroy"]
    assert harvester.was_reset


def test_gige_harvesters_unknown_serial_lists_cameras(fake_harvesters: Path) -> None:
    camera = GigeCamera(GigeCameraConfig(cti_file=fake_harvesters, serial="NOPE"))
    with pytest.raises(SourceError, match="no GigE Vision camera with serial NOPE; cameras found: S1, S2"):
        camera.open()
    assert _FakeHarvester.last is not None and _FakeHarvester.last.was_reset


def test_gige_harvesters_needs_a_cti_file(fake_harvesters: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cti_file"):
        GigeCamera(GigeCameraConfig()).open()
    with pytest.raises(SourceError, match="does not exist"):
        GigeCamera(GigeCameraConfig(cti_file=tmp_path / "missing.cti")).open()


# -- replay ---------------------------------------------------------------------------------------------------------


def read_frames(source: ReplaySource, count: int, timeout_s: float = 5.0) -> list[Frame]:
    """Read ``count`` frames, each within the deadline."""
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    while len(frames) < count:
        assert time.monotonic() < deadline, f"only {len(frames)} of {count} frames in {timeout_s} s"
        frame = source.read(timeout_ms=100)
        if frame is not None:
            frames.append(frame)
    return frames


def test_replay_folder_in_name_order_then_finished(image_folder: Path) -> None:
    source = ReplaySource(ReplayCameraConfig(path=image_folder, fps=200.0, loop=False))
    assert isinstance(source, FrameSource)
    assert source.name == f"replay:{image_folder}"
    source.open()
    try:
        frames = read_frames(source, 3)
        assert not source.finished
        assert source.read(timeout_ms=20) is None
        assert source.finished
        assert source.read(timeout_ms=1) is None
    finally:
        source.close()
    assert [brightness(f) for f in frames] == [0, 1, 2]
    assert [f.index for f in frames] == [0, 1, 2]
    assert all(f.image.shape == (48, 64, 3) and not f.image.flags.writeable for f in frames)
    assert source.warnings == ()
    source.open()  # opening again starts over
    try:
        assert not source.finished
        assert brightness(read_frames(source, 1)[0]) == 0
    finally:
        source.close()


def test_replay_is_paced_at_its_fps(image_folder: Path) -> None:
    source = ReplaySource(ReplayCameraConfig(path=image_folder, fps=10.0))
    source.open()
    try:
        first = source.read(timeout_ms=100)
        assert first is not None
        assert source.read(timeout_ms=1) is None  # the next frame is due in 100 ms
        frames = read_frames(source, 2)
    finally:
        source.close()
    # Frames keep to the schedule (a late frame does not delay the ones after it); 1 ms for clock granularity.
    since_first = np.array([f.timestamp_ms for f in frames]) - first.timestamp_ms
    assert np.all(since_first >= np.array([100.0, 200.0]) - 1.0), since_first


def test_replay_loops(image_folder: Path) -> None:
    source = ReplaySource(ReplayCameraConfig(path=image_folder, fps=1000.0, loop=True))
    source.open()
    try:
        frames = read_frames(source, 7)
    finally:
        source.close()
    assert [brightness(f) for f in frames] == [0, 1, 2, 0, 1, 2, 0]
    assert [f.index for f in frames] == list(range(7))
    assert not source.finished


def test_replay_skips_unreadable_images(image_folder: Path) -> None:
    (image_folder / "fov_01b.png").write_bytes(b"\x89PNG but truncated")
    source = ReplaySource(ReplayCameraConfig(path=image_folder, fps=1000.0, loop=False))
    source.open()
    try:
        frames = read_frames(source, 3)
    finally:
        source.close()
    assert [brightness(f) for f in frames] == [0, 1, 2]
    assert len(source.warnings) == 1 and "fov_01b.png" in source.warnings[0]


def test_replay_of_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        ReplaySource(ReplayCameraConfig(path=tmp_path / "empty")).open()
    with pytest.raises(SourceError, match="does not exist"):
        ReplaySource(ReplayCameraConfig(path=tmp_path / "missing")).open()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"nope")
    source = ReplaySource(ReplayCameraConfig(path=tmp_path / "bad"))
    source.open()
    with pytest.raises(SourceError, match="none of the images"):
        source.read(timeout_ms=10)


def test_replay_video_file(video_file: Path) -> None:
    source = ReplaySource(ReplayCameraConfig(path=video_file, fps=1000.0, loop=False))
    source.open()
    try:
        frames = read_frames(source, N_FRAMES)
        assert source.read(timeout_ms=10) is None and source.finished
    finally:
        source.close()
    assert [f.index for f in frames] == list(range(N_FRAMES))
    assert abs(brightness(frames[-1]) - (N_FRAMES - 1)) <= 1


def test_replay_video_file_loops(video_file: Path) -> None:
    source = ReplaySource(ReplayCameraConfig(path=video_file, fps=1000.0, loop=True))
    source.open()
    try:
        frames = read_frames(source, N_FRAMES + 2)
    finally:
        source.close()
    assert abs(brightness(frames[N_FRAMES]) - 0) <= 1
    assert frames[-1].index == N_FRAMES + 1


# -- factory --------------------------------------------------------------------------------------------------------


def test_open_source_picks_the_source(image_folder: Path) -> None:
    assert isinstance(open_source(UsbCameraConfig(device=0), 0.25), UsbCamera)
    assert isinstance(open_source(GigeCameraConfig(), 0.25), GigeCamera)
    assert isinstance(open_source(ReplayCameraConfig(path=image_folder), 0.25), ReplaySource)


def test_open_source_builds_the_simulated_microscope(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, float]] = []

    class SimulatedMicroscope:
        def __init__(self, config: SimulatedCameraConfig, pixel_size_um: float) -> None:
            calls.append((config, pixel_size_um))

        @property
        def name(self) -> str:
            return "simulated"

        def open(self) -> None: ...

        def read(self, timeout_ms: float) -> Frame | None:
            return None

        def close(self) -> None: ...

    module = types.ModuleType("her2scope.daemon.simulator")
    module.SimulatedMicroscope = SimulatedMicroscope  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "her2scope.daemon.simulator", module)
    config = SimulatedCameraConfig()
    source = open_source(config, 0.25)
    assert isinstance(source, SimulatedMicroscope)
    assert calls == [(config, 0.25)]
