"""``her2scope web``: the browser viewer's server. One follower of the daemon, fanned out to every browser.

Two threads. The **follower** thread (:class:`Bridge`) owns the only ZeroMQ sockets, a viewer ``DaemonLink``: it
polls the daemon, feeds the viewer's pure reducer, and after each change hands the asyncio loop an
:class:`Update`: the state, its view model (``model.view_model``) as JSON, and the newest preview as JPEG. It also
sends the commands browsers ask for (ZeroMQ sockets stay in the thread that made them). The **asyncio** loop
(aiohttp) serves the page, the FOV pictures (encoded from the state, cached by version) and a WebSocket per
browser. Each browser has a :class:`ClientChannel` of one pending view model and one pending preview: a newer one
replaces what was not sent yet, so a slow tab drops frames; it never grows memory, never delays other tabs, and
never reaches the daemon, which has one subscriber whatever the number of tabs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import cv2
import numpy as np
import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from her2scope.clients.viewer.geometry import Rect, display_to_fov
from her2scope.clients.viewer.link import DaemonLink
from her2scope.clients.viewer.state import Replied, Send, ViewerState, composite_image, initial_state
from her2scope.clients.web.access import LOOPBACK_NAMES, authorized, is_loopback
from her2scope.clients.web.model import fov_version, page_settings, view_model
from her2scope.daemon.protocol import Command, ProtocolError, Request, command_args

log = structlog.get_logger("her2scope.web")

#: What a browser may ask the daemon for, with ``--control`` and the token; nothing else passes.
WEB_COMMANDS = frozenset({"capture", "capture-control", "start-case", "close-case", "exclude", "include", "set-roi"})
MAX_BODY_BYTES = 64 * 1024  # a command, or an ROI of a few hundred corners
MAX_CLIENTS = 64  # open WebSockets; one more is refused (each holds at most a view model and a preview)
MAX_ROI_CORNERS = 500
COMMAND_TIMEOUT_S = 10.0
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class WebError(RuntimeError):
    """The server cannot start (the port is taken, say); the message says why."""


# --- from the follower thread to the browsers ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Update:
    """What the follower thread hands the loop: the state, its view model (JSON), and a new preview (JPEG) if any."""

    state: ViewerState
    model: bytes
    preview: bytes | None = None


Kind = Literal["model", "preview"]


class ClientChannel:
    """What is still to be sent to one browser: the newest view model and the newest preview, one of each at most
    (a newer one replaces an unsent one: latest wins)."""

    def __init__(self) -> None:
        self._model: bytes | None = None
        self._preview: bytes | None = None
        self._ready = asyncio.Event()
        self.dropped = 0  # updates replaced before they were sent (the tab was slower than the daemon)

    def offer(self, kind: Kind, data: bytes) -> None:
        """Queue ``data`` for the browser, replacing an unsent one of its kind."""
        if kind == "model":
            self.dropped += self._model is not None
            self._model = data
        else:
            self.dropped += self._preview is not None
            self._preview = data
        self._ready.set()

    @property
    def pending(self) -> int:
        """How many messages wait to be sent (at most 2)."""
        return (self._model is not None) + (self._preview is not None)

    async def next(self) -> list[tuple[Kind, bytes]]:
        """Wait for something to send; the view model first, then the preview."""
        await self._ready.wait()
        self._ready.clear()
        out: list[tuple[Kind, bytes]] = []
        if self._model is not None:
            out.append(("model", self._model))
        if self._preview is not None:
            out.append(("preview", self._preview))
        self._model = self._preview = None
        return out


class Hub:
    """The latest update, and the channels of the browsers connected now (on the asyncio loop only)."""

    def __init__(self) -> None:
        self.state: ViewerState | None = None
        self.model: bytes | None = None
        self.preview: bytes | None = None
        self.channels: set[ClientChannel] = set()

    def update(self, update: Update) -> None:
        """Take an update from the follower thread and offer it to every browser."""
        self.state = update.state
        if update.model != self.model:
            self.model = update.model
            for channel in self.channels:
                channel.offer("model", update.model)
        if update.preview is not None:
            self.preview = update.preview
            for channel in self.channels:
                channel.offer("preview", update.preview)

    def join(self) -> ClientChannel:
        """A channel for a new browser, holding what is shown now."""
        channel = ClientChannel()
        if self.model is not None:
            channel.offer("model", self.model)
        if self.preview is not None:
            channel.offer("preview", self.preview)
        self.channels.add(channel)
        return channel

    def leave(self, channel: ClientChannel) -> None:
        self.channels.discard(channel)


@dataclass(frozen=True, slots=True)
class _Pending:
    """A browser's command, waiting for the follower thread."""

    action: Send
    done: Callable[[Replied], None]


class Bridge(threading.Thread):
    """The follower thread: the daemon link, the viewer's reducer, the view model, and the browsers' commands.

    ``open_link`` makes the link (in this thread, which owns its sockets); ``publish`` is called from this thread
    with every :class:`Update` (it hands it to the loop). A failure of the loop body is logged and the link made
    anew: the server outlives a bad message or a bug in one turn.
    """

    POLL_MS = 15  # a turn of the loop: updates leave within one preview frame of the daemon's messages
    MAX_QUEUED_COMMANDS = 16

    def __init__(self, open_link: Callable[[], DaemonLink], publish: Callable[[Update], None]) -> None:
        super().__init__(name="her2scope-web-follower", daemon=True)
        self._open_link = open_link
        self._publish = publish
        self._commands: queue.Queue[_Pending] = queue.Queue(self.MAX_QUEUED_COMMANDS)
        self._stopping = threading.Event()
        # previews go to the browsers as the daemon encoded them and the page blends the layers: this process decodes
        # no preview and blends no composite
        self.state = dataclasses.replace(initial_state(time.monotonic()), draws=False)

    def submit(self, action: Send, done: Callable[[Replied], None]) -> bool:
        """Queue a command for the daemon; ``done`` gets the reply (in this thread). False when too many wait."""
        try:
            self._commands.put_nowait(_Pending(action, done))
        except queue.Full:
            return False
        return True

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._follow()
            except Exception:  # a bug in one turn must not end the server: log it, start the link again
                log.exception("web_follower_failed")
                self._stopping.wait(1.0)

    def _follow(self) -> None:
        with self._open_link() as link:
            state = link.start(self.state)
            sent_model: bytes = b""
            sent_frame: tuple[str | None, int] = (None, -1)
            modelled, modelled_at = None, 0.0
            while not self._stopping.is_set():
                state = self._commands_of(link, state)
                state = link.poll(state, self.POLL_MS)
                self.state = state
                # the model is built again only when the state changed (beyond the clock), or each second while the
                # daemon is silent (the page counts the seconds): most turns of the loop bring nothing
                if _changed(modelled, state) or (not state.responding and state.now - modelled_at >= 1.0):
                    model = json.dumps(view_model(state), separators=(",", ":"), ensure_ascii=False).encode()
                    modelled, modelled_at = state, state.now
                else:
                    model = sent_model
                frame = (state.preview_session, state.preview_frame_index)
                preview = state.preview_jpeg if frame != sent_frame else None
                if model != sent_model or preview is not None:
                    self._publish(Update(state, model, preview))
                    sent_model, sent_frame = model, frame

    def _commands_of(self, link: DaemonLink, state: ViewerState) -> ViewerState:
        while True:
            try:
                pending = self._commands.get_nowait()
            except queue.Empty:
                return state
            state, replied = link.send(state, pending.action)
            pending.done(replied)


#: What the page shows depends on every field of the state but the clock.
_SHOWN_FIELDS = tuple(name for name in ViewerState.__dataclass_fields__ if name != "now")


def _changed(before: ViewerState | None, state: ViewerState) -> bool:
    """Whether ``state`` differs from ``before`` other than by its clock. The state is immutable and the reducer
    replaces only what changes, so a field that is the same object is unchanged."""
    return before is None or any(getattr(before, name) is not getattr(state, name) for name in _SHOWN_FIELDS)


# --- the HTTP server ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebSettings:
    """How ``her2scope web`` serves: where, whether browsers may control the daemon (with ``token``), and TLS."""

    host: str = "127.0.0.1"
    port: int = 8765
    control: bool = False
    token: str | None = None
    tls: Any = None  # an ssl.SSLContext, or None: plain HTTP


@dataclass
class _Server:
    """What the request handlers share."""

    settings: WebSettings
    hub: Hub
    bridge: Bridge
    pictures: OrderedDict[tuple[str, str, str], bytes] = field(default_factory=OrderedDict)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)

    MAX_PICTURES = 48  # encoded FOV pictures kept (a few FOVs' base images and layers)


SERVER: web.AppKey[_Server] = web.AppKey("server", _Server)


def _host_name(host: str) -> str:
    """The name part of a Host header (``[::1]:8765`` -> ``::1``)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@web.middleware
async def _guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """Headers that keep the page out of other sites' frames and scripts; on loopback, only loopback names in Host
    (a web page elsewhere cannot reach the viewer through a name of its own that resolves to 127.0.0.1); another
    site's scripts cannot post commands or open the WebSocket (Origin must be this server)."""
    server = request.app[SERVER]
    if is_loopback(server.settings.host) and _host_name(request.host) not in LOOPBACK_NAMES:
        raise web.HTTPForbidden(text="this viewer answers to its loopback address only\n")
    origin = request.headers.get("Origin")
    if origin is not None and origin.split("://", 1)[-1] != request.host:
        raise web.HTTPForbidden(text="cross-origin requests are refused\n")
    response = await handler(request)
    response.headers.update(SECURITY_HEADERS)
    return response


async def _static(request: web.Request) -> web.Response:
    name = request.match_info.get("name", "index.html")
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    body = (resources.files("her2scope.clients.web") / "static" / name).read_bytes()
    return web.Response(body=body, content_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


async def _no_icon(_request: web.Request) -> web.Response:
    return web.Response(status=204)


async def _settings(request: web.Request) -> web.Response:
    return web.json_response(page_settings(request.app[SERVER].settings.control))


async def _picture(request: web.Request) -> web.Response:
    """The shown FOV's base image (``image.png``) or one overlay layer (``layer/NAME.png``), PNG, by version."""
    server = request.app[SERVER]
    fov_id, layer = request.match_info["fov_id"], request.match_info.get("layer", "")
    state = server.hub.state
    fov = state.fovs.get(fov_id) if state is not None else None
    if fov is None or (layer and layer not in fov.layer_files and layer not in fov.layers):
        raise web.HTTPNotFound(text=f"no picture {layer or 'image'} of {fov_id}\n")
    if layer in fov.layer_files:  # the daemon's PNG as it came
        return web.Response(body=fov.layer_files[layer], content_type="image/png", headers=_CACHE_HEADERS)
    key = (fov_id, fov_version(fov), layer)
    png = server.pictures.get(key)
    if png is None:
        picture = fov.layers[layer] if layer else composite_image(fov, ())
        if picture is None:
            raise web.HTTPNotFound(text=f"no image of {fov_id} yet\n")
        loop = asyncio.get_running_loop()
        png = await loop.run_in_executor(None, _png, picture)
        server.pictures[key] = png
        while len(server.pictures) > server.MAX_PICTURES:
            server.pictures.popitem(last=False)
    server.pictures.move_to_end(key)
    return web.Response(body=png, content_type="image/png", headers=_CACHE_HEADERS)


#: Pictures are addressed by the FOV's version: a browser may keep each one.
_CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}


def _png(image: np.ndarray[Any, Any]) -> bytes:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - encoding a uint8 image does not fail
        raise web.HTTPInternalServerError(text="cannot encode the picture\n")
    return data.tobytes()


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    """Push the view model (text) and previews (binary) to one browser, latest first, until it goes."""
    server = request.app[SERVER]
    if len(server.sockets) >= MAX_CLIENTS:
        raise web.HTTPServiceUnavailable(text=f"{MAX_CLIENTS} browsers are connected already\n")
    # no per-message deflate: previews are JPEG already, and deflating them for every tab would cost a core
    socket = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096, compress=False)
    await socket.prepare(request)
    channel = server.hub.join()
    server.sockets.add(socket)

    async def send() -> None:
        while not socket.closed:
            for kind, data in await channel.next():
                if kind == "model":
                    await socket.send_str(data.decode())
                else:
                    await socket.send_bytes(data)

    sender = asyncio.create_task(send())
    try:
        async for message in socket:  # the page sends nothing; reading lets pings and the closing through
            if message.type == WSMsgType.ERROR:
                break
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        server.hub.leave(channel)
        server.sockets.discard(socket)
    return socket


def _check_control(request: web.Request) -> _Server:
    server = request.app[SERVER]
    if not server.settings.control:
        raise web.HTTPForbidden(text="this viewer is read-only (start it with --control to allow commands)\n")
    if not authorized(request.headers.get("Authorization"), server.settings.token):
        raise web.HTTPUnauthorized(text="a valid control token is needed (Authorization: Bearer <token>)\n")
    return server


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise web.HTTPBadRequest(text="the body must be a JSON object\n") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object\n")
    return body


async def _send(server: _Server, action: Send) -> web.Response:
    """Have the follower thread send ``action``; its reply as JSON (409 when the daemon refused or did not answer)."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[Replied] = loop.create_future()

    def answer(replied: Replied) -> None:
        if not reply.done():  # the request may have timed out meanwhile
            reply.set_result(replied)

    def done(replied: Replied) -> None:
        loop.call_soon_threadsafe(answer, replied)

    if not server.bridge.submit(action, done):
        raise web.HTTPServiceUnavailable(text="too many commands are waiting for the daemon\n")
    try:
        replied = await asyncio.wait_for(reply, COMMAND_TIMEOUT_S)
    except TimeoutError:
        raise web.HTTPGatewayTimeout(text="the daemon did not answer in time\n") from None
    log.info("web_command", command=action.command, ok=replied.ok, error=replied.error)
    body = {"ok": replied.ok, "command": replied.command, "data": dict(replied.data), "error": replied.error}
    return web.json_response(body, status=200 if replied.ok else 409)


async def _command(request: web.Request) -> web.Response:
    """POST ``{"command": ..., "args": {...}}``: a command the ctl could send, validated by the same protocol."""
    server = _check_control(request)
    body = await _json_body(request)
    name, args = body.get("command"), body.get("args", {})
    if name not in WEB_COMMANDS or not isinstance(args, dict):
        allowed = ", ".join(sorted(WEB_COMMANDS))
        raise web.HTTPBadRequest(text=f"the browser may send these commands, with an args object: {allowed}\n")
    try:
        command_args(Request(command=Command(name), args=args))
    except (ProtocolError, ValueError) as error:
        raise web.HTTPBadRequest(text=f"{name}: {error}\n") from None
    return await _send(server, Send(name, args))


async def _roi(request: web.Request) -> web.Response:
    """POST ``{"fov_id", "points": [[x, y], ...], "width", "height"}``: an ROI drawn on the FOV as shown in the page
    (``points`` in its display pixels, the picture shown ``width`` x ``height``), sent as ``set-roi`` in FOV pixels."""
    server = _check_control(request)
    body = await _json_body(request)
    fov_id, points = body.get("fov_id"), body.get("points")
    width, height = body.get("width"), body.get("height")
    if (
        not isinstance(fov_id, str)
        or not isinstance(points, list)
        or not 3 <= len(points) <= MAX_ROI_CORNERS
        or not all(isinstance(v, int | float) and v > 0 for v in (width, height))
    ):
        raise web.HTTPBadRequest(
            text=f'an ROI is {{"fov_id", "points": [[x, y], ...] (3 to {MAX_ROI_CORNERS}), "width", "height"}}\n'
        )
    state = server.hub.state
    fov = state.fovs.get(fov_id) if state is not None else None
    if fov is None or fov.shape is None:
        raise web.HTTPConflict(text=f"the image of {fov_id} is not here yet (its size is not known)\n")
    shown = Rect(0, 0, max(1, round(float(width))), max(1, round(float(height))))  # type: ignore[arg-type]
    polygon: list[list[float]] = []
    for point in points:
        if not (isinstance(point, list) and len(point) == 2 and all(isinstance(v, int | float) for v in point)):
            raise web.HTTPBadRequest(text="each ROI point is [x, y] in display pixels\n")
        vertex = display_to_fov((float(point[0]), float(point[1])), shown, fov.shape)
        if vertex is None:
            raise web.HTTPBadRequest(text="every ROI corner must be inside the FOV\n")
        polygon.append([round(vertex[0], 1), round(vertex[1], 1)])
    return await _send(server, Send("set-roi", {"fov_id": fov_id, "polygon": polygon}))


def make_app(settings: WebSettings, hub: Hub, bridge: Bridge) -> web.Application:
    """The aiohttp application: the page, its settings, the FOV pictures, the WebSocket, and (with control) the
    commands."""
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY_BYTES)
    app[SERVER] = _Server(settings, hub, bridge)
    app.router.add_get("/", _static)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/api/settings", _settings)
    app.router.add_get("/favicon.ico", _no_icon)
    app.router.add_get("/fov/{fov_id}/image.png", _picture)
    app.router.add_get("/fov/{fov_id}/layer/{layer}.png", _picture)
    app.router.add_get("/ws", _websocket)
    app.router.add_post("/api/command", _command)
    app.router.add_post("/api/roi", _roi)

    async def close_sockets(app: web.Application) -> None:
        for socket in set(app[SERVER].sockets):
            await socket.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")

    app.on_shutdown.append(close_sockets)
    return app


def url_of(settings: WebSettings, port: int) -> str:
    """The address to open in a browser."""
    host = settings.host if ":" not in settings.host else f"[{settings.host.strip('[]')}]"
    return f"{'https' if settings.tls is not None else 'http'}://{host}:{port}/"


async def serve(
    settings: WebSettings, open_link: Callable[[], DaemonLink], say: Callable[[str], None], token_made: bool = False
) -> None:
    """Serve until SIGTERM or SIGINT. Prints ``serving URL`` once listening (and, for a token made here, the URL
    that carries it, once: it is never logged). WebError when the address cannot be used."""
    loop = asyncio.get_running_loop()
    hub = Hub()

    def publish(update: Update) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
            loop.call_soon_threadsafe(hub.update, update)

    bridge = Bridge(open_link, publish)
    runner = web.AppRunner(make_app(settings, hub, bridge), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=settings.tls)
        try:
            await site.start()
        except OSError as error:
            raise WebError(f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}") from None
        port = int(runner.addresses[0][1])
        url = url_of(settings, port)
        say(f"serving {url}")
        if settings.control and token_made and settings.token is not None:
            say(f"control: open {url}#token={settings.token} (the token is shown only here)")
        log.info("web_serving", host=settings.host, port=port, tls=settings.tls is not None, control=settings.control)
        bridge.start()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        bridge.stop()
        await runner.cleanup()
        if bridge.is_alive():
            await loop.run_in_executor(None, bridge.join, 5.0)
    log.info("web_stopped")
