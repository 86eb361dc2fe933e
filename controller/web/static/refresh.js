// Live pages: listen to the controller's /events (server-sent events) and re-fetch this page's <main> (the
// server-rendered X-Fragment) when an event concerns what is on screen — any device on the fleet and list pages,
// this device on its own page, alerts everywhere, the audit log on its page — at most once a second. When the
// stream is down (reconnecting, refused, no EventSource) the page falls back to re-fetching every data-refresh
// seconds (ten times slower while it is up); a lost controller shows the banner, an expired session leads to the login.
(function () {
  var main = document.getElementById("content");
  var every = main ? parseInt(main.getAttribute("data-refresh") || "0", 10) : 0;
  if (!every) return;
  var MIN_GAP_MS = 1000, SETTLE_MS = [1500, 3000];
  var path = location.pathname;
  var match = /^\/devices\/([^\/]+)$/.exec(path);
  var deviceId = match ? decodeURIComponent(match[1]) : null;
  var busy = false, again = false, last = 0, soon = null, timer = null;

  var badge = document.createElement("span");
  badge.id = "live-state";
  badge.className = "live-state";
  var header = document.querySelector("header.top");
  if (header) header.appendChild(badge);
  function show(state, text) {
    if (edited && state !== "paused") return;  // the pause is what matters to the operator until they submit
    badge.setAttribute("data-live", state);
    badge.textContent = text;
  }

  // a form in <main> the operator has started to change (a filter, an acknowledgement's note) is not swapped out
  // from under them: the page pauses its refreshes until they submit it (a navigation) or reload
  var edited = false;
  function onEdit(e) {
    if (e.target && e.target.form && main.contains(e.target) && !edited) {
      edited = true;
      show("paused", "paused: unsaved form");
    }
  }
  main.addEventListener("input", onEdit);
  main.addEventListener("change", onEdit);

  function typing() {
    var active = document.activeElement;
    return edited || (active && main.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName));
  }

  function refresh() {
    if (busy) { again = true; return; }
    if (typing()) { later(every * 1000); return; }  // do not swap the form out from under someone typing in it
    busy = true;
    last = Date.now();
    fetch(location.pathname + location.search, {
      headers: { "X-Fragment": "1" }, credentials: "same-origin", cache: "no-store", redirect: "error"
    }).then(function (r) {
      if (r.status === 401) {
        location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
        return null;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      alertCount(r.headers.get("X-Open-Alerts"));
      return r.text();
    }).then(function (html) {
      if (html === null) return;
      document.body.classList.remove("disconnected");
      // the operator began to edit a form while this was in flight: their edit wins, the figures come later
      if (typing()) { later(every * 1000); return; }
      main.innerHTML = html;
    }).catch(function () {
      document.body.classList.add("disconnected");
    }).then(function () {
      busy = false;
      if (again) { again = false; wanted(); }
    });
  }

  function alertCount(value) {  // the header's open-alert count is outside <main>: the fragment's header carries it
    var link = document.querySelector('header.top nav a[href="/alerts"]');
    if (value === null || !link) return;
    var n = parseInt(value, 10) || 0;
    var badge = link.querySelector(".alert-count");
    if (n > 0 && !badge) {
      badge = document.createElement("span");
      badge.className = "alert-count";
      link.appendChild(document.createTextNode(" "));
      link.appendChild(badge);
    }
    if (badge && n > 0) { badge.textContent = String(n); badge.setAttribute("data-open-alerts", String(n)); }
    if (badge && n === 0) badge.remove();
  }

  function later(ms) {
    if (soon === null) soon = setTimeout(function () { soon = null; refresh(); }, ms);
  }

  function debounced() {  // now, or once MIN_GAP_MS after the last fetch
    var wait = last + MIN_GAP_MS - Date.now();
    if (wait <= 0 && soon === null) refresh(); else later(Math.max(wait, 0));
  }

  // fleet-wide figures (the overview's cards, the header's alert count) come from a summary the controller serves
  // while it recomputes it in the background (controller/summary.py: at most a second old, stale while
  // revalidating): a fetch right after an event may get the figures from before it, and the fetch that starts the
  // recomputation gets them too. Two more fetches once a burst of events has settled show the recomputed figures.
  var settle = [];
  function wanted() {
    debounced();
    settle.forEach(clearTimeout);
    settle = SETTLE_MS.map(function (ms) { return setTimeout(debounced, ms); });
  }

  // the timed refresh: every data-refresh seconds without the stream; ten times slower with it, for what comes
  // without an event (the gateway's usage, a policy applied from the CLI)
  var period = 0;
  function tick() { refresh(); timer = setTimeout(tick, period); }
  function poll(seconds) {
    if (period === seconds * 1000 && timer !== null) return;
    period = seconds * 1000;
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(tick, period);
  }

  if (!window.EventSource) { show("off", "refresh every " + every + " s"); poll(every); return; }
  var opened = false;
  var source = new EventSource("/events");
  source.addEventListener("open", function () {
    show("live", "live");
    poll(every * 10);
    if (opened) wanted();  // back after a break: what changed meanwhile comes as events or a resync; be sure
    opened = true;
  });
  source.addEventListener("device", function (e) {
    if (deviceId === null) { wanted(); return; }
    var data = JSON.parse(e.data);
    if (data.more > 0 || (data.ids || []).indexOf(deviceId) >= 0) wanted();
  });
  source.addEventListener("alert", wanted);
  source.addEventListener("audit", function () { if (path.indexOf("/audit") === 0) wanted(); });
  source.addEventListener("resync", wanted);
  source.addEventListener("error", function () {
    if (source.readyState === EventSource.CLOSED) {  // refused (an expired session) or not a stream: timed refresh
      show("off", "refresh every " + every + " s");
    } else {
      show("reconnecting", "reconnecting…");
    }
    poll(every);
  });
  show("reconnecting", "connecting…");
})();
