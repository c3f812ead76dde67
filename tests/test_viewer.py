"""The viewer: its pure reducer and renderer on synthetic messages, its link to a real daemon, and its real window
under Xvfb.

The pure tests build protocol messages with ``daemon.protocol.encode`` exactly as the daemon publishes them. The
daemon tests run the daemon as a real process on the simulated microscope and drive the viewer's client loop
headless (``DaemonLink.poll``), with the keys and clicks a pathologist would use. The window tests start Xvfb
(Debian package ``xvfb``) and read the X screen from the framebuffer file Xvfb keeps (``-fbdir``, XWD format);
real key presses and clicks reach the window from xdotool (Debian package ``xdotool``), through XTEST.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from her2scope.clients import viewer
from her2scope.clients.viewer import (
    Click,
    ImageFetched,
    Quit,
    Responding,
    Send,
    Silent,
    Snapshot,
    Stale,
    Tick,
    ViewerState,
    apply,
    press,
    render,
)
from her2scope.daemon.protocol import (
    CaptureBody,
    CaseBody,
    Message,
    OverlayBody,
    Topic,
    decode,
)
from her2scope.scoring.overlay import LAYER_NAMES
from tests.helpers.daemon import CONFIG, DEADLINE_S, Daemon, arrive, next_message, wait_for
from tests.helpers.processes import die_with_parent
from tests.helpers.viewer import (
    CASE_ID,
    SESSION,
    Daemonish,
    case_summary,
    connected,
    fov_entry,
    status_body,
)

SIZE = viewer.DEFAULT_SIZE
FOV_SHAPE = (1080, 1920)  # full resolution
OVERLAY_SHAPE = (270, 480)  # the overlay's width is a display size, not the FOV's


def _solid(bgr: tuple[int, int, int], shape: tuple[int, int] = (540, 960)) -> np.ndarray:
    image = np.empty((*shape, 3), np.uint8)
    image[:] = bgr
    return image


def _layers() -> dict[str, np.ndarray]:
    """Overlay layers: 'cells' a filled red disc in the middle, 'region' a cyan frame; 'panel' empty."""
    cells = np.zeros((*OVERLAY_SHAPE, 4), np.uint8)
    cv2.circle(cells, (OVERLAY_SHAPE[1] // 2, OVERLAY_SHAPE[0] // 2), 40, (20, 20, 230, 255), -1)
    region = np.zeros((*OVERLAY_SHAPE, 4), np.uint8)
    cv2.rectangle(region, (5, 5), (OVERLAY_SHAPE[1] - 6, OVERLAY_SHAPE[0] - 6), (220, 200, 0, 200), 3)
    panel = np.zeros((*OVERLAY_SHAPE, 4), np.uint8)
    return {"cells": cells, "intensity": np.zeros_like(cells), "completeness": panel, "region": region, "panel": panel}


def with_fov(daemon: Daemonish, state: ViewerState, fov_id: str = "fov-001", kind: str = "fov") -> ViewerState:
    """Capture, result, the lossless image (1080x1920, grey-green) and the overlay of one FOV."""
    state = apply(state, daemon.capture(fov_id, kind))
    state = apply(state, daemon.result(fov_id, case_summary(fov_entry(fov_id, kind=kind))))
    state = apply(state, ImageFetched(fov_id, _solid((120, 160, 140), FOV_SHAPE)))
    return apply(state, daemon.overlay(fov_id, _layers(), kind))


def big_image_rect(state: ViewerState, shape: tuple[int, int]) -> viewer.Rect:
    return viewer.fit(viewer.image_area(viewer.layout(SIZE).big), shape)


def centre(rect: viewer.Rect) -> tuple[int, int]:
    """(row, col) of the middle of a rectangle."""
    return rect.y + rect.h // 2, rect.x + rect.w // 2


# --- pure: reducer and renderer -----------------------------------------------------------------------------------


def test_the_newest_preview_is_shown_in_the_live_pane() -> None:
    daemon = Daemonish()
    state = apply(connected(daemon), daemon.preview(10, _solid((0, 200, 0))))
    assert state.big == "live"
    frame = render(state, SIZE)
    assert frame.shape == (*SIZE, 3) and frame.dtype == np.uint8
    row, col = centre(big_image_rect(state, (540, 960)))
    np.testing.assert_allclose(frame[row, col], (0, 200, 0), atol=6)


def test_a_stale_preview_never_replaces_a_newer_one() -> None:
    daemon = Daemonish()
    state = apply(connected(daemon), daemon.preview(10, _solid((0, 200, 0))))
    newest = state.preview
    state = apply(state, daemon.preview(9, _solid((200, 0, 0))))  # older frame, delivered late
    assert state.preview is newest and state.preview_frame_index == 10
    state = apply(state, daemon.preview(10, _solid((200, 0, 0))))  # the same frame again
    assert state.preview is newest
    state = apply(state, daemon.preview(11, _solid((200, 0, 0))))
    assert state.preview_frame_index == 11 and state.preview is not None
    np.testing.assert_allclose(state.preview[100, 100], (200, 0, 0), atol=6)
    restarted = Daemonish(session="fedcba9876543210")  # a restarted daemon counts frames from 0 again
    state = apply(state, restarted.preview(1, _solid((0, 0, 200))))
    assert state.preview_frame_index == 1


def test_a_capture_shows_the_fov_with_its_overlay_and_layers_toggle() -> None:
    daemon = Daemonish()
    state = with_fov(daemon, apply(connected(daemon), daemon.preview(3, _solid((0, 200, 0)))))
    assert state.shown_fov == "fov-001" and state.big == "fov"
    fov = state.fovs["fov-001"]
    assert fov.shape == FOV_SHAPE and fov.layers.keys() == set(LAYER_NAMES)
    assert fov.base is not None and fov.base.shape[:2] == OVERLAY_SHAPE  # downscaled to the overlay's width
    rect = big_image_rect(state, OVERLAY_SHAPE)
    row, col = centre(rect)
    with_cells = render(state, SIZE)
    np.testing.assert_allclose(with_cells[row, col], (20, 20, 230), atol=8)  # the red disc of the cells layer
    state, actions = press(state, ord("1"))
    assert actions == () and "cells" not in state.visible_layers
    without_cells = render(state, SIZE)
    np.testing.assert_allclose(without_cells[row, col], (120, 160, 140), atol=8)  # the FOV image itself
    edge = (rect.y + rect.h * 5 // 270 + 1, col)  # on the region layer's frame, still shown
    assert not np.array_equal(with_cells[edge], without_cells[row, col])
    state, _ = press(state, ord("4"))
    assert "region" not in state.visible_layers
    state, _ = press(state, ord("1"))
    assert "cells" in state.visible_layers
    state, _ = press(state, ord("2"))  # the intensity layer, hidden by default
    assert "intensity" in state.visible_layers


def test_tab_switches_the_big_view_and_moving_the_slide_goes_back_to_live() -> None:
    daemon = Daemonish()
    state = with_fov(daemon, connected(daemon))
    assert state.big == "fov"
    state = apply(state, daemon.preview(20, _solid((0, 200, 0)), stability="moving"))
    assert state.big == "live"  # following: the pathologist moves on
    state, _ = press(state, viewer.KEY_TAB)
    assert state.big == "fov" and not state.big_follows
    state = apply(state, daemon.preview(21, _solid((0, 200, 0)), stability="moving"))
    assert state.big == "fov"  # chosen by hand: it stays


def test_the_panel_lists_the_fovs_and_the_case_score() -> None:
    daemon = Daemonish()
    control = {
        "fov_id": "control-002",
        "intense_threshold_od": 0.45,
        "source": "positive control",
        "membrane_ridge_od": 0.64,
        "percentile_range": [50.0, 95.0],
        "n_membrane_pixels": 20000,
        "control_counts": {"0": 0, "1+": 0, "2+": 10, "3+": 90},
        "control_score": "3+",
        "qc_passed": True,
    }
    case = case_summary(
        fov_entry("fov-001", "2+"),
        fov_entry("control-002", "3+", kind="control", counts={"0": 0, "1+": 0, "2+": 10, "3+": 90}),
        fov_entry("fov-003", "1+", excluded=True, roi=True),
        fov_entry("fov-004", None, status="failed", counts=None, total=0, error="ValueError: no tissue"),
        fov_entry("fov-005", None, status="pending", counts=None, total=0),
        control=control,
    )
    state = apply(connected(daemon), daemon.result("fov-005", case))
    lines = viewer.panel_lines(state)
    texts = [line.text for line in lines]
    assert f"CASE {CASE_ID}" in texts
    assert "HER2 2+" in texts and "equivocal, reflex ISH" in texts and "HER2-low" in texts
    assert "0: 40.0%   1+: 30.0%   2+: 25.0%   3+: 5.0%" in texts
    assert any(t.startswith("control-002: calibrated, intense > 0.45 OD") for t in texts)
    assert not any("no positive control" in t for t in texts)
    rows = [line.row for line in lines if line.style == "row"]
    assert [line.text for line in lines if line.style == "row"] == [row.text for row in rows if row is not None]
    table = [row.cells + ((row.marks,) if row.marks else ()) for row in rows if row is not None]
    assert table[0] == ("FOV", "cells", "0", "1+", "2+", "3+", "score")
    assert table[1] == ("fov-001", "100", "40.0", "30.0", "25.0", "5.0", "2+")
    assert table[2] == ("control-002", "100", "0.0", "0.0", "10.0", "90.0", "3+")
    assert table[3] == ("fov-003", "100", "40.0", "30.0", "25.0", "5.0", "1+", "ROI excl.")
    assert table[4] == ("fov-004", "failed: ValueError: no tissue")
    assert table[5] == ("fov-005", "scoring…")
    bar = next(line for line in lines if line.style == "bar")
    assert bar.values == (40.0, 30.0, 25.0, 5.0)
    render(state, SIZE)  # every kind of line can be drawn


def test_the_case_summary_warns_without_a_positive_control() -> None:
    daemon = Daemonish()
    state = apply(connected(daemon), daemon.result("fov-001", case_summary(fov_entry("fov-001"))))
    texts = [line.text for line in viewer.panel_lines(state)]
    assert "! no positive control: the default intense threshold was used" in texts
    summary = viewer.terminal_summary(state)
    assert "HER2 2+" in summary and "fov-001" in summary and "daemon ok" in summary
    assert "no positive control" in summary


def test_no_open_case_is_said_so() -> None:
    state = viewer.initial_state(0.0)
    texts = [line.text for line in viewer.panel_lines(state)]
    assert texts[0] == "NO OPEN CASE" and "none yet" in texts
    render(state, SIZE)


@pytest.mark.parametrize("fov_shape", [(1080, 1920), (540, 960), (2048, 2448), (333, 517)])
@pytest.mark.parametrize(
    "rect", [viewer.Rect(12, 82, 1036, 583), viewer.Rect(0, 0, 480, 270), viewer.Rect(5, 7, 64, 41)]
)
def test_display_and_fov_coordinates_round_trip(fov_shape: tuple[int, int], rect: viewer.Rect) -> None:
    rng = np.random.default_rng(0)
    for row, col in rng.uniform(0, 1, (50, 2)) * (np.array(fov_shape) - 1):
        x, y = viewer.fov_to_display((row, col), rect, fov_shape)
        back = viewer.display_to_fov((x, y), rect, fov_shape)
        assert back is not None
        np.testing.assert_allclose(back, (row, col), atol=1e-9)
    # corners of the shown image are the FOV's corners; outside it is nothing
    top_left = viewer.display_to_fov((rect.x, rect.y), rect, fov_shape)
    assert top_left is not None and top_left[0] < fov_shape[0] / rect.h and top_left[1] < fov_shape[1] / rect.w
    assert viewer.display_to_fov((rect.x - 5, rect.y), rect, fov_shape) is None
    assert viewer.display_to_fov((rect.x, rect.y + rect.h + 5), rect, fov_shape) is None


def test_drawing_an_roi_maps_clicks_to_fov_pixels_and_sends_set_roi() -> None:
    daemon = Daemonish()
    state = with_fov(daemon, connected(daemon))
    state, actions = press(state, ord("r"))
    assert actions == () and state.mode == "roi" and state.mode_fov == "fov-001"
    rect = viewer.fov_display_rect(state, SIZE)
    assert rect == big_image_rect(state, OVERLAY_SHAPE)
    corners = [(0.25, 0.25), (0.25, 0.75), (0.75, 0.75), (0.75, 0.25)]  # (row, col) fractions of the FOV
    for fy, fx in corners:
        x, y = viewer.fov_to_display((fy * (FOV_SHAPE[0] - 1), fx * (FOV_SHAPE[1] - 1)), rect, FOV_SHAPE)
        state = apply(state, Click(round(x), round(y), SIZE))
    assert len(state.polygon) == 4
    render(state, SIZE)  # the polygon is drawn while it is being made
    state, actions = press(state, viewer.KEY_ENTER)
    assert state.mode == "view" and state.polygon == ()
    assert len(actions) == 1 and isinstance(actions[0], Send) and actions[0].command == "set-roi"
    assert actions[0].args["fov_id"] == "fov-001"
    pixels_per_display_pixel = FOV_SHAPE[1] / rect.w
    for (fy, fx), (row, col) in zip(corners, actions[0].args["polygon"], strict=True):
        assert row == pytest.approx(fy * (FOV_SHAPE[0] - 1), abs=pixels_per_display_pixel)
        assert col == pytest.approx(fx * (FOV_SHAPE[1] - 1), abs=pixels_per_display_pixel)


def test_a_region_needs_three_corners_and_esc_cancels() -> None:
    daemon = Daemonish()
    state = with_fov(daemon, connected(daemon))
    state, _ = press(state, ord("w"))
    rect = viewer.fov_display_rect(state, SIZE)
    assert rect is not None and state.mode == "weak"
    state = apply(state, Click(rect.x + 10, rect.y + 10, SIZE))
    state = apply(state, Click(rect.x - 50, rect.y + 10, SIZE))  # outside the FOV: ignored
    assert len(state.polygon) == 1 and state.notice_error
    state, _ = press(state, viewer.KEY_BACKSPACE)
    assert state.polygon == ()
    state = apply(state, Click(rect.x + 10, rect.y + 10, SIZE))
    state, actions = press(state, viewer.KEY_ENTER)
    assert actions == () and state.mode == "weak"
    state, actions = press(state, viewer.KEY_ESC)
    assert actions == () and state.mode == "view" and state.polygon == ()


def test_the_intense_region_is_drawn_on_the_control() -> None:
    daemon = Daemonish()
    state = connected(daemon)
    state, _ = press(state, ord("i"))
    assert state.mode == "view" and "press k" in state.notice  # no control yet
    state = with_fov(daemon, state, "control-001", kind="control")
    state = with_fov(daemon, state, "fov-002")
    state, _ = press(state, ord("i"))
    assert state.mode == "intense" and state.mode_fov == "control-001" and state.shown_fov == "control-001"
    rect = viewer.fov_display_rect(state, SIZE)
    assert rect is not None
    for dx, dy in ((10, 10), (200, 10), (200, 150)):
        state = apply(state, Click(rect.x + dx, rect.y + dy, SIZE))
    _, actions = press(state, viewer.KEY_RETURN)
    assert isinstance(actions[0], Send) and actions[0].command == "set-intense"
    assert actions[0].args["fov_id"] == "control-001" and len(actions[0].args["polygon"]) == 3


def test_keys_ask_for_commands() -> None:
    state = connected()
    expected = {" ": "capture", "c": "capture", "k": "capture-control", "n": "start-case", "x": "close-case"}
    for key, command in expected.items():
        _, actions = press(state, ord(key))
        assert actions == (Send(command),)
    _, actions = press(state, ord("a"))  # auto-capture is on: the key turns it off
    assert actions == (Send("auto-capture", {"enabled": False}),)
    _, actions = press(state, ord("q"))
    assert actions == (Quit(),)
    state, actions = press(state, viewer.KEY_TAB)  # no FOV yet: nothing to switch to
    assert actions == () and state.big == "live"
    assert press(state, ord("z")) == (state, ())


def test_replies_are_shown_as_notices() -> None:
    state = apply(connected(), viewer.Replied("capture", False, error="no live frame to capture (camera lost)"))
    assert state.notice_error and "no live frame" in state.notice
    state = apply(state, viewer.Replied("capture", True, {"fov_id": "fov-009", "kind": "fov"}))
    assert not state.notice_error and "fov-009" in state.notice


@pytest.mark.parametrize(
    "frames",
    [
        [b"bogus", b"{}"],
        [b"status"],
        [b"status", b"not json"],
        [b"result", b'{"v": 1, "topic": "result", "seq": 5, "time_ms": 0, "body": {"fov_id": 3}}'],
        [b"status", b'{"v": 2, "topic": "status", "seq": 5, "time_ms": 0, "body": {}}'],
    ],
)
def test_a_malformed_message_is_counted_and_skipped(frames: list[bytes]) -> None:
    state = connected()
    after = apply(state, frames)
    assert after.malformed == state.malformed + 1 and after.last_malformed
    assert dataclasses.replace(after, malformed=state.malformed, last_malformed="") == state
    render(after, SIZE)
    assert "1 malformed messages skipped" in viewer.terminal_summary(after)


def test_a_client_that_hands_images_on_keeps_the_daemons_png_and_decodes_nothing() -> None:
    """The browser viewer's state (draws=False): overlay layers stay the daemon's PNG bytes, checked by their header,
    no preview is decoded and no composite blended; the preview at capture still stands in for the FOV."""
    daemon = Daemonish()
    state = dataclasses.replace(connected(daemon), draws=False)
    frame = np.full((60, 80, 3), 128, np.uint8)
    state = apply(state, daemon.preview(1, frame))
    assert state.preview is None and state.preview_jpeg is not None
    state = apply(state, daemon.capture("fov-001"))
    assert state.fovs["fov-001"].base is not None  # decoded from the JPEG at capture only
    layers = _layers()
    overlay = daemon.overlay("fov-001", layers)
    shown = apply(state, overlay)
    fov = shown.fovs["fov-001"]
    assert fov.layers == {} and fov.composite is None
    assert set(fov.layer_files) == set(layers) and fov.layer_files[next(iter(layers))] == overlay[2]
    assert fov.overlay_shape == next(iter(layers.values())).shape[:2]
    broken = daemon.overlay("fov-001", layers)
    broken[2] = b"not a png"
    after = apply(state, broken)
    assert after.malformed == 1 and after.fovs["fov-001"].layer_files == {}
    wrong_size = daemon.overlay("fov-001", {name: layer[:-1] for name, layer in layers.items()})
    header = json.loads(wrong_size[1])
    header["body"]["height"] += 1  # says one row more than its PNGs have
    wrong_size[1] = json.dumps(header).encode()
    assert apply(state, wrong_size).malformed == 1


def test_well_framed_messages_with_bad_content_are_skipped_too() -> None:
    daemon = Daemonish()
    state = apply(connected(daemon), daemon.capture("fov-001"))
    broken = daemon.overlay("fov-001", _layers())
    broken[2] = b"not a png"
    after = apply(state, broken)
    assert after.malformed == 1 and "overlay" in after.last_malformed
    assert after.fovs["fov-001"].layers == {}
    odd = daemon.result("fov-001", case_summary())
    header = json.loads(odd[1])
    header["body"]["case"]["fovs"] = "nope"  # what no daemon sends: the protocol refuses it on decoding
    odd[1] = json.dumps(header).encode()
    odd_case = apply(after, odd)
    assert odd_case.malformed == 2 and odd_case.case == after.case
    healthy = apply(odd_case, daemon.overlay("fov-001", _layers()))
    assert healthy.fovs["fov-001"].layers.keys() == set(LAYER_NAMES)


def test_a_silent_daemon_is_shown_as_not_responding() -> None:
    """When the daemon is silent is the follower's to say (tests/test_follower.py); the viewer shows it."""
    daemon = Daemonish()
    state = apply(connected(daemon), daemon.preview(1, _solid((0, 200, 0))))
    assert viewer.status_segments(apply(state, Tick(2.9)))[0][0] == "daemon ok"
    silent = apply(apply(state, Tick(4.0)), Silent(3500.0))
    assert not viewer.daemon_responding(silent)
    first = viewer.status_segments(silent)[0][0]
    assert first == "daemon not responding (no heartbeat for 4 s)"
    frame = render(silent, SIZE)
    row, col = centre(viewer.image_area(viewer.layout(SIZE).big))
    np.testing.assert_array_equal(frame[row - 20, col], (40, 40, 150))  # the banner over the live view
    assert "not responding" in viewer.terminal_summary(silent)
    back = apply(silent, Responding())
    assert viewer.daemon_responding(back)
    _, actions = press(silent, ord(" "))
    assert actions == (Send("capture"),)  # asked for; DaemonLink.perform refuses to send it while silent


def test_before_a_connection_the_viewer_says_it_is_connecting() -> None:
    state = viewer.initial_state(0.0)
    assert viewer.status_segments(apply(state, Tick(1.0)))[0][0] == "connecting…"
    silent = apply(apply(state, Tick(3.0)), Silent(3000.0))
    assert viewer.status_segments(silent)[0][0] == "daemon not responding (no heartbeat for 3 s)"


def test_messages_older_than_the_snapshot_are_ignored_but_overlays_kept() -> None:
    """The follower hands on what it does not apply as Stale (tests/test_follower.py): only an overlay is news."""
    daemon = Daemonish()
    old_result = daemon.result("fov-001", case_summary(fov_entry("fov-001", "3+")))
    old_overlay = daemon.overlay("fov-001", _layers())
    snapshot = {
        "last_seq": daemon.seq,
        "session": SESSION,
        "case": case_summary(fov_entry("fov-001")),
        "status": status_body(),
    }
    state = apply(viewer.initial_state(0.0), Snapshot(snapshot))
    state = apply(state, Stale(decode(old_result)))
    assert state.case.fovs[0].score == "2+"  # the snapshot is newer
    state = apply(state, Stale(decode(old_overlay)))
    assert state.fovs["fov-001"].layers and state.shown_fov == "fov-001"


def test_a_new_case_forgets_the_fovs_of_the_previous_one() -> None:
    daemon = Daemonish()
    state = with_fov(daemon, connected(daemon))
    new_case = {**case_summary(), "case_id": "case-2", "fovs": [], "case": None}
    body = CaseBody(event="started", case=new_case, params={}, rule={}, pixel_size_um=0.25, software={})
    state = apply(state, daemon.frames(Topic.CASE, body))
    assert state.fovs == {} and state.shown_fov is None and state.case.case_id == "case-2"
    assert "case-2 started" in state.notice
    render(state, SIZE)


def test_the_lossless_image_is_fetched_after_the_overlay_once_it_is_on_disk() -> None:
    daemon = Daemonish()
    state = apply(connected(daemon), daemon.preview(3, _solid((0, 200, 0))))
    state = apply(state, daemon.capture("fov-001"))
    assert state.fovs["fov-001"].base is state.preview  # the preview at capture stands in
    assert viewer.image_wanted(state) is None  # scoring: leave the daemon alone
    state = apply(state, daemon.overlay("fov-001", _layers()))
    assert viewer.image_wanted(state) is None  # no heartbeat since: the image may still be written
    state = apply(state, daemon.status(unsaved_images=1))
    assert viewer.image_wanted(state) is None
    state = apply(state, daemon.status())
    assert viewer.image_wanted(state) == "fov-001"
    state = apply(state, ImageFetched("fov-001", None, "the image of fov-001 cannot be read"))
    assert viewer.image_wanted(state) is None and state.notice_error  # not asked again and again
    drawing = apply(connected(daemon), daemon.capture("fov-002"))
    drawing, _ = press(drawing, ord("w"))
    assert viewer.image_wanted(drawing) == "fov-002"  # drawing needs the FOV's size now


def test_render_is_pure() -> None:
    daemon = Daemonish()
    state = with_fov(daemon, apply(connected(daemon), daemon.preview(3, _solid((0, 200, 0)))))
    state, _ = press(state, ord("r"))
    state = apply(state, Click(300, 300, SIZE))
    before = {name: layer.copy() for name, layer in state.fovs["fov-001"].layers.items()}
    first, second = render(state, SIZE), render(state, SIZE)
    np.testing.assert_array_equal(first, second)
    for name, layer in state.fovs["fov-001"].layers.items():
        np.testing.assert_array_equal(layer, before[name])
    assert state.preview is not None and not state.preview.flags.writeable
    small = render(state, (600, 1000))
    assert small.shape == (600, 1000, 3)


# --- with a real daemon -------------------------------------------------------------------------------------------

VIEWER_CONFIG = CONFIG + "\n[daemon.preview]\noverlay_width_px = 640\n"  # FOV 960 wide, overlays 640: a real scale


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("viewer-daemon")
    state = root / "state"
    config = root / "config.toml"
    config.write_text(VIEWER_CONFIG.format(state=state))
    running = Daemon(state, config, root / "daemon.log")
    running.control.call("auto-capture", enabled=False)
    running.control.call("stage", action="goto-field", field=0)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.stop()


class Driven:
    """The viewer's client loop driven headless, as the window drives it: keys, clicks, and ``DaemonLink.poll``."""

    def __init__(self, link: viewer.DaemonLink, state: ViewerState) -> None:
        self.link = link
        self.state = state

    def until(self, condition: Any, what: str) -> ViewerState:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            self.state = self.link.poll(self.state, 20)
            if condition(self.state):
                return self.state
        raise AssertionError(f"timed out waiting for {what}; notice: {self.state.notice!r}")

    def press(self, key: int) -> ViewerState:
        self.state, actions = press(self.state, key)
        self.state, stop = self.link.perform(self.state, actions)
        assert not stop
        assert not self.state.notice_error, self.state.notice
        return self.state

    def click(self, x: int, y: int) -> None:
        self.state = apply(self.state, Click(x, y, SIZE))

    def capture(self, key: int = ord(" ")) -> str:
        """Press a capture key; wait until the FOV shows with its overlay; its id."""
        fov_id = self.press(key).notice.split()[1].rstrip(":")
        self.until(has_overlay(fov_id), f"the overlay of {fov_id}")
        return fov_id


def has_overlay(fov_id: str) -> Any:
    def check(state: ViewerState) -> bool:
        fov = state.fovs.get(fov_id)
        return fov is not None and bool(fov.layers) and fov.composite is not None and fov.shape is not None

    return check


@pytest.fixture(scope="module")
def driven(daemon: Daemon) -> Iterator[Driven]:
    endpoints = viewer.Endpoints(daemon.endpoints["publish"], daemon.endpoints["control"])
    with viewer.DaemonLink(endpoints, control_timeout_ms=5000, heartbeat_ms=300) as link:
        state = link.start(viewer.initial_state(time.monotonic()))
        assert state.session is not None
        running = Driven(link, state)
        running.until(lambda s: s.preview is not None and s.status is not None, "a preview and a heartbeat")
        yield running


@pytest.mark.e2e
def test_a_capture_brings_the_fov_and_its_overlay_into_the_viewer(driven: Driven, daemon: Daemon) -> None:
    arrive(daemon, "field 0")
    fov_id = driven.capture()
    state = driven.state
    fov = state.fovs[fov_id]
    assert state.shown_fov == fov_id and state.big == "fov"
    assert fov.shape == (540, 960)  # the FOV's real size, from the image command
    assert fov.layers["cells"].shape == (360, 640, 4)  # overlays at the configured width
    assert fov.composite is not None and fov.composite.shape == (360, 640, 3)
    entry = state.case.fov(fov_id)
    assert entry is not None and entry.status == "scored"
    assert any(line.text.startswith(fov_id) for line in viewer.panel_lines(state) if line.style == "row")
    assert viewer.fov_details(state)[0][0].startswith(f"{fov_id}: HER2")
    frame = render(state, SIZE)
    assert frame.std() > 10


@pytest.mark.e2e
def test_an_roi_drawn_in_the_viewer_is_sent_and_the_fov_rescored(driven: Driven, daemon: Daemon) -> None:
    fov_id = driven.capture(ord("c"))
    before = driven.state.fovs[fov_id].overlay_seq
    total_before = driven.state.case.fov(fov_id).total  # type: ignore[union-attr]
    driven.press(ord("r"))
    rect = viewer.fov_display_rect(driven.state, SIZE)
    assert rect is not None and driven.state.mode == "roi" and driven.state.mode_fov == fov_id
    for fy, fx in ((0.1, 0.1), (0.1, 0.5), (0.6, 0.5), (0.6, 0.1)):  # the upper-left quarter or so
        driven.click(rect.x + round(fx * rect.w), rect.y + round(fy * rect.h))
    polygon = driven.state.polygon
    assert polygon[2][0] == pytest.approx(0.6 * 540, abs=2) and polygon[2][1] == pytest.approx(0.5 * 960, abs=2)
    assert "set-roi sent" in driven.press(viewer.KEY_ENTER).notice

    def rescored(s: ViewerState) -> bool:
        entry = s.case.fov(fov_id)
        return entry is not None and entry.roi and entry.status == "scored" and s.fovs[fov_id].overlay_seq > before

    state = driven.until(rescored, "the re-scored FOV with its ROI")
    entry = state.case.fov(fov_id)
    assert entry is not None and entry.total < total_before  # fewer cells inside the ROI
    adjustments = state.case.adjustments
    assert adjustments[-1].action == "set-roi" and adjustments[-1].args["fov_id"] == fov_id


@pytest.mark.e2e
def test_the_viewer_follows_a_control_capture(driven: Driven, daemon: Daemon) -> None:
    daemon.control.call("stage", action="goto-control")
    arrive(daemon, "control")
    fov_id = driven.capture(ord("k"))
    state = driven.until(lambda s: bool((s.status or {}).get("control_calibrated")), "the calibration")
    texts = [line.text for line in viewer.panel_lines(state)]
    assert any(t.startswith(f"{fov_id}: calibrated") for t in texts)
    segments = [text for text, _ in viewer.status_segments(state)]
    assert "control calibrated" in segments
    assert "20x (0.5 µm/px)" in segments  # the objective in use, from the daemon's status
    daemon.control.call("stage", action="goto-field", field=1)
    arrive(daemon, "field 1")
    fov_id = driven.capture()
    assert "positive control" in viewer.fov_details(driven.state)[3][0]


VIEW_COMMAND = (sys.executable, "-m", "her2scope", "view")


@pytest.mark.e2e
def test_the_headless_command_writes_frames(daemon: Daemon, tmp_path: Path) -> None:
    config = daemon.state.parent / "config.toml"
    out = tmp_path / "frames"
    arguments = ["--config", str(config), "--daemon-state", str(daemon.state), "--headless-frames", "3"]
    completed = subprocess.run(
        [*VIEW_COMMAND, *arguments, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert completed.returncode == 0, completed.stderr
    frames = sorted(out.glob("viewer-*.png"))
    assert len(frames) == 3
    image = cv2.imread(str(frames[-1]))
    assert image is not None and image.shape == (900, 1600, 3) and image.std() > 10
    assert "HER2" in completed.stdout and "3 frames written" in completed.stdout


# --- the real window under Xvfb -----------------------------------------------------------------------------------


def read_xwd(path: Path) -> np.ndarray:
    """The screen in an XWD file (as Xvfb's -fbdir keeps it): (rows, cols, 3) uint8 BGR; 24/32-bit TrueColor."""
    data = path.read_bytes()
    fields = struct.unpack(">25I", data[:100])
    header_size, version, _, depth, width, height = fields[:6]
    byte_order, bits_per_pixel, bytes_per_line, ncolors = fields[7], fields[11], fields[12], fields[19]
    assert version == 7 and depth == 24 and bits_per_pixel == 32, f"unexpected XWD layout {fields[:13]}"
    offset = header_size + 12 * ncolors
    pixels = np.frombuffer(data, np.uint8, count=bytes_per_line * height, offset=offset)
    pixels = pixels.reshape(height, bytes_per_line)[:, : width * 4].reshape(height, width, 4)
    return np.ascontiguousarray(pixels[:, :, :3] if byte_order == 0 else pixels[:, :, 3:0:-1])


@pytest.fixture
def xvfb(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (Debian package 'xvfb'): the real window cannot be tested")
    fbdir = tmp_path / "fb"
    fbdir.mkdir()
    read, write = os.pipe()
    server = subprocess.Popen(
        [
            "Xvfb",
            "-displayfd",
            str(write),
            "-screen",
            "0",
            "1920x1080x24",
            "-fbdir",
            str(fbdir),
            "-nolisten",
            "tcp",
            "-nocursor",
        ],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    os.close(write)
    try:
        number = b""
        deadline = time.monotonic() + 20
        while not number.endswith(b"\n") and time.monotonic() < deadline:
            chunk = os.read(read, 16)
            if not chunk:
                break
            number += chunk
        assert number.strip().isdigit(), f"Xvfb did not report its display (exit code {server.poll()})"
        yield f":{number.decode().strip()}", fbdir / "Xvfb_screen0"
    finally:
        os.close(read)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


@contextlib.contextmanager
def window_viewer(daemon: Daemon, display: str, framebuffer: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``her2scope view`` in its real window on ``display``, once the window shows; terminated at the end."""
    config = daemon.state.parent / "config.toml"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*VIEW_COMMAND, "--config", str(config), "--daemon-state", str(daemon.state)],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"},
            preexec_fn=die_with_parent,
        )
    try:
        rows, cols = SIZE
        layout = viewer.layout(SIZE)

        def window_shown() -> bool:
            screen = read_xwd(framebuffer)
            bar = screen[layout.status.y + 3, 300 : cols - 300]
            return bool(np.all(np.abs(bar.astype(int) - (22, 20, 19)) <= 2)) and screen[rows // 2, cols // 2].any()

        # a new process that imports OpenCV and NumPy, opens an X window and waits for a preview: on two busy
        # cores (a CPU hog and the rest of the suite) that took over 30 s, so it gets three times the usual deadline
        wait_for(
            window_shown,
            timeout_s=3 * DEADLINE_S,
            what=f"the viewer's window on {display} (log: {log.read_text(errors='replace')})",
        )
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def overlay_shown(framebuffer: Path) -> list[np.ndarray]:
    """``[screen]`` when the big pane shows a FOV with its cells layer, else ``[]`` (a ``wait_for`` predicate)."""
    screen = read_xwd(framebuffer)
    big = viewer.image_area(viewer.layout(SIZE).big)
    pane = screen[big.y : big.y + big.h, big.x : big.x + big.w].astype(int)
    # the cells layer's rings in the class colours: none of them are stain colours
    rings = sum(
        int(np.count_nonzero(np.all(np.abs(pane - colour) <= 12, axis=2))) for colour in viewer.CLASS_BGR.values()
    )
    return [screen] if rings > 200 else []


@pytest.mark.e2e
def test_the_real_window_shows_the_viewer_under_xvfb(
    daemon: Daemon, xvfb: tuple[str, Path], tmp_path: Path, driven: Driven
) -> None:
    display, framebuffer = xvfb
    log = tmp_path / "viewer.log"
    with window_viewer(daemon, display, framebuffer, log) as process:
        rows, cols = SIZE
        layout = viewer.layout(SIZE)
        with daemon.subscribe(Topic.OVERLAY) as overlays:
            fov = daemon.control.call("capture")
            next_message(overlays, lambda m: m.body.fov_id == fov["fov_id"], "the capture's overlay")  # type: ignore[attr-defined]
        shown = wait_for(lambda: overlay_shown(framebuffer), what="the FOV with its overlay in the window")
        assert isinstance(shown, list)
        screen = shown[0]
        assert process.poll() is None, log.read_text(errors="replace")
        window = screen[:rows, :cols]
        assert not screen[rows + 10 :, :].any() and not screen[:, cols + 10 :].any()  # the rest of the screen: black
        panel = window[
            layout.panel.y : layout.panel.y + layout.panel.h, layout.panel.x : layout.panel.x + layout.panel.w
        ]
        assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 50  # text and the class bar
        footer = window[layout.footer.y : layout.footer.y + layout.footer.h]
        assert len(np.unique(footer.reshape(-1, 3), axis=0)) > 10  # the key help
        target = Path(os.environ.get("HER2SCOPE_VIEWER_SCREENSHOT", tmp_path / "viewer.png"))
        assert cv2.imwrite(str(target), window, [cv2.IMWRITE_PNG_COMPRESSION, 9])


def xdotool(display: str, *arguments: str) -> str:
    """Run ``xdotool`` on ``display`` (within a deadline); its output. Fails the test when xdotool fails."""
    completed = subprocess.run(
        ["xdotool", *arguments],
        env={**os.environ, "DISPLAY": display},
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert completed.returncode == 0, f"xdotool {' '.join(arguments)}: {completed.stderr}"
    return completed.stdout


def drawn(screen: np.ndarray, area: viewer.Rect) -> int:
    """How many pixels of ``area`` of the screen have the colour regions are drawn in (``viewer.DRAW``)."""
    pixels = screen[area.y : area.y + area.h, area.x : area.x + area.w].astype(int)
    return int(np.count_nonzero(np.all(np.abs(pixels - viewer.DRAW) <= 40, axis=2)))


@pytest.mark.skipif(
    shutil.which("xdotool") is None,
    reason="xdotool is not installed (Debian package 'xdotool'): real key presses and clicks cannot be sent",
)
@pytest.mark.e2e
def test_keys_and_clicks_in_the_real_window_reach_the_daemon(
    daemon: Daemon, xvfb: tuple[str, Path], tmp_path: Path
) -> None:
    """Real X input (xdotool: XTEST key presses and pointer clicks) in the real window: capture, an ROI, quit."""
    display, framebuffer = xvfb
    log = tmp_path / "viewer.log"
    with window_viewer(daemon, display, framebuffer, log) as process:
        # No window manager on Xvfb: windowactivate (_NET_ACTIVE_WINDOW) fails, windowfocus (XSetInputFocus) works;
        # `key` without --window then goes through XTEST, as a real keyboard would.
        title = "^" + re.escape(viewer.WINDOW_TITLE) + "$"
        window = xdotool(display, "search", "--sync", "--onlyvisible", "--name", title).split()[0]
        xdotool(display, "windowfocus", "--sync", window)

        def fov_ids() -> list[str]:
            return [f["fov_id"] for f in daemon.control.call("snapshot")["case"]["fovs"]]

        before = fov_ids()
        with daemon.subscribe(Topic.CAPTURE, Topic.OVERLAY) as messages:
            xdotool(display, "key", "space")
            capture = next_message(messages, lambda m: m.header.topic == Topic.CAPTURE, "the capture of the space key")
            assert isinstance(capture.body, CaptureBody)
            assert capture.body.trigger == "control" and capture.body.kind == "fov"
            fov_id = capture.body.fov_id

            def its_overlay(message: Message) -> bool:
                return isinstance(message.body, OverlayBody) and message.body.fov_id == fov_id

            overlay = next_message(messages, its_overlay, f"the overlay of {fov_id}")
        assert fov_ids() == [*before, fov_id]
        assert isinstance(overlay.body, OverlayBody)
        shape = (overlay.body.height, overlay.body.width)

        xdotool(display, "key", "r")
        rect = viewer.fit(viewer.image_area(viewer.layout(SIZE).big), shape)  # as `fov_display_rect` places it
        banner = viewer.Rect(rect.x, rect.y, rect.w, 34)  # drawn once the FOV's size is known: clicks can land
        wait_for(lambda: drawn(read_xwd(framebuffer), banner) > 100, what="the ROI mode's banner in the window")
        fov_shape = (540, 960)  # the simulated camera's frame
        for fy, fx in ((0.15, 0.1), (0.15, 0.5), (0.6, 0.5), (0.6, 0.1)):
            x, y = (round(v) for v in viewer.fov_to_display((fy * fov_shape[0], fx * fov_shape[1]), rect, fov_shape))
            assert rect.contains(x, y)
            xdotool(display, "mousemove", "--window", window, str(x), str(y), "click", "1")

            def corner_drawn(x: int = x, y: int = y) -> bool:  # an accepted corner: a white dot in a magenta ring
                screen = read_xwd(framebuffer)
                return bool(screen[y, x].min() == 255) and drawn(screen, viewer.Rect(x - 6, y - 6, 13, 13)) > 10

            wait_for(corner_drawn, what=f"the corner clicked at ({x}, {y}) in the window")
        xdotool(display, "key", "Return")

        def rescored() -> bool:
            entry = next(f for f in daemon.control.call("snapshot")["case"]["fovs"] if f["fov_id"] == fov_id)
            return bool(entry["roi"]) and entry["status"] == "scored"

        wait_for(rescored, what=f"the ROI of {fov_id} to reach the daemon and the FOV to be re-scored")
        adjustments = daemon.control.call("snapshot")["case"]["adjustments"]
        assert adjustments[-1]["action"] == "set-roi" and adjustments[-1]["args"]["fov_id"] == fov_id

        xdotool(display, "key", "q")
        assert process.wait(timeout=DEADLINE_S) == 0, log.read_text(errors="replace")


@pytest.mark.e2e
def test_the_viewer_reconnects_to_a_restarted_daemon(daemon: Daemon, tmp_path: Path) -> None:
    found = viewer.resolve_endpoints(daemon.state.parent / "config.toml", daemon.state)
    endpoints, endpoints_dir, heartbeat_s = found
    assert endpoints_dir == daemon.state and heartbeat_s == pytest.approx(0.3)
    with viewer.DaemonLink(
        endpoints, endpoints_dir=endpoints_dir, control_timeout_ms=1000, heartbeat_ms=heartbeat_s * 1000.0
    ) as link:
        driven = Driven(link, link.start(viewer.initial_state(time.monotonic())))
        state = driven.until(viewer.daemon_responding, "the daemon's heartbeat")
        session, case_id = state.session, state.case.case_id
        assert case_id is not None
        assert daemon.stop() == 0
        state = driven.until(lambda s: not viewer.daemon_responding(s), "the viewer to notice the silence")
        assert viewer.status_segments(state)[0][0].startswith("daemon not responding")
        state, _ = link.perform(state, (Send("capture"),))
        assert state.notice_error and "not responding" in state.notice
        restarted = Daemon(daemon.state, daemon.state.parent / "config.toml", tmp_path / "restarted.log")
        try:
            assert restarted.endpoints["control"] != endpoints.control  # new random ports
            state = driven.until(
                lambda s: s.session != session and viewer.daemon_responding(s),
                "a snapshot of the restarted daemon",
            )
            assert state.case.case_id == case_id  # the daemon resumed the case
            assert link.endpoints.control == restarted.endpoints["control"]
        finally:
            restarted.stop()
