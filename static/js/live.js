/*
 * Live pages: keeps the server-rendered dashboard and device page current over /ws/live/.
 *
 * Message shapes are defined in apps/devices/live.py. The socket reconnects with backoff and
 * every (re)connect starts with a fresh snapshot, so a page that missed deltas while the
 * connection was down re-syncs from the database. Text from devices is only ever written with
 * textContent: device names and payload keys come from tenants and devices.
 */
(function () {
  "use strict";

  const body = document.body;
  const dashboard = document.getElementById("dashboard");
  const devicePage = document.getElementById("device-page");
  const pageDevice = devicePage ? devicePage.dataset.deviceId : null;
  const pageProfile = devicePage ? devicePage.dataset.profile : "";

  const PING_EVERY_MS = 25000;
  const PONG_TIMEOUT_MS = 10000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const TILE_READINGS = 4;
  const MAX_SERIES = 8;
  const CHART_POINTS = 300;
  const CHART_WINDOW_MS = 2 * 3600 * 1000;
  const MAX_TRANSITIONS = 20;

  // --- formatting: mirrors apps/devices/views.py and live.chart_values -----------------------

  const UNITS = {
    voltage: "V", current: "A", power: "W", reactive_power: "var", apparent_power: "VA",
    energy: "kWh", energy_export: "kWh", frequency: "Hz", temperature: "°C",
  };
  const PROFILE_UNITS = {
    "meter-v2": { power: "kW", reactive_power: "kvar", apparent_power: "kVA" },
  };
  const PREFIX_LADDERS = [
    ["W", "kW", "MW", "GW"], ["var", "kvar", "Mvar", "Gvar"],
    ["VA", "kVA", "MVA", "GVA"], ["Wh", "kWh", "MWh", "GWh"],
  ];
  const TILE_FIRST = ["voltage", "current", "power", "energy"];
  let clockOffsetMs = 0; // server time minus browser time, from the last snapshot

  function formatNumber(value) {
    const text = value.toFixed(2).replace(/0+$/, "").replace(/\.$/, "");
    return text === "-0" ? "0" : text;
  }

  function ago(iso) {
    if (!iso) return "never";
    const seconds = Math.max(0, Math.floor((Date.now() + clockOffsetMs - Date.parse(iso)) / 1000));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " d ago";
  }

  function chartValues(data) {
    const values = {};
    let count = 0;
    function take(key, value) {
      if (typeof value !== "number" || !isFinite(value) || count >= MAX_SERIES) return;
      let name = String(key).toLowerCase();
      if (name === "total") name = "energy";
      if (!(name in values)) { values[name] = value; count += 1; }
    }
    for (const [key, value] of Object.entries(data || {})) {
      if (value && typeof value === "object" && !Array.isArray(value)) {
        for (const [k, v] of Object.entries(value)) take(k, v);
      } else {
        take(key, value);
      }
    }
    return values;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function flash(node) {
    node.classList.remove("changed");
    void node.offsetWidth; // restart the animation
    node.classList.add("changed");
  }

  // --- device tiles ---------------------------------------------------------------------------

  function tilesFor(deviceId) {
    return document.querySelectorAll('.tile[data-device="' + CSS.escape(deviceId) + '"]');
  }

  function deviceUrl(deviceId) {
    return dashboard.dataset.deviceUrl.replace("__id__", encodeURIComponent(deviceId));
  }

  function canCommand(ownerId) {
    if (devicePage) return true; // rendered with or without buttons by the server
    const section = dashboard.querySelector('.owner-section[data-owner="' + ownerId + '"]');
    return !!section && section.dataset.canCommand === "1";
  }

  function ownerSection(ownerId) {
    let section = dashboard.querySelector('.owner-section[data-owner="' + ownerId + '"]');
    if (!section) {
      section = el("section", "owner-section");
      section.dataset.owner = ownerId;
      section.dataset.canCommand = "0";
      section.appendChild(el("div", "tiles"));
      dashboard.appendChild(section);
      const empty = document.getElementById("empty-state");
      if (empty) empty.remove();
    }
    return section;
  }

  function newTile(state) {
    const template = document.getElementById("tile-template");
    const tile = template.content.firstElementChild.cloneNode(true);
    tile.dataset.device = state.device_id;
    tile.querySelector('[data-field="name"]').href = deviceUrl(state.device_id);
    ownerSection(state.owner_id).querySelector(".tiles").appendChild(tile);
    return tile;
  }

  function setText(root, field, text) {
    const node = root.querySelector('[data-field="' + field + '"]');
    if (node && node.textContent !== text) node.textContent = text;
  }

  function updateRelays(tile, state) {
    const box = tile.querySelector('[data-field="relays"]');
    if (!box) return;
    const wanted = new Set(state.relays.map(String));
    for (const row of box.querySelectorAll(".relay")) {
      if (!wanted.has(row.dataset.relay)) row.remove();
    }
    for (const n of state.relays) {
      let row = box.querySelector('.relay[data-relay="' + n + '"]');
      if (!row) {
        row = document.getElementById("relay-template").content.firstElementChild.cloneNode(true);
        row.dataset.relay = n;
        for (const button of row.querySelectorAll("button.cmd")) {
          if (canCommand(state.owner_id)) button.dataset.relay = n;
          else button.remove();
        }
        box.appendChild(row);
      }
      row.querySelector(".relay-label").textContent = state.relays.length > 1 ? "Relay " + n : "Lamp";
      const power = state.power[String(n)] || "";
      if (row.dataset.power !== power) {
        row.dataset.power = power;
        row.querySelector('[data-field="power"]').textContent = power || "–";
        flash(row);
      }
    }
  }

  function scaled(name, value, profile) {
    let unit = (PROFILE_UNITS[profile] || {})[name] || UNITS[name] || "";
    for (const ladder of PREFIX_LADDERS) {
      let step = ladder.indexOf(unit);
      if (step < 0) continue;
      while (Math.abs(value) >= 1000 && step + 1 < ladder.length) { value /= 1000; step += 1; }
      unit = ladder[step];
    }
    return [formatNumber(value), unit];
  }

  function readingItems(state, info) {
    const values = chartValues(state.last_reading);
    const names = TILE_FIRST.filter((k) => k in values)
      .concat(Object.keys(values).filter((k) => !TILE_FIRST.includes(k)))
      .slice(0, TILE_READINGS);
    const items = names.map((k) => [k.replace(/_/g, " "), ...scaled(k, values[k], state.profile)]);
    if (!info) return items;
    if (state.rssi !== null && items.length < TILE_READINGS) items.push(["signal", String(state.rssi), "dBm"]);
    if (state.firmware && items.length < TILE_READINGS) items.push(["firmware", state.firmware, ""]);
    return items;
  }

  function updateReadings(tile, state) {
    const box = tile.querySelector('[data-field="readings"]');
    if (!box) return;
    const info = !tile.classList.contains("tile-flat"); // the device page lists them as facts
    box.replaceChildren(...readingItems(state, info).map(([name, text, unit]) => {
      const item = el("div", "reading");
      item.appendChild(el("dt", "", name));
      const dd = el("dd");
      dd.appendChild(el("span", "value", text));
      dd.appendChild(document.createTextNode(" "));
      dd.appendChild(el("span", "unit", unit));
      item.appendChild(dd);
      return item;
    }));
  }

  function applyState(state) {
    let tiles = tilesFor(state.device_id);
    if (!tiles.length && dashboard) tiles = [newTile(state)];
    for (const tile of tiles) {
      tile.dataset.owner = state.owner_id;
      if (tile.dataset.connection !== state.connection) {
        tile.dataset.connection = state.connection;
        flash(tile);
      }
      const badge = tile.querySelector('[data-field="connection"]');
      badge.className = "badge badge-" + state.connection;
      badge.textContent = state.connection;
      setText(tile, "name", state.name);
      setText(tile, "device_id", state.device_id);
      setText(tile, "profile", state.profile_label);
      const flat = tile.classList.contains("tile-flat");
      setText(tile, "ip", state.ip || (flat ? "–" : ""));
      // Device page facts (absent on tiles).
      setText(tile, "firmware", state.firmware || "–");
      setText(tile, "rssi", state.rssi !== null ? state.rssi + " dBm" : "–");
      setText(tile, "uptime", state.uptime || "–");
      setText(tile, "device_type", state.device_type || "–");
      setText(tile, "seq_gaps", String(state.seq_gaps));
      const seen = tile.querySelector('[data-field="last_seen"]');
      seen.dataset.ts = state.last_seen_at || "";
      seen.textContent = ago(state.last_seen_at);
      updateRelays(tile, state);
      updateReadings(tile, state);
    }
  }

  function applySnapshot(message) {
    clockOffsetMs = Date.parse(message.server_time) - Date.now();
    const seen = new Set();
    for (const state of message.devices) {
      seen.add(state.device_id);
      applyState(state);
    }
    if (dashboard) {
      // Devices deleted (or moved to another owner) while we were away.
      for (const tile of dashboard.querySelectorAll(".tile[data-device]")) {
        if (!seen.has(tile.dataset.device)) tile.remove();
      }
      for (const section of dashboard.querySelectorAll(".owner-section")) {
        if (!section.querySelector(".tile")) section.remove();
      }
    }
    body.dataset.snapshots = String(Number(body.dataset.snapshots || 0) + 1);
  }

  function updateStats() {
    if (!dashboard) return;
    const tiles = dashboard.querySelectorAll(".tile[data-device]");
    const count = (selector) => dashboard.querySelectorAll(selector).length;
    const stats = {
      total: tiles.length,
      online: count('.tile[data-connection="online"]'),
      offline: count('.tile[data-connection="offline"]'),
      lamps_on: count('.relay[data-power="ON"]'),
    };
    for (const [name, value] of Object.entries(stats)) {
      const node = document.querySelector('[data-stat="' + name + '"]');
      if (node) node.textContent = String(value);
    }
  }

  // --- device page: chart and transitions -----------------------------------------------------

  const chart = {
    instance: null,
    points: [], // [{ts: ms, values: {...}}]
    series: [],
    active: null,
  };

  function initChart() {
    const canvas = document.getElementById("chart");
    const seed = document.getElementById("chart-points");
    if (!canvas || !window.Chart) return;
    const points = seed ? JSON.parse(seed.textContent) : [];
    addPoints(points, false);
    const primary = getComputedStyle(body).getPropertyValue("--primary").trim() || "#9333ea";
    chart.instance = new window.Chart(canvas, {
      type: "line",
      data: { datasets: [{
        data: [], borderColor: primary, backgroundColor: primary + "22", fill: true,
        borderWidth: 2, pointRadius: 0, tension: 0.25,
      }] },
      options: {
        animation: false,
        maintainAspectRatio: false,
        parsing: false,
        normalized: true,
        interaction: { mode: "nearest", intersect: false, axis: "x" },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: {
            title: (items) => new Date(items[0].parsed.x).toLocaleTimeString(),
            label: (item) => scaled(chart.active, item.parsed.y, pageProfile).join(" "),
          } },
        },
        scales: {
          x: {
            type: "linear",
            grid: { display: false },
            ticks: { maxTicksLimit: 6, callback: (v) => new Date(v).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) },
          },
          y: {
            grid: { color: "#f3f4f6" },
            ticks: { maxTicksLimit: 5, callback: (v) => scaled(chart.active, v, pageProfile).join(" ") },
          },
        },
      },
    });
    renderChart();
  }

  function addPoints(points, redraw) {
    for (const point of points) {
      const values = point.values || {};
      chart.points.push({ ts: Date.parse(point.ts), values: values });
      for (const name of Object.keys(values)) {
        if (!chart.series.includes(name)) chart.series.push(name);
      }
    }
    const cutoff = Date.now() + clockOffsetMs - CHART_WINDOW_MS;
    chart.points = chart.points.filter((p) => p.ts >= cutoff).slice(-CHART_POINTS);
    if (!chart.active || !chart.series.includes(chart.active)) {
      chart.active = chart.series.includes("power") ? "power" : chart.series[0] || null;
    }
    if (redraw) renderChart();
  }

  function renderTabs() {
    const tabs = document.getElementById("series-tabs");
    if (!tabs) return;
    tabs.replaceChildren(...chart.series.map((name) => {
      const tab = el("button", "tab" + (name === chart.active ? " active" : ""), name.replace(/_/g, " "));
      tab.type = "button";
      tab.setAttribute("role", "tab");
      tab.addEventListener("click", () => { chart.active = name; renderChart(); });
      return tab;
    }));
  }

  function renderChart() {
    renderTabs();
    const empty = document.getElementById("chart-empty");
    if (empty) empty.hidden = chart.points.length > 0;
    if (!chart.instance) return;
    const name = chart.active;
    chart.instance.data.datasets[0].label = name || "";
    const data = chart.points
      .filter((p) => name in p.values)
      .map((p) => ({ x: p.ts, y: p.values[name] }));
    chart.instance.data.datasets[0].data = data;
    // The time axis spans the data exactly (a linear scale would round out to "nice" ticks).
    chart.instance.options.scales.x.min = data.length ? data[0].x : undefined;
    chart.instance.options.scales.x.max = data.length ? data[data.length - 1].x : undefined;
    chart.instance.update("none");
  }

  function addTransitions(items) {
    const tbody = document.getElementById("transitions");
    if (!tbody) return;
    const placeholder = tbody.querySelector(".empty-row");
    if (placeholder) placeholder.remove();
    for (const t of items) {
      const row = el("tr");
      const when = el("time", "", new Date(t.at).toLocaleString());
      when.dataset.ts = t.at;
      const cell = el("td");
      cell.appendChild(when);
      row.appendChild(cell);
      row.appendChild(el("td", "", t.kind + (t.relay ? " " + t.relay : "")));
      const change = el("td", "", (t.old || "–") + " → ");
      change.appendChild(el("strong", "", t.new));
      row.appendChild(change);
      row.appendChild(el("td", "muted", t.cause));
      tbody.prepend(row);
      flash(row);
    }
    while (tbody.rows.length > MAX_TRANSITIONS) tbody.deleteRow(-1);
  }

  // --- commands -------------------------------------------------------------------------------

  function toast(text, kind) {
    const node = el("div", "toast toast-" + (kind || "info"), text);
    document.body.appendChild(node);
    setTimeout(() => node.remove(), 4000);
  }

  function commandUrl(deviceId) {
    const root = devicePage || dashboard;
    return root.dataset.commandUrl.replace("__id__", encodeURIComponent(deviceId));
  }

  const OPEN_STATUSES = new Set(["pending", "queued", "published"]);
  const PENDING_GIVE_UP_MS = 30000;
  // Results seen on the socket, by command id: a confirmation can overtake the POST's answer.
  const commandResults = new Map();

  function settle(row, status, detail) {
    delete row.dataset.pending;
    row.classList.remove("pending");
    if (status === "confirmed") flash(row);
    else toast("Command " + status + (detail ? ": " + detail : ""), "error");
  }

  async function sendCommand(button) {
    const tile = button.closest(".tile");
    const row = button.closest(".relay");
    const csrf = document.querySelector("input[name=csrfmiddlewaretoken]");
    row.dataset.pending = "sending";
    row.classList.add("pending");
    try {
      const response = await fetch(commandUrl(tile.dataset.device), {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf ? csrf.value : "" },
        body: JSON.stringify({ action: button.dataset.action, relay: Number(button.dataset.relay) }),
        credentials: "same-origin",
      });
      const data = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(data.detail || "Command failed (" + response.status + ")");
      const known = commandResults.get(data.command_id);
      const result = known && !OPEN_STATUSES.has(known.status) ? known : data;
      if (OPEN_STATUSES.has(result.status)) {
        row.dataset.pending = data.command_id;
        // The socket may be down; do not leave the buttons disabled for ever.
        setTimeout(() => {
          if (row.dataset.pending === data.command_id) settle(row, "unconfirmed", "no answer yet");
        }, PENDING_GIVE_UP_MS);
      } else {
        settle(row, result.status, result.detail);
      }
    } catch (error) {
      delete row.dataset.pending;
      row.classList.remove("pending");
      toast(error.message, "error");
    }
  }

  function commandUpdate(message) {
    if (!message.command_id) return;
    commandResults.set(message.command_id, message);
    if (commandResults.size > 100) commandResults.delete(commandResults.keys().next().value);
    if (OPEN_STATUSES.has(message.status)) return;
    const selector = '.relay[data-pending="' + CSS.escape(message.command_id) + '"]';
    for (const row of document.querySelectorAll(selector)) settle(row, message.status, message.detail);
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button.cmd");
    if (button && !button.closest(".relay").classList.contains("pending")) sendCommand(button);
  });

  // --- the socket -----------------------------------------------------------------------------

  let socket = null;
  let backoff = BACKOFF_MIN_MS;
  let pingTimer = null;
  let pongTimer = null;
  let reconnectTimer = null;

  function setStatus(status) {
    body.dataset.live = status;
    const text = document.querySelector("#live-indicator .live-text");
    if (text) text.textContent = { live: "Live", connecting: "Connecting…", offline: "Reconnecting…" }[status];
  }

  function send(message) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
  }

  function handle(message) {
    switch (message.type) {
      case "snapshot":
        applySnapshot(message);
        backoff = BACKOFF_MIN_MS; // only a real snapshot proves the connection works
        setStatus("live");
        break;
      case "device":
        message.devices.forEach(applyState);
        break;
      case "telemetry":
        if (message.device === pageDevice) addPoints(message.points, true);
        break;
      case "transition":
        if (message.device === pageDevice) addTransitions(message.transitions);
        break;
      case "command":
        commandUpdate(message);
        break;
      case "resync":
        send({ type: "snapshot" });
        break;
      case "subscribed":
        body.dataset.subscribed = message.device;
        break;
      case "pong":
        clearTimeout(pongTimer);
        break;
      case "error":
        console.warn("live:", message.error, message.detail);
        break;
    }
    updateStats();
  }

  function connect() {
    clearTimeout(reconnectTimer);
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/ws/live/");
    socket = ws;
    ws.onopen = () => {
      if (pageDevice) send({ type: "subscribe", device: pageDevice });
      pingTimer = setInterval(() => {
        send({ type: "ping" });
        clearTimeout(pongTimer);
        // No pong: the connection is dead even if the browser has not noticed yet.
        pongTimer = setTimeout(() => ws.close(), PONG_TIMEOUT_MS);
      }, PING_EVERY_MS);
    };
    ws.onmessage = (event) => handle(JSON.parse(event.data));
    ws.onclose = () => {
      clearInterval(pingTimer);
      clearTimeout(pongTimer);
      if (socket !== ws) return;
      socket = null;
      setStatus("offline");
      // Exponential backoff with jitter, so a restarted server is not hit by every page at once.
      const delay = Math.min(backoff, BACKOFF_MAX_MS) * (0.8 + Math.random() * 0.4);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      reconnectTimer = setTimeout(connect, delay);
    };
  }

  function reconnectNow() {
    if (!socket) { backoff = BACKOFF_MIN_MS; connect(); }
  }

  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) reconnectNow(); });

  // "seen 12 s ago" keeps counting between messages.
  setInterval(() => {
    for (const node of document.querySelectorAll('time[data-field="last_seen"]')) {
      node.textContent = ago(node.dataset.ts);
    }
  }, 1000);

  // Server-rendered times are UTC; show them in the browser's zone like live-added rows.
  for (const node of document.querySelectorAll("#transitions time[data-ts]")) {
    node.textContent = new Date(node.dataset.ts).toLocaleString();
  }
  initChart();
  updateStats();
  connect();
})();
