// Keeps the device counts of the IoT Owners page's Overview tab current, from the live socket
// (/ws/live/, apps.devices.consumers): a snapshot on connect, then `device` deltas.
(function () {
  "use strict";
  const root = document.querySelector("[data-owner-id]");
  if (!root || !("WebSocket" in window)) return;
  const ownerId = Number(root.dataset.ownerId);
  const states = new Map(); // device_id -> connection
  let complete = false; // a truncated snapshot must not overwrite the server's exact counts
  let delay = 1000;
  let pinger = null;

  function apply(devices) {
    for (const device of devices || []) {
      if (device.owner_id === ownerId) states.set(device.device_id, device.connection);
    }
  }

  function render() {
    if (!complete) return;
    const counts = { online: 0, offline: 0, unknown: 0 };
    for (const connection of states.values()) {
      counts[connection in counts ? connection : "unknown"] += 1;
    }
    for (const [name, value] of Object.entries(counts)) {
      const cell = root.querySelector(`[data-owner-stat="${name}"]`);
      if (!cell) continue;
      cell.textContent = String(value);
      if (cell.dataset.alertClass) cell.classList.toggle(cell.dataset.alertClass, value > 0);
    }
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${window.location.host}/ws/live/`);
    socket.onopen = () => {
      delay = 1000;
      // The server re-checks the user's owners on each ping.
      pinger = setInterval(() => socket.send(JSON.stringify({ type: "ping" })), 25000);
    };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "snapshot") {
        states.clear();
        complete = !message.truncated;
        apply(message.devices);
        render();
        root.dataset.live = "live"; // for people debugging, and for the browser test
      } else if (message.type === "device") {
        apply(message.devices);
        render();
      } else if (message.type === "resync") {
        socket.send(JSON.stringify({ type: "snapshot" }));
      }
    };
    socket.onclose = () => {
      root.dataset.live = "offline";
      clearInterval(pinger);
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }

  connect();
})();
