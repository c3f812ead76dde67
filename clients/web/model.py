"""What the browser page shows, as JSON: the OpenCV viewer's own content (``clients.viewer.content``) of a state.

Pure functions of a :class:`~her2scope.clients.viewer.ViewerState`; the page lays the texts out, it decides
nothing about what they say. Colours are CSS (``#rrggbb``), converted from the viewer's BGR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from her2scope.clients.viewer.content import case_lines, fov_details, fov_table, pane_title, status_segments
from her2scope.clients.viewer.palette import BGR, CLASS_BGR
from her2scope.clients.viewer.state import (
    RULE_CHOICES,
    VIEWER_LAYERS,
    FovView,
    ViewerState,
    daemon_responding,
    rule_text,
)
from her2scope.scoring.overlay import LAYER_NAMES


def css(colour: BGR) -> str:
    """A BGR colour as CSS ``#rrggbb``."""
    blue, green, red = (max(0, min(255, int(c))) for c in colour)
    return f"#{red:02x}{green:02x}{blue:02x}"


def fov_version(fov: FovView) -> str:
    """A token that changes whenever the FOV's pictures do (its overlay, its lossless image): the page asks for
    its images again, and browsers may cache each version."""
    base = "b" if fov.base is not None else "n"
    return f"{fov.overlay_seq}-{fov.image}-{base}"


def _texts(segments: Sequence[tuple[str, BGR]]) -> list[dict[str, str]]:
    return [{"text": text, "colour": css(colour)} for text, colour in segments]


def _shown_fov(state: ViewerState) -> dict[str, Any] | None:
    fov = state.fovs.get(state.shown_fov or "")
    if fov is None:
        return None
    entry = state.case.fov(fov.fov_id)
    return {
        "id": fov.fov_id,
        "kind": fov.kind,
        "version": fov_version(fov),
        "layers": [name for name in LAYER_NAMES if name in fov.layer_files or name in fov.layers],
        "has_image": fov.base is not None or fov.overlay_shape is not None,
        "shape": list(fov.shape) if fov.shape is not None else None,  # full resolution, once its image is fetched
        "excluded": bool(entry is not None and entry.excluded),
    }


def view_model(state: ViewerState) -> dict[str, Any]:
    """The page's content for ``state``: the status lights, the case summary, the FOV table, the pane titles, the
    shown FOV's details and pictures, the notice; everything as the OpenCV viewer words and colours it."""
    live_title, live_colour = pane_title(state, "live")
    fov_title, fov_colour = pane_title(state, "fov")
    return {
        "responding": daemon_responding(state),
        "status": _texts(status_segments(state)),
        "case_id": state.case.case_id,
        "case_open": state.case.open,
        "case": [
            {"text": line.text, "colour": css(line.colour), "style": line.style, "values": list(line.values)}
            for line in case_lines(state)
        ],
        "table": [
            {"cells": list(row.cells), "marks": row.marks, "colour": css(row.colour)} for row in fov_table(state)
        ],
        "titles": {
            "live": {"text": live_title, "colour": css(live_colour)},
            "fov": {"text": fov_title, "colour": css(fov_colour)},
        },
        "details": _texts(fov_details(state)),
        "notice": {"text": state.notice, "error": state.notice_error},
        "fov": _shown_fov(state),
        "preview_frame": state.preview_frame_index,
        "malformed": state.malformed,
    }


def page_settings(control: bool) -> dict[str, Any]:
    """What the page needs once: whether it may control the daemon, the layers (and which are on at first), the
    HER2 class colours and the rules a case can be started with."""
    rules: list[Mapping[str, str]] = [
        {"guideline": guideline, "specimen": specimen, "label": rule_text(guideline, specimen)}
        for guideline, specimen in RULE_CHOICES
    ]
    return {
        "control": control,
        "layers": list(LAYER_NAMES),
        "visible_layers": list(VIEWER_LAYERS),
        "class_colours": {name: css(colour) for name, colour in CLASS_BGR.items()},
        "rules": rules,
    }
