// Re-fetch this page's <main> every data-refresh seconds (server-rendered fragment), so state changes show
// without a reload; on a lost controller a banner says the figures are stale.
(function () {
  var main = document.getElementById("content");
  var every = main ? parseInt(main.getAttribute("data-refresh") || "0", 10) : 0;
  if (!every) return;
  function tick() {
    var active = document.activeElement;
    if (active && main.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) {
      setTimeout(tick, every * 1000);  // do not swap the form out from under someone typing in it
      return;
    }
    fetch(location.pathname + location.search, {
      headers: { "X-Fragment": "1" }, credentials: "same-origin", cache: "no-store", redirect: "error"
    }).then(function (r) {
      if (r.status === 401) {
        location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
        return null;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.text();
    }).then(function (html) {
      if (html !== null) { main.innerHTML = html; document.body.classList.remove("disconnected"); }
    }).catch(function () {
      document.body.classList.add("disconnected");
    }).then(function () { setTimeout(tick, every * 1000); });
  }
  setTimeout(tick, every * 1000);
})();
