// The schedule form's "Next 10 runs": asks the server (apps.schedules.admin preview_view) for
// the runs of what is typed, before anything is saved. Debounced; the latest answer wins.
(function () {
  "use strict";
  const FIELDS = ["cron", "timezone", "starts_on", "ends_on"];
  let timer = null;
  let generation = 0;

  function refresh(box) {
    const params = new URLSearchParams();
    for (const name of FIELDS) {
      const input = document.getElementById("id_" + name);
      if (input) params.set(name, input.value.trim());
    }
    const mine = ++generation;
    fetch(box.dataset.url + "?" + params.toString(), {
      credentials: "same-origin",
      headers: { "X-Requested-With": "XMLHttpRequest" },
    })
      .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
      .then((html) => {
        if (mine === generation) box.innerHTML = html;
      })
      .catch(() => {
        if (mine === generation) box.textContent = "Preview unavailable.";
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const box = document.getElementById("schedule-preview");
    if (!box) return;
    for (const name of FIELDS) {
      const input = document.getElementById("id_" + name);
      if (!input) continue;
      for (const type of ["input", "change"]) {
        input.addEventListener(type, function () {
          clearTimeout(timer);
          timer = setTimeout(() => refresh(box), 250);
        });
      }
    }
    refresh(box);
  });
})();
