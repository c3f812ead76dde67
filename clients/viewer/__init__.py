"""The viewer: the monitor beside the microscope, drawn from the daemon's messages by a pure reducer.

Three layers, each testable on its own:

- **state** (``state``): ``ViewerState``, a frozen dataclass, changed only by ``apply(state, event) -> state``.
  Events are what the follower of the daemon hands on (``clients.follower``: ``Received`` messages, in order and
  once, ``Stale`` ones, ``Snapshot``, ``Silent``, ``Responding``, ``Invalid`` ...), a message itself (decoded
  ``Message`` or raw frames; malformed ones are counted and skipped) and the viewer's own: ``Tick`` (the clock),
  ``ImageFetched``, ``Replied``, ``Click``, ``Hover``. Keys go through ``press(state, key) -> (state, actions)``: the
  actions (``Send`` a command, ``Quit``) are carried out by the link, whose replies come back as events.
- **rendering** (``render``, ``content``, ``geometry``, ``palette``): ``render(state, size) -> BGR ndarray`` is a pure
  function of the state. The text it draws comes from pure functions too (``status_segments``, ``panel_lines``,
  ``footer_segments``); ``terminal_summary`` is the same content as plain text for a terminal.
- **I/O** (``link``, ``app``): ``DaemonLink`` holds the follower (``clients.follower.Follower``, the recorder's too):
  previews on a SUB socket of their own with a tiny high-water mark, drained every tick keeping only the newest (a
  slow viewer drops frames, it never slows the daemon); the other topics in order, with the catch-up (``snapshot``
  and ``replay``) at start, after a gap or a daemon restart (new ``session``), and silence. ``run_window`` (OpenCV
  highgui) and ``run_headless`` (PNG frames) only feed messages, keys and mouse events into the state and show
  ``render(state)``.

Coordinates: polygons are sent as ``[row, col]`` in full-resolution FOV pixels; the display shows the FOV at the
overlay's width, letterboxed into its pane (``display_to_fov`` / ``fov_to_display`` map between the two).

The modules import one another in this order only: ``palette``, ``geometry`` -> ``state`` -> ``content`` ->
``render`` -> ``link`` -> ``app``. This package re-exports their public names.
"""

from her2scope.clients.follower import Received, Responding, Silent, Snapshot, Stale
from her2scope.clients.viewer.app import WINDOW_TITLE, has_display, parse_size, run_headless, run_window
from her2scope.clients.viewer.content import (
    Line,
    TableRow,
    fov_details,
    fov_table,
    pane_title,
    panel_lines,
    status_segments,
    terminal_summary,
)
from her2scope.clients.viewer.geometry import (
    DEFAULT_SIZE,
    Layout,
    Rect,
    Size,
    display_to_fov,
    fit,
    fov_to_display,
    image_area,
    layout,
)
from her2scope.clients.viewer.link import DaemonLink, Endpoints, resolve_endpoints
from her2scope.clients.viewer.palette import CLASS_BGR, DRAW
from her2scope.clients.viewer.render import render
from her2scope.clients.viewer.state import (
    KEY_BACKSPACE,
    KEY_DELETE,
    KEY_ENTER,
    KEY_ESC,
    KEY_RETURN,
    KEY_TAB,
    Action,
    Click,
    Event,
    FovView,
    Hover,
    ImageFetched,
    Quit,
    Replied,
    Send,
    Tick,
    ViewerState,
    apply,
    composite_image,
    daemon_responding,
    fov_display_rect,
    image_wanted,
    initial_state,
    press,
)

__all__ = [
    "CLASS_BGR",
    "DEFAULT_SIZE",
    "DRAW",
    "KEY_BACKSPACE",
    "KEY_DELETE",
    "KEY_ENTER",
    "KEY_ESC",
    "KEY_RETURN",
    "KEY_TAB",
    "WINDOW_TITLE",
    "Action",
    "Click",
    "DaemonLink",
    "Endpoints",
    "Event",
    "FovView",
    "Hover",
    "ImageFetched",
    "Layout",
    "Line",
    "Quit",
    "Received",
    "Rect",
    "Replied",
    "Responding",
    "Send",
    "Silent",
    "Size",
    "Snapshot",
    "Stale",
    "TableRow",
    "Tick",
    "ViewerState",
    "apply",
    "composite_image",
    "daemon_responding",
    "display_to_fov",
    "fit",
    "fov_details",
    "fov_display_rect",
    "fov_table",
    "fov_to_display",
    "has_display",
    "image_area",
    "image_wanted",
    "initial_state",
    "layout",
    "pane_title",
    "panel_lines",
    "parse_size",
    "press",
    "render",
    "resolve_endpoints",
    "run_headless",
    "run_window",
    "status_segments",
    "terminal_summary",
]
