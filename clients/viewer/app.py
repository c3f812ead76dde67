"""The viewer's loops: an OpenCV window, or PNG frames without a display, fed by the link and showing ``render``."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2

from her2scope.clients.viewer.geometry import DEFAULT_SIZE, Size
from her2scope.clients.viewer.link import DaemonLink
from her2scope.clients.viewer.render import render
from her2scope.clients.viewer.state import Click, Hover, ViewerState, apply, press


def has_display() -> bool:
    """Whether a window can be opened (an X11 or Wayland display on Linux)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


WINDOW_TITLE = "her2scope"


def run_window(link: DaemonLink, state: ViewerState, size: Size = DEFAULT_SIZE) -> ViewerState:
    """Show the viewer in an OpenCV window until q (or the window is closed); returns the last state."""
    mouse: list[Click | Hover] = []

    def on_mouse(event: int, x: int, y: int, _flags: int, _param: Any | None) -> None:
        if event == cv2.EVENT_LBUTTONDOWN:
            mouse.append(Click(x, y, size))
        elif event == cv2.EVENT_MOUSEMOVE:
            mouse.append(Hover(x, y, size))

    cv2.namedWindow(WINDOW_TITLE, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
    cv2.setMouseCallback(WINDOW_TITLE, on_mouse)
    state = link.start(state)
    try:
        while True:
            state = link.poll(state, 0)
            while mouse:
                state = apply(state, mouse.pop(0))
            cv2.imshow(WINDOW_TITLE, render(state, size))
            key = cv2.waitKey(15)
            if key != -1:
                state, actions = press(state, key & 0xFF)
                state, stop = link.perform(state, actions)
                if stop:
                    break
            if cv2.getWindowProperty(WINDOW_TITLE, cv2.WND_PROP_VISIBLE) < 1:
                break
    finally:
        cv2.destroyWindow(WINDOW_TITLE)
    return state


def run_headless(
    link: DaemonLink, state: ViewerState, frames: int, out: Path, size: Size = DEFAULT_SIZE, interval_s: float = 0.2
) -> tuple[ViewerState, list[Path]]:
    """Render ``frames`` frames, one every ``interval_s``, to ``out/viewer-NNNN.png`` without a window."""
    out.mkdir(parents=True, exist_ok=True)
    state = link.start(state)
    written = []
    for index in range(1, frames + 1):
        deadline = time.monotonic() + interval_s
        while (remaining := deadline - time.monotonic()) > 0:
            state = link.poll(state, remaining * 1000)
        path = out / f"viewer-{index:04d}.png"
        ok, png = cv2.imencode(".png", render(state, size))
        if not ok:  # pragma: no cover - encoding a uint8 BGR image does not fail
            raise OSError(f"{path}: could not encode the frame")
        path.write_bytes(png.tobytes())
        written.append(path)
    return state, written


def parse_size(text: str) -> Size:
    """``"1600x900"`` -> (900, 1600) rows, cols; ValueError for anything else."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"window size {text!r} must be WIDTHxHEIGHT, e.g. 1600x900") from None
    if not (800 <= width <= 7680 and 500 <= height <= 4320):
        raise ValueError(f"window size {text!r} must be between 800x500 and 7680x4320")
    return (height, width)
