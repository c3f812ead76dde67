"""Where things go on the viewer's canvas: the layout, letterboxing, and display <-> FOV pixel coordinates."""

from __future__ import annotations

from dataclasses import dataclass

Size = tuple[int, int]  # (rows, cols) of a canvas, like an ndarray's shape
Vertex = tuple[float, float]  # (row, col) in full-resolution FOV pixels

DEFAULT_SIZE: Size = (900, 1600)


@dataclass(frozen=True, slots=True)
class Rect:
    """A rectangle of the canvas in display pixels: left ``x``, top ``y``, width ``w``, height ``h``."""

    x: int
    y: int
    w: int
    h: int

    def contains(self, x: float, y: float) -> bool:
        return self.x <= x < self.x + self.w and self.y <= y < self.y + self.h


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything goes on a canvas: status bar, big pane, thumbnail, info box, side panel, footer."""

    status: Rect
    big: Rect
    thumb: Rect
    info: Rect
    panel: Rect
    footer: Rect


TITLE_H = 30


def layout(size: Size) -> Layout:
    """The canvas layout for ``size`` (rows, cols); proportions of a 1600x900 monitor window."""
    rows, cols = size
    margin = max(6, round(cols / 130))
    status_h, footer_h = max(28, round(rows * 0.045)), max(24, round(rows * 0.038))
    top, bottom = status_h + margin, rows - footer_h - margin
    left_w = round(cols * 0.655) - margin
    big_h = min(round(left_w * 9 / 16) + TITLE_H, round((bottom - top) * 0.74))
    thumb_y = top + big_h + margin
    thumb_h = max(40, bottom - thumb_y)
    thumb_w = min(round((thumb_h - TITLE_H) * 16 / 9), left_w // 2)
    info_x = margin + thumb_w + margin
    panel_x = margin + left_w + margin
    return Layout(
        status=Rect(0, 0, cols, status_h),
        big=Rect(margin, top, left_w, big_h),
        thumb=Rect(margin, thumb_y, thumb_w, thumb_h),
        info=Rect(info_x, thumb_y, margin + left_w - info_x, thumb_h),
        panel=Rect(panel_x, top, cols - panel_x - margin, bottom - top),
        footer=Rect(0, rows - footer_h, cols, footer_h),
    )


def fit(area: Rect, image_shape: tuple[int, int]) -> Rect:
    """The largest rectangle of the image's aspect ratio centred in ``area`` (letterboxing)."""
    rows, cols = image_shape
    scale = min(area.w / cols, area.h / rows)
    w, h = max(1, round(cols * scale)), max(1, round(rows * scale))
    return Rect(area.x + (area.w - w) // 2, area.y + (area.h - h) // 2, w, h)


def image_area(pane: Rect) -> Rect:
    """The part of ``pane`` under its title, where its image is drawn."""
    return Rect(pane.x, pane.y + TITLE_H, pane.w, max(1, pane.h - TITLE_H))


def display_to_fov(point: tuple[float, float], rect: Rect, fov_shape: tuple[int, int]) -> Vertex | None:
    """Display pixel ``(x, y)`` -> ``(row, col)`` in full-resolution FOV pixels; None outside the shown FOV.

    ``rect`` is where the FOV is drawn; pixel centres map onto pixel centres, so ``fov_to_display`` inverts it.
    """
    x, y = point
    if not (rect.x - 0.5 <= x <= rect.x + rect.w - 0.5 and rect.y - 0.5 <= y <= rect.y + rect.h - 0.5):
        return None
    rows, cols = fov_shape
    col = (x - rect.x + 0.5) * cols / rect.w - 0.5
    row = (y - rect.y + 0.5) * rows / rect.h - 0.5
    return (min(max(row, 0.0), rows - 1.0), min(max(col, 0.0), cols - 1.0))


def fov_to_display(vertex: Vertex, rect: Rect, fov_shape: tuple[int, int]) -> tuple[float, float]:
    """``(row, col)`` in FOV pixels -> display pixel ``(x, y)`` where the FOV is drawn in ``rect``."""
    row, col = vertex
    rows, cols = fov_shape
    return (rect.x + (col + 0.5) * rect.w / cols - 0.5, rect.y + (row + 0.5) * rect.h / rows - 0.5)
