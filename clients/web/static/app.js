// The browser viewer's page: draws the view model her2scope web pushes over its WebSocket (the OpenCV viewer's own
// texts and colours), shows the live preview frames it sends, and toggles the FOV's layers here, without asking the
// server. With --control and the token, its buttons send commands and the mouse draws an ROI.
"use strict";

const $ = (id) => document.getElementById(id);
const page = {
  settings: null, token: null, visible: new Set(), fov: null, roi: null, previewUrl: null, previews: 0, model: null,
};

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

// The token travels in the URL's fragment (never sent to a server), and leaves the address bar at once.
function takeToken() {
  const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem("her2scope-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return sessionStorage.getItem("her2scope-token");
}

// --- drawing the view model ---------------------------------------------------------------------------------------

function drawStatus(model) {
  const list = $("status");
  list.replaceChildren(...model.status.map((s) => {
    const item = element("li", {}, s.text);
    item.style.setProperty("--light", s.colour);
    return item;
  }));
  $("case-id").textContent = model.case_id ? `case ${model.case_id}` : "";
  const notice = $("notice");
  notice.textContent = model.notice.text;
  notice.classList.toggle("error", model.notice.error);
}

function drawTitle(id, title) {
  const node = $(id);
  node.textContent = title.text;
  node.style.color = title.colour;
}

function drawCase(model) {
  const classes = Object.keys(page.settings.class_colours);
  $("case").replaceChildren(...model.case.map((line) => {
    if (line.style === "bar") {
      const bar = element("div", { class: "bar", role: "img", "aria-label": "cells per class" });
      line.values.forEach((value, index) => {
        const part = element("span");
        part.style.width = `${value}%`;
        part.style.background = page.settings.class_colours[classes[index]];
        bar.append(part);
      });
      return bar;
    }
    const node = element(line.style === "heading" ? "h3" : "p", { class: line.style }, line.text);
    node.style.color = line.colour;
    return node;
  }));
}

function drawTable(model) {
  const [header, ...rows] = model.table;
  const table = $("fovs");
  const head = element("tr");
  header.cells.forEach((cell, index) => {
    const th = element("th", {}, cell);
    if (index >= 2 && index <= 5) th.style.color = page.settings.class_colours[cell];
    head.append(th);
  });
  head.append(element("th"));
  const body = rows.map((row) => {
    const tr = element("tr", { "data-fov": row.cells[0] });
    tr.style.color = row.colour;
    if (row.cells.length === 1) {
      tr.append(element("td", {}, row.cells[0]), element("td", { class: "marks", colspan: "7" }, row.marks));
      return tr;
    }
    row.cells.forEach((cell, index) => {
      const td = element("td", index === 6 ? { class: "score" } : {}, cell);
      if (index === 6 && page.settings.class_colours[cell] && row.colour === "#f0f0f0") {
        td.style.color = page.settings.class_colours[cell];
      }
      tr.append(td);
    });
    tr.append(element("td", { class: "marks" }, row.marks));
    return tr;
  });
  table.replaceChildren(head, ...body);
  if (!rows.length) table.append(element("tr", {}, ""));
}

function drawDetails(model) {
  $("details").replaceChildren(...model.details.map((d) => {
    const item = element("li", {}, d.text);
    item.style.color = d.colour;
    return item;
  }));
}

// The FOV: its base image with one <img> per layer stacked over it; a new version loads new pictures.
function drawFov(model) {
  const fov = model.fov;
  $("fov-empty").hidden = Boolean(fov && fov.has_image);
  $("fov-stack").hidden = !(fov && fov.has_image);
  if (!fov || !fov.has_image) {
    page.fov = null;
    return;
  }
  document.body.dataset.fov = fov.id; // what is shown, for tests and scripts that watch the page
  document.body.dataset.fovVersion = fov.version;
  const key = `${fov.id}/${fov.version}`;
  if (page.fov === key) return;
  if (page.roi && page.roi.fov !== fov.id) stopRoi();
  page.fov = key;
  const stack = $("fov-stack");
  const path = `/fov/${encodeURIComponent(fov.id)}`;
  $("fov-base").src = `${path}/image.png?v=${encodeURIComponent(fov.version)}`;
  stack.querySelectorAll("img.layer").forEach((img) => img.remove());
  for (const name of fov.layers) {
    const img = element("img", { class: "layer", "data-layer": name, alt: `${name} layer` });
    img.src = `${path}/layer/${encodeURIComponent(name)}.png?v=${encodeURIComponent(fov.version)}`;
    img.hidden = !page.visible.has(name);
    stack.insertBefore(img, $("roi"));
  }
}

function drawLayerChips() {
  $("layers").replaceChildren(...page.settings.layers.map((name, index) => {
    const box = element("input", { type: "checkbox", "data-layer": name });
    box.checked = page.visible.has(name);
    const chip = element("label", { class: "chip", title: `layer ${index + 1}` });
    chip.classList.toggle("on", box.checked);
    chip.append(box, document.createTextNode(name));
    box.addEventListener("change", () => {
      if (box.checked) page.visible.add(name);
      else page.visible.delete(name);
      chip.classList.toggle("on", box.checked);
      document.querySelectorAll(`#fov-stack img.layer[data-layer="${name}"]`).forEach((img) => {
        img.hidden = !box.checked;
      });
    });
    return chip;
  }));
}

function draw(model) {
  page.model = model;
  drawStatus(model);
  drawTitle("live-title", model.titles.live);
  drawTitle("fov-title", model.titles.fov);
  drawCase(model);
  drawTable(model);
  drawDetails(model);
  drawFov(model);
  drawControlsState(model);
  document.body.dataset.responding = String(model.responding);
}

function showPreview(data) {
  const url = URL.createObjectURL(new Blob([data], { type: "image/jpeg" }));
  const live = $("live");
  const old = page.previewUrl;
  live.onload = () => { if (old) URL.revokeObjectURL(old); };
  live.src = url;
  page.previewUrl = url;
  live.hidden = false;
  $("live-empty").hidden = true;
  page.previews += 1;
  document.body.dataset.previews = String(page.previews); // for tests and scripts that watch the page
}

// --- the connection: reconnects with backoff, and says so ------------------------------------------------------

function connect(delay = 500) {
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${window.location.host}/ws`);
  socket.binaryType = "arraybuffer";
  const link = $("link");
  socket.onopen = () => {
    delay = 500;
    link.textContent = "connected";
    link.className = "link up";
    document.body.dataset.connected = "true";
  };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") draw(JSON.parse(event.data));
    else showPreview(event.data);
  };
  socket.onclose = () => {
    link.textContent = "disconnected: reconnecting…";
    link.className = "link down";
    document.body.dataset.connected = "false";
    setTimeout(() => connect(Math.min(delay * 2, 5000)), delay);
  };
}

// --- control (only with --control and the token) ----------------------------------------------------------------

async function post(path, body) {
  const notice = $("notice");
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${page.token}` },
      body: JSON.stringify(body),
    });
    if (!response.ok && !(response.headers.get("Content-Type") || "").includes("json")) {
      notice.textContent = `${body.command || "ROI"}: ${(await response.text()).trim()}`;
      notice.classList.add("error");
    }
  } catch (error) {
    notice.textContent = `could not reach her2scope web: ${error}`;
    notice.classList.add("error");
  }
}

function command(name, args = {}) {
  return post("/api/command", { command: name, args });
}

function button(label, name, onClick) {
  const node = element("button", { type: "button", "data-command": name }, label);
  node.addEventListener("click", onClick);
  return node;
}

function drawControls() {
  const nav = $("controls");
  const rules = element("select", { id: "rule", "aria-label": "guideline of the next case" });
  page.settings.rules.forEach((rule, index) => rules.append(element("option", { value: String(index) }, rule.label)));
  nav.replaceChildren(
    button("Capture", "capture", () => command("capture")),
    button("Capture control", "capture-control", () => command("capture-control")),
    element("span", { class: "sep" }),
    rules,
    button("Start case", "start-case", () => {
      const rule = page.settings.rules[Number(rules.value)];
      command("start-case", { guideline: rule.guideline, specimen: rule.specimen });
    }),
    button("Close case", "close-case", () => command("close-case")),
    element("span", { class: "sep" }),
    button("Exclude FOV", "exclude", () => {
      const fov = page.model && page.model.fov;
      if (fov) command(fov.excluded ? "include" : "exclude", { fov_id: fov.id });
    }),
    button("Draw ROI", "set-roi", () => (page.roi ? stopRoi() : startRoi())),
  );
  nav.hidden = false;
}

function drawControlsState(model) {
  if (!page.settings.control || !page.token) return;
  const exclude = document.querySelector('#controls button[data-command="exclude"]');
  const fov = model.fov;
  exclude.textContent = fov && fov.excluded ? "Include FOV" : "Exclude FOV";
  exclude.disabled = !fov;
  document.querySelector('#controls button[data-command="set-roi"]').disabled = !fov || fov.kind !== "fov";
}

// ROI: click the corners on the FOV, double-click (or Enter) to send, Escape to cancel; the server maps the
// display pixels to FOV pixels.
function startRoi() {
  const fov = page.model && page.model.fov;
  if (!fov || fov.kind !== "fov") return;
  page.roi = { fov: fov.id, points: [] };
  $("fov-stack").classList.add("drawing");
  document.querySelector('#controls button[data-command="set-roi"]').classList.add("active");
  $("notice").textContent = `ROI on ${fov.id}: click the corners, double-click to send, Esc to cancel`;
  $("notice").classList.remove("error");
  drawRoi();
}

function stopRoi() {
  page.roi = null;
  $("fov-stack").classList.remove("drawing");
  const draw = document.querySelector('#controls button[data-command="set-roi"]');
  if (draw) draw.classList.remove("active");
  drawRoi();
}

function drawRoi() {
  const svg = $("roi");
  svg.hidden = !page.roi;
  if (!page.roi) return svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", page.roi.points.map(([x, y]) => `${x},${y}`).join(" "));
  const corners = page.roi.points.map(([x, y]) => {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", x);
    dot.setAttribute("cy", y);
    dot.setAttribute("r", 5);
    return dot;
  });
  svg.replaceChildren(line, ...corners);
}

function sendRoi() {
  const roi = page.roi;
  const base = $("fov-base");
  if (!roi || roi.points.length < 3) {
    $("notice").textContent = "an ROI needs at least 3 corners (Esc cancels)";
    $("notice").classList.add("error");
    return;
  }
  stopRoi();
  post("/api/roi", { fov_id: roi.fov, points: roi.points, width: base.clientWidth, height: base.clientHeight });
}

function setUpRoiMouse() {
  const stack = $("fov-stack");
  stack.addEventListener("click", (event) => {
    if (!page.roi) return;
    const box = $("fov-base").getBoundingClientRect();
    const point = [event.clientX - box.left, event.clientY - box.top];
    const last = page.roi.points[page.roi.points.length - 1];
    if (last && Math.hypot(last[0] - point[0], last[1] - point[1]) < 4) return; // the second click of a double-click
    page.roi.points.push(point);
    drawRoi();
  });
  stack.addEventListener("dblclick", (event) => {
    if (!page.roi) return;
    event.preventDefault();
    sendRoi();
  });
  document.addEventListener("keydown", (event) => {
    if (!page.roi) return;
    if (event.key === "Escape") stopRoi();
    else if (event.key === "Enter") sendRoi();
  });
}

// --- start --------------------------------------------------------------------------------------------------------

async function start() {
  page.token = takeToken();
  page.settings = await (await fetch("/api/settings")).json();
  page.visible = new Set(page.settings.visible_layers);
  drawLayerChips();
  if (page.settings.control && page.token) {
    drawControls();
    setUpRoiMouse();
  }
  document.body.dataset.control = String(Boolean(page.settings.control && page.token));
  connect();
}

start();
