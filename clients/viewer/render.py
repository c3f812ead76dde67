"""The viewer's picture: ``render(state, size)``, a pure function of the state drawn with OpenCV."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any, Literal

import cv2
import numpy as np

from her2scope.clients.viewer.content import (
    CLASSES,
    TABLE_HEADER,
    TableRow,
    footer_segments,
    fov_details,
    pane_title,
    panel_lines,
    status_segments,
)
from her2scope.clients.viewer.geometry import DEFAULT_SIZE, TITLE_H, Rect, Size, fit, fov_to_display, image_area, layout
from her2scope.clients.viewer.palette import ACCENT, BACKGROUND, BAD, BAR, BGR, CLASS_BGR, DRAW, MUTED, SURFACE, TEXT
from her2scope.clients.viewer.state import MODE_NAMES, Image, ViewerState, composite_image, daemon_responding
from her2scope.scoring.overlay import LAYER_NAMES


@cache
def _font() -> Any | None:
    """OpenCV 5's built-in TrueType sans face, or None on OpenCV 4 (a Hershey font is used then)."""
    face = getattr(cv2, "FontFace", None)
    return None if face is None else face("sans")


def _text(canvas: Image, text: str, x: int, baseline: int, colour: BGR, px: int, *, bold: bool = False) -> int:
    """Draw ``text`` with its baseline at ``baseline`` and height ``px``; returns the x where it ends."""
    font = _font()
    if font is not None:
        end, _ = cv2.putText(canvas, text, (x, baseline), colour, font, px, 700 if bold else 400)
        return int(end[0])
    scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_DUPLEX, px)
    thickness = 2 if bold else 1
    cv2.putText(canvas, text, (x, baseline), cv2.FONT_HERSHEY_DUPLEX, scale, colour, thickness, cv2.LINE_AA)
    return x + int(cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, scale, thickness)[0][0])


def _text_width(text: str, px: int, *, bold: bool = False) -> int:
    font = _font()
    if font is not None:
        rect = cv2.getTextSize((0, 0), text, (0, 0), font, px, 700 if bold else 400)
        return int(rect[0] + rect[2])
    scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_DUPLEX, px)
    return int(cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, scale, 2 if bold else 1)[0][0])


def _wrap(text: str, width: int, px: int) -> list[str]:
    words, lines, current = text.split(" "), [], ""
    for word in words:
        candidate = f"{current} {word}" if current else word
        if current and _text_width(candidate, px) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current]


def _fill(canvas: Image, rect: Rect, colour: BGR) -> None:
    canvas[rect.y : rect.y + rect.h, rect.x : rect.x + rect.w] = colour


def _blit(canvas: Image, image: Image, area: Rect) -> Rect:
    """Draw ``image`` letterboxed into ``area``; returns where it went."""
    target = fit(area, (image.shape[0], image.shape[1]))
    interpolation = cv2.INTER_AREA if target.w < image.shape[1] else cv2.INTER_LINEAR
    canvas[target.y : target.y + target.h, target.x : target.x + target.w] = cv2.resize(
        image, (target.w, target.h), interpolation=interpolation
    )
    return target


def _layer_chips(canvas: Image, pane: Rect, state: ViewerState) -> None:
    """The layer keys at the right of the FOV pane's title: bright when shown, dim when hidden."""
    px = 15
    x = pane.x + pane.w - 10
    baseline = pane.y + TITLE_H - 9
    for index, name in reversed(list(enumerate(LAYER_NAMES, start=1))):
        on = name in state.visible_layers
        width = _text_width(f"{index} {name}", px, bold=True)
        x -= width
        end = _text(canvas, str(index), x, baseline, ACCENT if on else (90, 86, 82), px, bold=True)
        _text(canvas, name, end + 4, baseline, TEXT if on else (110, 105, 100), px, bold=on)
        x -= 16


def _pane(canvas: Image, state: ViewerState, pane: Rect, which: Literal["live", "fov"], big: bool) -> None:
    _fill(canvas, pane, SURFACE)
    title, colour = pane_title(state, which)
    if not big:
        title = "   ".join(title.split("   ")[:2])
    _text(canvas, title, pane.x + 10, pane.y + TITLE_H - 9, colour, 18 if big else 15, bold=True)
    if big and which == "fov" and state.shown_fov is not None:
        _layer_chips(canvas, pane, state)
    area = image_area(pane)
    _fill(canvas, area, (18, 16, 15))
    image: Image | None
    if which == "live":
        image = state.preview
        empty = "waiting for the live view…"
    else:
        fov = state.fovs.get(state.shown_fov or "")
        image = None if fov is None else fov.composite
        if fov is not None and (image is None or fov.composite_layers != state.visible_layers):
            image = composite_image(fov, state.visible_layers)
        empty = "no FOV captured yet: press space" if fov is None else "waiting for the FOV…"
    if image is None:
        px = 22 if big else 15
        width = _text_width(empty, px)
        _text(canvas, empty, area.x + (area.w - width) // 2, area.y + area.h // 2, MUTED, px)
        return
    target = _blit(canvas, image, area)
    if big and which == "fov" and state.mode != "view":
        _polygon(canvas, state, target)


def _polygon(canvas: Image, state: ViewerState, target: Rect) -> None:
    fov = state.fovs.get(state.mode_fov or "")
    if fov is None or fov.shape is None:
        return
    points = [fov_to_display(v, target, fov.shape) for v in state.polygon]
    pts = np.array([[round(x), round(y)] for x, y in points], np.int32).reshape(-1, 1, 2)
    if len(points) >= 2:
        cv2.polylines(canvas, [pts], False, DRAW, 2, cv2.LINE_AA)
    if points and state.hover is not None:
        last = pts[-1, 0]
        cv2.line(canvas, (int(last[0]), int(last[1])), state.hover, DRAW, 1, cv2.LINE_AA)
        if len(points) >= 2:
            first = pts[0, 0]
            cv2.line(canvas, state.hover, (int(first[0]), int(first[1])), (200, 120, 200), 1, cv2.LINE_AA)
    for x, y in pts[:, 0]:
        cv2.circle(canvas, (int(x), int(y)), 5, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(canvas, (int(x), int(y)), 5, DRAW, 2, cv2.LINE_AA)
    banner = f"{MODE_NAMES[state.mode]} on {state.mode_fov}: {len(points)} corners"
    banner += "   ·   click: add   backspace: undo   enter: send   esc: cancel"
    box = Rect(target.x, target.y, target.w, 34)
    region = canvas[box.y : box.y + box.h, box.x : box.x + box.w]
    region[:] = (region * 0.3 + np.array((20, 18, 17)) * 0.7).astype(np.uint8)
    _text(canvas, banner, box.x + 10, box.y + 23, DRAW, 16, bold=True)


def _status_bar(canvas: Image, rect: Rect, state: ViewerState) -> None:
    _fill(canvas, rect, BAR)
    baseline = rect.y + rect.h // 2 + 7
    x = _text(canvas, "her2scope", rect.x + 14, baseline, ACCENT, 19, bold=True) + 24
    case_id = state.case.case_id
    label = f"case {case_id}" if case_id else ""
    limit = rect.w - 30 - (_text_width(label, 17) if label else 0)
    for text, colour in status_segments(state):
        if x + 18 + _text_width(text, 17) > limit:
            break
        cv2.circle(canvas, (x + 6, baseline - 6), 6, colour, -1, cv2.LINE_AA)
        x = _text(canvas, text, x + 18, baseline, TEXT, 17) + 26
    if label:
        _text(canvas, label, rect.w - 14 - _text_width(label, 17), baseline, MUTED, 17)


def _footer(canvas: Image, rect: Rect) -> None:
    _fill(canvas, rect, BAR)
    baseline = rect.y + rect.h // 2 + 6
    x = rect.x + 14
    for key, what in footer_segments():
        x = _text(canvas, key, x, baseline, ACCENT, 15, bold=True) + 6
        x = _text(canvas, what, x, baseline, MUTED, 15) + 18


def _info(canvas: Image, rect: Rect, state: ViewerState) -> None:
    """The box under the big view: the notice (what just happened), the shown FOV's details, a debug line."""
    _fill(canvas, rect, SURFACE)
    x, width = rect.x + 14, rect.w - 28
    y = rect.y + 26
    bottom = rect.y + rect.h - 30
    lines: list[tuple[str, BGR, int, bool]] = []
    if not daemon_responding(state) and state.last_heard is not None:
        lines.append(("daemon not responding: retrying…", BAD, 17, True))
    if state.notice:
        lines.append((state.notice, BAD if state.notice_error else ACCENT, 16, False))
    lines.extend((text, colour, 16, i == 0) for i, (text, colour) in enumerate(fov_details(state)))
    for text, colour, px, bold in lines:
        if y > bottom:
            break
        for part in _wrap(text, width, px)[:2]:
            if y > bottom:
                break
            _text(canvas, part, x, y, colour, px, bold=bold)
            y += px + 7
    debug = f"seq {state.last_seq}   frame {state.preview_frame_index}   malformed messages skipped: {state.malformed}"
    if state.malformed:
        debug += f" (last: {state.last_malformed})"
    _text(canvas, _wrap(debug, width, 13)[0], x, rect.y + rect.h - 12, (120, 115, 110), 13)


STYLE_PX: Mapping[str, int] = {"heading": 15, "score": 44, "text": 19, "small": 16, "row": 16, "bar": 18, "gap": 10}
#: Table columns: right edges (fractions of the panel's width) of cells, % 0, % 1+, % 2+, % 3+ and score.
COLUMN_EDGES = (0.33, 0.45, 0.57, 0.69, 0.81, 0.92)


def _table_row(canvas: Image, row: TableRow, x: int, width: int, baseline: int, px: int) -> None:
    first, *numbers = row.cells
    header = row is TABLE_HEADER or row == TABLE_HEADER
    _text(canvas, first, x, baseline, row.colour, px, bold=header)
    if not numbers:
        _text(canvas, row.marks, x + round(COLUMN_EDGES[0] * width) - 40, baseline, row.colour, px)
        return
    for index, (cell, edge) in enumerate(zip(numbers, COLUMN_EDGES, strict=True)):
        colour = CLASS_BGR[CLASSES[index - 1]] if header and 1 <= index <= 4 else row.colour
        bold = header or index == 5
        if index == 5 and not header:
            colour = CLASS_BGR.get(cell, row.colour) if row.colour == TEXT else row.colour
        right = x + round(edge * width)
        _text(canvas, cell, right - _text_width(cell, px, bold=bold), baseline, colour, px, bold=bold)
    if row.marks:
        _text(canvas, row.marks, x + round(COLUMN_EDGES[-1] * width) + 8, baseline, MUTED, 13)


def _panel(canvas: Image, rect: Rect, state: ViewerState) -> None:
    _fill(canvas, rect, SURFACE)
    x, width = rect.x + 16, rect.w - 32
    y = rect.y + 10
    bottom = rect.y + rect.h - 8
    lines = panel_lines(state)
    rows = [line for line in lines if line.style == "row"]
    for index, line in enumerate(lines):
        px = STYLE_PX.get(line.style, 18)
        if line.style == "gap":
            y += px
            continue
        if line.style == "bar":
            y += 6
            left = x
            for value, name in zip(line.values, CLASSES, strict=False):
                w = round(width * value / 100)
                cv2.rectangle(canvas, (left, y), (left + w, y + px), CLASS_BGR[name], -1)
                left += w
            cv2.rectangle(canvas, (x, y), (x + width, y + px), MUTED, 1)
            y += px + 8
            continue
        if line.style == "row" and line.row is not None:
            if y + 2 * (px + 8) > bottom and line is not rows[-1]:
                _text(canvas, f"… and {len(rows) - rows.index(line)} more", x, y + px + 6, MUTED, 14)
                return
            y += px + 8
            _table_row(canvas, line.row, x, width, y, px)
            continue
        if line.style == "heading" and index > 0:
            cv2.line(canvas, (x, y + 2), (x + width, y + 2), (70, 66, 62), 1)
            y += 8
        parts = [line.text] if line.style == "score" else _wrap(line.text, width, px)
        for part in parts:
            y += px + (8 if line.style == "score" else 6)
            if y > bottom:
                return
            _text(canvas, part, x, y, line.colour, px, bold=line.style in ("score", "heading"))
        y += 4 if line.style != "score" else 10


def _banner(canvas: Image, rect: Rect, text: str) -> None:
    width = _text_width(text, 26, bold=True) + 40
    box = Rect(rect.x + (rect.w - width) // 2, rect.y + rect.h // 2 - 30, width, 56)
    _fill(canvas, box, (40, 40, 150))
    _text(canvas, text, box.x + 20, box.y + 38, (255, 255, 255), 26, bold=True)


def render(state: ViewerState, size: Size = DEFAULT_SIZE) -> Image:
    """The viewer's picture of ``state``: a new (rows, cols, 3) uint8 BGR image of ``size`` (rows, cols).

    Pure: it reads the state and returns a new image, and draws nothing else.
    """
    canvas = np.empty((*size, 3), np.uint8)
    canvas[:] = BACKGROUND
    parts = layout(size)
    _status_bar(canvas, parts.status, state)
    big: Literal["live", "fov"] = state.big if state.big == "live" or state.shown_fov is not None else "live"
    small: Literal["live", "fov"] = "fov" if big == "live" else "live"
    _pane(canvas, state, parts.big, big, big=True)
    _pane(canvas, state, parts.thumb, small, big=False)
    if not daemon_responding(state) and state.last_heard is not None:
        _banner(canvas, image_area(parts.big), "daemon not responding")
    _info(canvas, parts.info, state)
    _panel(canvas, parts.panel, state)
    _footer(canvas, parts.footer)
    return canvas
