"""The dashboard's page bodies, rendered from store views to escaped HTML. Pure: data in, HTML text out.

Every string that came from a device (ids, model names, topics, reasons) goes through `html.escape` exactly once,
here; the tests feed ids like ``<script>`` through the whole app to hold that line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from nanofleet.config import Alerts

from .alerts import device_alerts
from .charts import Series, bar_chart, line_chart, meter
from .format import THERMAL_ORDER, fmt_age, fmt_mb, fmt_num, iso_utc, relative_time, state_badge
from .panels import controller_panel

__all__ = ["WINDOWS", "api_doc_page", "device_charts", "device_page", "device_url", "overview_page"]

# window name -> (milliseconds, store source: raw telemetry or a rollup resolution)
WINDOWS: dict[str, tuple[int, str]] = {
    "15m": (15 * 60_000, "raw"),
    "1h": (3_600_000, "raw"),
    "6h": (6 * 3_600_000, "1m"),
    "24h": (24 * 3_600_000, "1m"),
    "7d": (7 * 86_400_000, "1h"),
}


def device_url(device_id: str) -> str:
    return "/devices/" + quote(device_id, safe="")


def _g(obj: Any, name: str, default: Any = None) -> Any:
    return getattr(obj, name, default)


def _s(value: Any) -> str:
    return "—" if value is None else str(value)


def _time(ts_ms: int | None, now_ms: int) -> str:
    iso = iso_utc(ts_ms)
    return f'<time datetime="{iso}" title="{iso}">{escape(relative_time(ts_ms, now_ms))}</time>'


def _thermal_warn(level: str | None, alerts: Alerts) -> bool:
    return level in THERMAL_ORDER and THERMAL_ORDER.index(level) >= THERMAL_ORDER.index(alerts.thermal_at)


def _flag(text: str, warn: bool, why: str) -> str:
    return f'<span class="warn" title="{escape(why)}">{text} ⚠</span>' if warn else text


_ALERT_LABELS = {"offline": "offline", "thermal": "hot", "low_ram": "low RAM", "queue_depth": "queue"}


def _device_row(d: Any, alerts: Alerts, now_ms: int) -> str:
    did = _g(d, "device_id", "")
    state = _g(d, "state", "unknown")
    level = _g(d, "thermal_level")
    avail, total = _g(d, "ram_available_mb"), _g(d, "ram_total_mb")
    queue = _g(d, "queue_depth")
    temp_html = _flag(escape(fmt_num(_g(d, "temp_max_c"), "°C")), _thermal_warn(level, alerts),
                      f"thermal level at or above {alerts.thermal_at}")
    level_html = _flag(escape(level or "—"), _thermal_warn(level, alerts), f"alert at {alerts.thermal_at}")
    ram_low = avail is not None and avail < alerts.min_free_ram_mb
    ram_html = _flag(f"{escape(fmt_mb(avail))} / {escape(fmt_mb(total))}", ram_low,
                     f"below {alerts.min_free_ram_mb} MB free") + meter(avail, total)
    queue_html = _flag(escape(str(queue if queue is not None else "—")),
                       queue is not None and queue >= alerts.queue_depth,
                       f"offline queue at or above {alerts.queue_depth}")
    raised = device_alerts(d, alerts, now_ms)
    alerts_html = " ".join(f'<span class="alert" data-alert="{a.kind}" title="{escape(a.detail)}">'
                           f'{_ALERT_LABELS[a.kind]}</span>' for a in raised)
    model = _g(d, "model_name") or "—"
    availability = _g(d, "model_availability") or ""
    policy = _g(d, "policy_version")
    return (
        f'<tr class="row-{escape(state)}" data-device="{escape(did)}">'
        f'<td><a href="{escape(device_url(did))}">{escape(did)}</a></td>'
        f'<td>{escape(_g(d, "group") or "—")}</td>'
        f"<td>{state_badge(state)}</td>"
        f'<td>{_time(_g(d, "last_seen_ms"), now_ms)}</td>'
        f'<td class="num">{temp_html}</td><td>{level_html}</td>'
        f'<td class="num">{ram_html}</td>'
        f'<td class="num">{escape(fmt_num(_g(d, "cpu_percent"), "%"))}</td>'
        f'<td>{escape(model)} <span class="muted">{escape(availability)}</span></td>'
        f'<td class="num">{escape(str(policy) if policy is not None else "—")}</td>'
        f'<td class="num" data-col="queue">{queue_html}</td>'
        f'<td class="num" data-col="oldest">{escape(fmt_age(_g(d, "queue_oldest_age_s")))}</td>'
        f'<td class="num" data-col="slots_waiting">{escape(_s(_g(d, "slots_waiting")))}</td>'
        f'<td class="alerts">{alerts_html}</td></tr>'
    )


def _behind_html(behind: Sequence[Any], limit: int = 20) -> str:
    if not behind:
        return ""
    items = ", ".join(f'<a href="{escape(device_url(b.device_id))}">{escape(b.device_id)}</a> '
                      f'(runs v{int(b.applied)}, published v{int(b.published)})' for b in behind[:limit])
    more = f" and {len(behind) - limit} more" if len(behind) > limit else ""
    return (f'<p class="behind"><span class="warn">{len(behind)} device{"s" if len(behind) != 1 else ""} '
            f"not yet on the policy published for {'them' if len(behind) != 1 else 'it'}:</span> {items}{more}</p>")


def _convergence_html(convergence: dict[int, int]) -> str:
    versions = sorted(convergence.items(), reverse=True)
    latest = versions[0][0] if versions else None
    total = sum(convergence.values())
    converged = convergence.get(latest, 0) if latest is not None else 0
    # versions count publishing rounds fleet-wide: a device whose policy did not change in a round keeps its older
    # version and is still up to date; the "not yet on the policy published for them" list below is the real lag
    summary = (f"<p>{converged} of {total} devices run policy version v{latest}, the newest published; a device "
               "whose policy did not change since keeps its older version.</p>" if latest is not None
               else '<p class="muted">No device has reported a policy version yet.</p>')
    items = [(f"v{v}", float(n)) for v, n in versions]
    return summary + bar_chart(items, title="Devices per applied policy version",
                               highlight=f"v{latest}" if latest is not None else None)


def _rejections_html(rejections: Sequence[Any], now_ms: int) -> str:
    if not rejections:
        return '<p class="muted">No malformed payloads rejected.</p>'
    rows = "".join(
        f'<tr><td>{escape(_g(r, "device_id") or "—")}</td><td><code>{escape(_g(r, "topic", ""))}</code></td>'
        f'<td>{escape(_g(r, "reason", ""))}</td><td class="num">{int(_g(r, "count", 0))}</td>'
        f'<td>{_time(_g(r, "last_ms"), now_ms)}</td></tr>'
        for r in rejections
    )
    return ('<table class="rejections"><thead><tr><th>Device</th><th>Topic</th><th>Reason</th>'
            f'<th class="num">Count</th><th>Last</th></tr></thead><tbody>{rows}</tbody></table>')


def _usage_html(rows: Sequence[Any] | None) -> str:
    if rows is None:
        return ""
    head = "<h2>Gateway usage</h2>"
    if not rows:
        return head + '<p class="muted">No cloud requests recorded.</p>'
    ordered = sorted(rows, key=lambda r: (_g(r, "day", ""), _g(r, "cost_usd", 0.0)), reverse=True)
    body = "".join(
        f'<tr><td>{escape(r.day)}</td><td>{escape(r.device_id)}</td><td>{escape(r.app_id)}</td>'
        f'<td>{escape(r.model)}</td><td class="num">{int(r.requests)}</td>'
        f'<td class="num">{int(r.input_tokens)}</td><td class="num">{int(r.output_tokens)}</td>'
        f'<td class="num">${float(r.cost_usd):.4f}</td></tr>'
        for r in ordered
    )
    tokens = sum(int(r.input_tokens) + int(r.output_tokens) for r in rows)
    cost = sum(float(r.cost_usd) for r in rows)
    return (head + f"<p>{tokens} tokens, ${cost:.4f} in total.</p>"
            '<table class="usage"><thead><tr><th>Day</th><th>Device</th><th>App</th><th>Model</th>'
            '<th class="num">Requests</th><th class="num">Input tokens</th><th class="num">Output tokens</th>'
            f'<th class="num">Cost</th></tr></thead><tbody>{body}</tbody></table>')


MAX_ROWS = 500  # past this the table is a scroll, not an overview: filter instead


def _matches(d: Any, query: str, state: str) -> bool:
    if state and _g(d, "state") != state:
        return False
    if not query:
        return True
    q = query.casefold()
    return any(q in (_g(d, name) or "").casefold() for name in ("device_id", "group", "model_name"))


def _filter_form(query: str, state: str) -> str:
    options = "".join(f'<option value="{v}"{" selected" if v == state else ""}>{label}</option>'
                      for v, label in (("", "any state"), ("online", "online"), ("offline", "offline"),
                                       ("stale", "stale")))
    return ('<form class="filter" method="get" action="/">'
            f'<input type="search" name="q" value="{escape(query)}" placeholder="device, group or model" '
            f'aria-label="filter devices"> <select name="state" aria-label="state">{options}</select> '
            '<button type="submit">Filter</button></form>')


def overview_page(devices: Sequence[Any], convergence: dict[int, int], rejections: Sequence[Any],
                  usage_rows: Sequence[Any] | None, *, alerts: Alerts, now_ms: int,
                  behind: Sequence[Any] = (), query: str = "", state: str = "", max_rows: int = MAX_ROWS,
                  controller: Mapping[str, Any] | None = None) -> str:
    counts = {s: sum(1 for d in devices if _g(d, "state") == s) for s in ("online", "offline", "stale")}
    cards = "".join(
        f'<a class="card" href="/?state={key}" data-count="{key or "total"}"><div class="n">{n}</div>'
        f'<div class="l">{label}</div></a>'
        for key, n, label in (("", len(devices), "devices"), ("online", counts["online"], "online"),
                              ("offline", counts["offline"], "offline"), ("stale", counts["stale"], "stale"))
    )
    shown = sorted((d for d in devices if _matches(d, query, state)), key=lambda d: _g(d, "device_id", ""))
    if shown:
        rows = "".join(_device_row(d, alerts, now_ms) for d in shown[:max_rows])
        note = (f'<p class="muted">Showing {max_rows} of {len(shown)} devices; filter to narrow.</p>'
                if len(shown) > max_rows else "")
        table = (
            '<table class="devices"><thead><tr><th>Device</th><th>Group</th><th>State</th><th>Last seen</th>'
            '<th class="num">Temp</th><th>Thermal</th><th class="num">RAM avail / total</th><th class="num">CPU</th>'
            '<th>Model</th><th class="num">Policy</th><th class="num">Queue</th><th class="num">Oldest</th>'
            '<th class="num">Slots waiting</th><th>Alerts</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>{note}"
        )
    elif devices:
        table = '<p class="muted">No device matches this filter.</p>'
    else:
        table = '<p class="muted">No device has reported yet. Start an agent or <code>nanofleet sim</code>.</p>'
    return (
        f'<h1>Fleet</h1><div class="cards">{cards}</div>'
        f"{controller_panel(controller)}"
        f"<h2>Devices</h2>{_filter_form(query, state) if devices else ''}{table}"
        f"<h2>Policy convergence</h2>{_convergence_html(convergence)}{_behind_html(behind)}"
        f"<h2>Rejected payloads</h2>{_rejections_html(rejections, now_ms)}"
        f"{_usage_html(usage_rows)}"
    )


def device_charts(points: Sequence[Any], source: str, *, start_ms: int, end_ms: int,
                  ram_total_mb: float | None) -> list[str]:
    """CPU, temperature and RAM charts from raw telemetry points or rollup buckets."""
    span = {"x_start_ms": start_ms, "x_end_ms": end_ms}
    if source == "raw":
        cpu = [Series("CPU %", [(p.ts_ms, p.cpu_percent) for p in points])]
        temp = [Series("max °C", [(p.ts_ms, p.temp_max_c) for p in points], "#dc2626")]
        ram = [Series("available", [(p.ts_ms, p.ram_available_mb) for p in points], "#059669")]
    else:
        cpu = [Series("avg", [(p.ts_ms, p.cpu_avg) for p in points]),
               Series("max", [(p.ts_ms, p.cpu_max) for p in points], "#93c5fd")]
        temp = [Series("max", [(p.ts_ms, p.temp_max) for p in points], "#dc2626"),
                Series("avg", [(p.ts_ms, p.temp_avg) for p in points], "#fca5a5")]
        ram = [Series("min available", [(p.ts_ms, p.ram_available_min) for p in points], "#059669")]
    return [
        line_chart(cpu, title="CPU", unit="%", y_min=0, y_max=100, **span),
        line_chart(temp, title="Temperature", unit="°C", **span),
        line_chart(ram, title="RAM available", unit="MB", y_min=0, y_max=ram_total_mb or None, **span),
    ]


def _facts(d: Any, now_ms: int) -> str:
    routes = _g(d, "route_counts") or {}
    battery = _g(d, "battery_pct")
    charging = _g(d, "charging")
    battery_text = "—" if battery is None else fmt_num(battery, "%", 0) + (" (charging)" if charging else "")
    rows: list[tuple[str, str]] = [
        ("State", state_badge(_g(d, "state", "unknown"))),
        ("Last seen", _time(_g(d, "last_seen_ms"), now_ms)),
        ("Birth", _time(_g(d, "birth_ms"), now_ms)
         + f' <span class="muted">bdSeq {escape(_s(_g(d, "bd_seq")))}</span>'),
        ("Fleet / group", f'{escape(_g(d, "fleet") or "—")} / {escape(_g(d, "group") or "—")}'),
        ("Agent", escape(_g(d, "agent_version") or "—")),
        ("Model", f'{escape(_g(d, "model_name") or "—")} <span class="muted">'
                  f'{escape(_g(d, "model_availability") or "")}</span>'),
        ("Policy version", escape(_s(_g(d, "policy_version")))),
        ("CPU", escape(fmt_num(_g(d, "cpu_percent"), "%"))),
        ("Temperature", escape(fmt_num(_g(d, "temp_max_c"), "°C")) + f' <span class="muted">thermal '
                        f'{escape(_g(d, "thermal_level") or "—")}{", throttled" if _g(d, "throttled") else ""}</span>'),
        ("RAM available", f'{escape(fmt_mb(_g(d, "ram_available_mb")))} of {escape(fmt_mb(_g(d, "ram_total_mb")))}'),
        ("Battery", escape(battery_text)),
        ("Offline queue", escape(_s(_g(d, "queue_depth")))
         + f' <span class="muted">oldest {escape(fmt_age(_g(d, "queue_oldest_age_s")))}</span>'),
        ("Waiting for a model slot", escape(_s(_g(d, "slots_waiting")))),
        ("Queue counters", escape(", ".join(f"{k}: {v}" for k, v in sorted((_g(d, "queue_counters") or {}).items()))
                                  or "—")),
        ("Routes", escape(", ".join(f"{k}: {v}" for k, v in sorted(routes.items())) or "—")),
        ("Rejected / gaps", f'{int(_g(d, "rejected_count", 0) or 0)} / {int(_g(d, "gap_count", 0) or 0)}'),
    ]
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _events_html(events: Sequence[Any], now_ms: int) -> str:
    if not events:
        return ""
    rows = "".join(
        f'<tr><td>{_time(_g(e, "ts_ms"), now_ms)}</td><td>{state_badge(_g(e, "state", ""))}</td>'
        f'<td>{escape(_g(e, "reason", "") or "")}</td><td class="num">{escape(_s(_g(e, "bd_seq")))}</td></tr>'
        for e in reversed(events)
    )
    return ('<h2>State changes</h2><table class="events"><thead><tr><th>When</th><th>State</th><th>Why</th>'
            f'<th class="num">bdSeq</th></tr></thead><tbody>{rows}</tbody></table>')


def device_page(d: Any, charts: Iterable[str], *, window: str, now_ms: int, csrf: str | None,
                command_kinds: Sequence[str] = (), flash: tuple[str, str] | None = None,
                events: Sequence[Any] = ()) -> str:
    did = _g(d, "device_id", "")
    url = device_url(did)
    windows = " ".join(
        f'<a href="{escape(url)}?window={w}"{" class=current" if w == window else ""}>{w}</a>' for w in WINDOWS
    )
    flash_html = f'<p class="flash {escape(flash[0])}" role="status">{escape(flash[1])}</p>' if flash else ""
    commands = ""
    if command_kinds and csrf is not None:
        buttons = "".join(
            f'<form class="cmd" method="post" action="{escape(url)}/commands">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            f'<input type="hidden" name="kind" value="{escape(k)}"><button type="submit">{escape(k)}</button></form>'
            for k in command_kinds
        )
        commands = f"<h2>Commands</h2><div>{buttons}</div>"
    return (
        f'<p><a href="/">← Fleet</a></p><h1>{escape(did)} {state_badge(_g(d, "state", "unknown"))}</h1>{flash_html}'
        f"{_facts(d, now_ms)}"
        f'<h2>History</h2><p class="windows">Window: {windows} <span class="muted">(UTC)</span></p>'
        f'<div class="charts">{"".join(charts)}</div>{commands}{_events_html(events, now_ms)}'
    )


def api_doc_page(schema: dict[str, Any]) -> str:
    rows = []
    for path, ops in sorted(schema.get("paths", {}).items()):
        for method, op in ops.items():
            rows.append(f"<tr><td><code>{escape(method.upper())}</code></td><td><code>{escape(path)}</code></td>"
                        f'<td>{escape(op.get("summary", ""))}</td><td>{escape(op.get("description", ""))}</td></tr>')
    return (
        "<h1>REST API</h1><p>Send <code>Authorization: Bearer &lt;operator token&gt;</code>. "
        'The full schema is at <a href="/openapi.json">/openapi.json</a>.</p>'
        "<table><thead><tr><th>Method</th><th>Path</th><th>Summary</th><th>Description</th></tr></thead>"
        f'<tbody>{"".join(rows)}</tbody></table>'
    )
