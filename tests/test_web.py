"""The browser viewer (``her2scope web``): its view model of the viewer's state, its per-browser fan-out, who may
control the daemon, and the page in a real headless Chromium following a real daemon through a whole case.

The pure tests build the viewer's state from the frames the daemon would publish (``tests.helpers.viewer``). The
server tests run the aiohttp application on a real loopback socket. The e2e tests run the daemon on the simulated
microscope and ``her2scope web`` as real processes, drive Chromium with Selenium through the system's
chromedriver, and wait on the page's state, never for a fixed time. ``HER2SCOPE_WRITE_DOCS=1`` also writes the
screenshot of the README (``docs/web_viewer.png``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from aiohttp import ClientSession, WSMsgType
from aiohttp.test_utils import TestClient, TestServer
from typer.testing import CliRunner

from bench.bench_daemon import rss_mib
from her2scope.clients.cli import WEB_NICENESS, app
from her2scope.clients.viewer import ImageFetched, Tick, apply, composite_image
from her2scope.clients.viewer.content import case_lines, fov_table, status_segments
from her2scope.clients.web import (
    AccessError,
    ClientChannel,
    Hub,
    WebSettings,
    authorized,
    check_binding,
    control_token,
    css,
    make_app,
    view_model,
)
from her2scope.clients.web.server import Bridge, Update, _changed
from tests.helpers.daemon import running_daemon, wait_for
from tests.helpers.images import read_image
from tests.helpers.processes import ROOT
from tests.helpers.recorder import capture, settled
from tests.helpers.viewer import Daemonish, case_summary, connected, fov_entry
from tests.helpers.web import headless_chromium, needs_chromium, running_web

TOKEN = "a-test-token-of-enough-length"


def _layers(shape: tuple[int, int] = (270, 480)) -> dict[str, np.ndarray]:
    cells = np.zeros((*shape, 4), np.uint8)
    cv2.circle(cells, (shape[1] // 2, shape[0] // 2), 40, (20, 20, 230, 255), -1)
    return {"cells": cells, "region": np.zeros_like(cells)}


def _state_with_fov() -> Any:
    daemon = Daemonish()
    state = connected(daemon)
    state = apply(state, daemon.capture("fov-001"))
    state = apply(state, daemon.result("fov-001", case_summary(fov_entry("fov-001"))))
    state = apply(state, daemon.overlay("fov-001", _layers()))
    grey = np.full((1080, 1920, 3), 128, np.uint8)
    return apply(state, ImageFetched("fov-001", grey))


# --- pure: the view model, the fan-out, the access rules -----------------------------------------------------------


def test_the_view_model_says_what_the_opencv_viewer_says() -> None:
    state = _state_with_fov()
    model = view_model(state)
    assert json.loads(json.dumps(model)) == model  # it travels as JSON
    assert [line["text"] for line in model["case"]] == [line.text for line in case_lines(state)]
    assert "HER2 2+" in [line["text"] for line in model["case"] if line["style"] == "score"]
    assert [s["text"] for s in model["status"]] == [text for text, _ in status_segments(state)]
    assert [row["cells"] for row in model["table"]] == [list(row.cells) for row in fov_table(state)]
    assert model["fov"]["id"] == "fov-001" and model["fov"]["layers"] == ["cells", "region"]
    assert model["fov"]["shape"] == [1080, 1920] and "fetched" in model["fov"]["version"]
    assert model["titles"]["fov"]["text"].startswith("fov-001")
    assert model["responding"] is True


def test_the_view_model_is_built_again_only_when_the_state_changed_beyond_the_clock() -> None:
    daemon = Daemonish()
    state = connected(daemon)
    assert _changed(None, state)
    assert not _changed(state, apply(state, Tick(state.now + 5.0)))
    assert _changed(state, apply(state, daemon.status(stability="moving")))


def test_colours_are_converted_from_bgr_to_css() -> None:
    assert css((0, 0, 255)) == "#ff0000"
    assert css((255, 128, 0)) == "#0080ff"


def test_a_browser_is_sent_only_the_newest_view_model_and_preview() -> None:
    async def scenario() -> None:
        channel = ClientChannel()
        for index in range(3):
            channel.offer("model", f"model {index}".encode())
        channel.offer("preview", b"frame 1")
        channel.offer("preview", b"frame 2")
        assert channel.pending == 2 and channel.dropped == 3
        assert await channel.next() == [("model", b"model 2"), ("preview", b"frame 2")]
        assert channel.pending == 0
        waiting = asyncio.create_task(channel.next())
        await asyncio.sleep(0)
        assert not waiting.done()  # nothing new: a browser waits, it is not sent the same again
        channel.offer("model", b"model 3")
        assert await asyncio.wait_for(waiting, 5) == [("model", b"model 3")]

    asyncio.run(scenario())


def test_a_new_browser_gets_what_is_shown_now_and_unchanged_models_are_not_sent_again() -> None:
    async def scenario() -> None:
        hub = Hub()
        state = _state_with_fov()
        hub.update(Update(state, b"{}", b"jpeg"))
        channel = hub.join()
        assert await channel.next() == [("model", b"{}"), ("preview", b"jpeg")]
        hub.update(Update(state, b"{}"))
        assert channel.pending == 0
        hub.leave(channel)
        hub.update(Update(state, b"{1}"))
        assert channel.pending == 0

    asyncio.run(scenario())


def test_the_control_token_is_checked_in_full() -> None:
    assert authorized(f"Bearer {TOKEN}", TOKEN)
    assert authorized(f"bearer {TOKEN}", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x"):
        assert not authorized(header, TOKEN), header
    assert not authorized(f"Bearer {TOKEN}", None)  # read-only: no token opens it


def test_a_control_token_is_read_or_made(tmp_path: Path) -> None:
    assert control_token(False, None, TOKEN) == (None, False)  # read-only ignores the environment's token
    made, was_made = control_token(True, None, None)
    assert was_made and made is not None and len(made) >= 16
    assert control_token(True, None, None)[0] != made
    assert control_token(True, None, f" {TOKEN}\n") == (TOKEN, False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert control_token(True, token_file, "another-token-from-the-env") == (TOKEN, False)
    token_file.write_text("short")
    with pytest.raises(AccessError, match="at least 16"):
        control_token(True, token_file, None)
    with pytest.raises(AccessError, match="only used with --control"):
        control_token(False, token_file, None)
    with pytest.raises(AccessError, match="cannot read"):
        control_token(True, tmp_path / "missing", None)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_tls(host: str) -> None:
    check_binding(host, tls=False, insecure_remote=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "scope-pc.lab"])
def test_beyond_loopback_needs_tls_or_an_explicit_flag(host: str) -> None:
    with pytest.raises(AccessError, match="--tls-cert"):
        check_binding(host, tls=False, insecure_remote=False)
    check_binding(host, tls=True, insecure_remote=False)
    check_binding(host, tls=False, insecure_remote=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--host", "0.0.0.0"], "--tls-cert"),
        (["--tls-cert", "cert.pem"], "both --tls-cert and --tls-key"),
        (["--token-file", "token"], "only used with --control"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path: Path, options: list[str], message: str) -> None:
    done = CliRunner().invoke(app, ["web", *options])
    assert done.exit_code == 2
    assert done.output.startswith("error: ") and done.output.count("\n") == 1 and message in done.output


# --- the server on a real socket, without a daemon ----------------------------------------------------------------


def _client(settings: WebSettings, hub: Hub | None = None) -> TestClient[Any, Any]:
    hub = hub or Hub()
    bridge = Bridge(lambda: pytest.fail("no daemon in this test"), hub.update)  # never started
    return TestClient(TestServer(make_app(settings, hub, bridge), host="127.0.0.1"))


def test_a_read_only_server_refuses_every_command() -> None:
    async def scenario() -> None:
        async with _client(WebSettings()) as client:
            for body in ({"command": "capture"}, {"command": "close-case"}, {"command": "status"}):
                response = await client.post("/api/command", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
                assert response.status == 403, body
            response = await client.post("/api/roi", json={})
            assert response.status == 403
            settings = await (await client.get("/api/settings")).json()
            assert settings["control"] is False

    asyncio.run(scenario())


def test_control_needs_the_token_and_a_command_the_browser_may_send() -> None:
    async def scenario() -> None:
        async with _client(WebSettings(control=True, token=TOKEN)) as client:
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert (await client.post("/api/command", json={"command": "capture"})).status == 401
            bad = {"Authorization": "Bearer not-the-token-at-all"}
            assert (await client.post("/api/command", json={"command": "capture"}, headers=bad)).status == 401
            for body in (
                {"command": "stage", "args": {"action": "unplug"}},  # the ctl's, not the browser's
                {"command": "capture", "args": {"fov_id": "x"}},  # capture takes no arguments
                {"command": "exclude", "args": {}},  # exclude needs a FOV
                [1, 2],
            ):
                response = await client.post("/api/command", json=body, headers=good)
                assert response.status == 400, (body, await response.text())
            huge = {"command": "set-roi", "args": {"fov_id": "fov-001", "polygon": [[1.0, 2.0]] * 20_000}}
            assert (await client.post("/api/command", json=huge, headers=good)).status == 413

    asyncio.run(scenario())


def test_pages_answer_only_to_loopback_names_and_same_origin_scripts() -> None:
    async def scenario() -> None:
        async with _client(WebSettings()) as client:
            page = await client.get("/")
            assert page.status == 200 and "her2scope" in await page.text()
            assert "default-src 'self'" in page.headers["Content-Security-Policy"]
            rebound = await client.get("/", headers={"Host": "attacker.example:8765"})
            assert rebound.status == 403
            other_site = await client.get("/ws", headers={"Origin": "http://attacker.example"})
            assert other_site.status == 403

    asyncio.run(scenario())


def test_fov_pictures_are_served_from_the_state_by_version() -> None:
    async def scenario() -> None:
        hub = Hub()
        state = _state_with_fov()
        hub.update(Update(state, b"{}"))
        async with _client(WebSettings(), hub) as client:
            version = view_model(state)["fov"]["version"]
            image = await client.get(f"/fov/fov-001/image.png?v={version}")
            assert image.status == 200 and image.content_type == "image/png"
            decoded = cv2.imdecode(np.frombuffer(await image.read(), np.uint8), cv2.IMREAD_COLOR)
            np.testing.assert_array_equal(decoded, composite_image(state.fovs["fov-001"], ()))
            layer = await client.get("/fov/fov-001/layer/cells.png")
            rgba = cv2.imdecode(np.frombuffer(await layer.read(), np.uint8), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(rgba, state.fovs["fov-001"].layers["cells"])
            assert (await client.get("/fov/fov-001/layer/intensity.png")).status == 404
            assert (await client.get("/fov/fov-009/image.png")).status == 404

    asyncio.run(scenario())


# --- e2e: a real daemon, her2scope web, headless Chromium -----------------------------------------------------------


def _post(url: str, body: dict[str, Any], token: str | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _page_waits(driver: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 60, poll_frequency=0.1)


def _text_of(driver: Any, selector: str) -> str:
    """The text of an element, read in one script: the page redraws its elements as the daemon's messages come."""
    return str(
        driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", selector)
    )


def _picture(png: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def _layers_loaded(driver: Any) -> bool:
    return bool(
        driver.execute_script(
            "const imgs = [...document.querySelectorAll('#fov-stack img')];"
            "return imgs.length > 1 && imgs.every(i => i.complete && i.naturalWidth > 0);"
        )
    )


def _fov_rows(driver: Any) -> list[str]:
    rows = driver.execute_script("return [...document.querySelectorAll('#fovs tr[data-fov]')].map(r => r.dataset.fov)")
    return [str(row) for row in rows]


@pytest.mark.e2e
def test_the_web_viewer_yields_the_cpu_to_the_daemon_unless_told_not_to(tmp_path: Path) -> None:
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    with running_daemon(tmp_path) as daemon:
        with running_web(daemon, tmp_path) as web:
            assert os.getpriority(os.PRIO_PROCESS, web.pid) == min(19, ours + WEB_NICENESS)
        with running_web(daemon, tmp_path, "--nice", "0") as web:
            assert os.getpriority(os.PRIO_PROCESS, web.pid) == ours
        assert daemon.process.poll() is None and os.getpriority(os.PRIO_PROCESS, daemon.process.pid) == ours


@pytest.mark.e2e
@needs_chromium
def test_a_browser_follows_a_whole_case_read_only(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon, running_web(daemon, tmp_path) as web, headless_chromium() as driver:
        wait = _page_waits(driver)
        driver.get(web.url)
        wait.until(lambda d: d.execute_script("return document.body.dataset.connected") == "true")
        wait.until(lambda d: d.find_element("id", "live").is_displayed())  # the live preview arrives
        daemon.control.call("auto-capture", enabled=False)
        daemon.control.call("start-case", case_id="web-case")
        for target in ("control", "field 0", "field 1"):
            capture(daemon, target)
        case = settled(daemon)
        score = case["case"]["score"]
        assert score is not None
        wait.until(lambda d: _text_of(d, "#case .score") == f"HER2 {score}")
        wait.until(lambda d: len(_fov_rows(d)) == len(case["fovs"]))
        assert case["case"]["reason"] in _text_of(driver, "#case")
        assert "daemon ok" in _text_of(driver, "#status") and "camera live" in _text_of(driver, "#status")

        # the last FOV's layers: toggled in the page, no request to the server
        last = case["fovs"][-1]["fov_id"]
        wait.until(lambda d: d.execute_script("return document.body.dataset.fov") == last)
        wait.until(lambda d: "fetched" in d.execute_script("return document.body.dataset.fovVersion"))
        wait.until(_layers_loaded)
        cells = driver.find_element("css selector", "#fov-stack img.layer[data-layer='cells']")
        assert cells.is_displayed()
        area = driver.find_element("id", "fov-stack")
        with_cells = _picture(area.screenshot_as_png)
        driver.find_element("css selector", "#layers input[data-layer='cells']").click()
        wait.until(lambda d: not cells.is_displayed())
        without_cells = _picture(area.screenshot_as_png)
        changed = np.abs(with_cells.astype(int) - without_cells.astype(int)).max(axis=2) > 40
        assert changed.mean() > 0.005, f"hiding the cells changed {changed.mean():.2%} of the picture"
        driver.find_element("css selector", "#layers input[data-layer='cells']").click()
        wait.until(lambda d: cells.is_displayed())
        again = _picture(area.screenshot_as_png)
        assert (np.abs(with_cells.astype(int) - again.astype(int)).max(axis=2) > 40).mean() < 0.001

        # read-only: no control on the page, and the server refuses commands whatever the token
        assert driver.find_elements("css selector", "#controls button") == []
        assert not driver.find_element("id", "controls").is_displayed()
        assert _post(web.url + "api/command", {"command": "capture"}, TOKEN) == 403
        assert len(daemon.control.call("snapshot")["case"]["fovs"]) == len(case["fovs"])

        driver.save_screenshot(str(tmp_path / "web_viewer.png"))
        if os.environ.get("HER2SCOPE_WRITE_DOCS") == "1":
            shutil.copyfile(tmp_path / "web_viewer.png", ROOT / "docs" / "web_viewer.png")
        closed = daemon.control.call("close-case")
        assert closed["case_id"] == "web-case"
        wait.until(lambda d: "(closed)" in _text_of(d, "#case"))
        assert read_image(tmp_path / "web_viewer.png").shape[:2] == (1000, 1600)


@pytest.mark.e2e
@needs_chromium
def test_with_control_and_the_token_the_page_captures_and_draws_an_roi(tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with (
        running_daemon(tmp_path) as daemon,
        running_web(daemon, tmp_path, "--control", "--token-file", str(token_file)) as web,
        headless_chromium() as driver,
    ):
        assert web.control_url is None  # a token given is never printed
        assert TOKEN not in web.log_path.read_text()
        wait = _page_waits(driver)
        daemon.control.call("auto-capture", enabled=False)
        driver.get(f"{web.url}#token={TOKEN}")
        wait.until(lambda d: d.execute_script("return document.body.dataset.control") == "true")
        assert "token" not in driver.current_url  # it leaves the address bar
        wait.until(lambda d: "daemon ok" in _text_of(d, "#status"))
        driver.find_element("css selector", "#controls button[data-command='start-case']").click()
        wait.until(lambda d: _text_of(d, "#case-id").startswith("case "))
        wait.until(lambda d: "camera live" in _text_of(d, "#status"))
        # a preview shown: the daemon holds a live frame (the camera says live a moment before), a capture is taken
        wait.until(lambda d: int(d.execute_script("return document.body.dataset.previews || '0'")) > 0)
        before = len(_fov_rows(driver))
        driver.find_element("css selector", "#controls button[data-command='capture']").click()
        wait.until(
            lambda d: len(_fov_rows(d)) == before + 1,
            message=f"no FOV row after the capture (notice at the click: {_text_of(driver, '#notice')})",
        )
        fov_id = _fov_rows(driver)[-1]
        assert [f["fov_id"] for f in daemon.control.call("snapshot")["case"]["fovs"]] == [fov_id]

        # an ROI drawn with the mouse on the FOV: four corners, a double-click sends it
        wait.until(lambda d: d.execute_script("return document.body.dataset.fov") == fov_id)
        wait.until(lambda d: "fetched" in d.execute_script("return document.body.dataset.fovVersion"))
        wait.until(_layers_loaded)
        driver.find_element("css selector", "#controls button[data-command='set-roi']").click()
        base = driver.find_element("id", "fov-base")
        width, height = base.size["width"], base.size["height"]
        actions = ActionChains(driver)
        corners = [(0.2, 0.2), (0.8, 0.2), (0.8, 0.8), (0.2, 0.8)]
        for fx, fy in corners[:-1]:  # offsets from the picture's centre
            actions.move_to_element_with_offset(base, round((fx - 0.5) * width), round((fy - 0.5) * height)).click()
        fx, fy = corners[-1]
        actions.move_to_element_with_offset(base, round((fx - 0.5) * width), round((fy - 0.5) * height))
        actions.double_click().perform()

        def roi_set() -> bool:
            entry = next(f for f in daemon.control.call("snapshot")["case"]["fovs"] if f["fov_id"] == fov_id)
            return bool(entry["roi"])

        wait_for(roi_set, what="the ROI drawn in the browser to reach the daemon")
        audit = daemon.control.call("snapshot")["case"]["adjustments"]
        polygon = next(a["args"]["polygon"] for a in audit if a["action"] == "set-roi")
        rows, cols = 540, 960  # the test daemon's FOVs
        expected = [[fy * rows, fx * cols] for fx, fy in corners]
        assert np.allclose(polygon, expected, atol=0.03 * cols), polygon
        wait.until(lambda d: "ROI" in _text_of(d, "#fovs"))
        assert _post(web.url + "api/command", {"command": "capture"}, "wrong-token-of-enough-length") == 401


# --- e2e: 20 browsers at once -------------------------------------------------------------------------------------


async def _follow_page(url: str, wanted: str, seen: dict[str, int], key: str) -> None:
    """A browser's WebSocket that reads everything until a view model shows ``wanted`` in its case lines."""
    async with ClientSession() as session, session.ws_connect(url) as socket:
        async for message in socket:
            if message.type == WSMsgType.BINARY:
                seen[key + " previews"] = seen.get(key + " previews", 0) + 1
            elif message.type == WSMsgType.TEXT:
                model = json.loads(message.data)
                if any(line["text"] == wanted for line in model["case"]):
                    seen[key] = 1
                    return
            else:
                return


@pytest.mark.e2e
def test_twenty_browsers_all_follow_the_case_and_a_stalled_one_costs_nothing(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon, running_web(daemon, tmp_path) as web:
        socket_url = web.url.replace("http://", "ws://") + "ws"
        daemon.control.call("auto-capture", enabled=False)
        daemon.control.call("start-case", case_id="load-case")
        rss_before = rss_mib(web.pid)
        seen: dict[str, int] = {}

        async def scenario() -> None:
            async with ClientSession() as session:
                stalled = await session.ws_connect(socket_url)  # connected, never reads
                tabs = [
                    asyncio.create_task(_follow_page(socket_url, "CASE load-case (closed)", seen, f"tab {index}"))
                    for index in range(20)
                ]
                for target in ("field 0", "field 1"):
                    await asyncio.to_thread(capture, daemon, target)
                await asyncio.to_thread(settled, daemon)
                await asyncio.to_thread(daemon.control.call, "close-case")
                await asyncio.wait_for(asyncio.gather(*tabs), 120)
                await stalled.close()

        asyncio.run(scenario())
        assert [f"tab {i}" for i in range(20) if seen.get(f"tab {i}") != 1] == []
        assert all(seen.get(f"tab {i} previews", 0) > 0 for i in range(20))
        assert rss_mib(web.pid) - rss_before < 150, "the web client's memory grew with its browsers"
        assert web.process.poll() is None
