"""The dashboard's "Controller" panel: the controller's own health from `ControllerService.status()` — broker
connection, the MQTT reader, ingest counters (dropped and retried writes, rejections, backlog), supervised tasks and
their deaths with the last error, store and policy-publishing failures, commands not sent. Pure: status in, escaped
HTML out."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

__all__ = ["controller_panel"]


def _n(value: Any) -> int:
    return int(value or 0)


def _fact(label: str, value: str, key: str, warn: bool = False) -> str:
    cls = ' class="warn"' if warn else ""
    return f'<dt>{escape(label)}</dt><dd data-health="{escape(key)}"{cls}>{value}{" ⚠" if warn else ""}</dd>'


def controller_panel(status: Mapping[str, Any] | None) -> str:
    """The panel's HTML; empty when the app runs without a controller service (a store-only dashboard)."""
    if status is None:
        return ""
    ok = bool(status.get("ok"))
    failed = status.get("failed") or {}
    head = ('<p class="flash ok" data-health="ok">Controller running.</p>' if ok else
            f'<p class="flash error" data-health="ok" role="alert">Controller failed: '
            f'{escape(str(failed.get("task", "?")))} died ({escape(str(failed.get("error", "")))}).</p>')
    ingest = status.get("ingest") or {}
    transport = status.get("transport") or {}
    store = status.get("store") or {}
    policy = status.get("policy") or {}
    commands = status.get("commands") or {}
    dropped_by = ingest.get("dropped_by_reason") or {}
    dropped_text = str(_n(ingest.get("dropped"))) + (
        " (" + ", ".join(f"{escape(str(k))}: {_n(v)}" for k, v in sorted(dropped_by.items())) + ")"
        if dropped_by else "")
    connected = bool(status.get("broker_connected"))
    broker = "connected" if connected else "disconnected"
    if transport:
        last_error = transport.get("last_error")
        broker += (f' <span class="muted">{escape(str(transport.get("reader", "")))} reader, '
                   f'{_n(transport.get("connects"))} connects'
                   f'{", last error: " + escape(str(last_error)) if last_error else ""}</span>')
    store_errors = sum(_n(store.get(k)) for k in ("commit_errors", "housekeeping_errors", "checkpoint_errors"))
    lead = status.get("leader") or {}
    leader = ("yes" if lead.get("is_leader") else "no (a follower: ingest only)") + (
        f' <span class="muted">{escape(str(lead.get("backend", "")))}, {_n(lead.get("changes"))} changes'
        f'{", last error: " + escape(str(lead["last_error"])) if lead.get("last_error") else ""}</span>')
    facts = "".join([
        _fact("Broker", broker, "broker", warn=not connected),
        _fact("Leader", leader, "leader"),
        _fact("Messages received / stored", f'{_n(ingest.get("received"))} / {_n(ingest.get("stored"))}', "ingest"),
        _fact("Writes retried", str(_n(ingest.get("write_retries"))), "write_retries",
              warn=_n(ingest.get("write_retries")) > 0),
        _fact("Messages dropped", dropped_text, "dropped", warn=_n(ingest.get("dropped")) > 0),
        _fact("Payloads rejected", str(_n(ingest.get("rejected"))), "rejected", warn=_n(ingest.get("rejected")) > 0),
        _fact("Ingest backlog", str(_n(ingest.get("backlog"))), "backlog"),
        _fact("Store errors", str(store_errors), "store_errors", warn=store_errors > 0),
        _fact("Policy publishing failures", str(_n(policy.get("failures"))), "policy_failures",
              warn=_n(policy.get("failures")) > 0),
        _fact("Commands not sent", str(_n(commands.get("fire_not_sent"))), "fire_not_sent",
              warn=_n(commands.get("fire_not_sent")) > 0),
        _fact("Command results rejected / late", f'{_n(commands.get("results_rejected"))} / '
                                                 f'{_n(commands.get("results_unclaimed"))}', "command_results"),
    ])
    tasks = status.get("tasks") or {}
    running = ", ".join(escape(str(t)) for t in sorted(tasks.get("running") or ())) or "—"
    deaths = tasks.get("deaths") or {}
    death_rows = "".join(
        f'<tr data-task="{escape(str(name))}"><td>{escape(str(name))}</td><td class="num">{_n(d.get("count"))}</td>'
        f'<td><code>{escape(str(d.get("error", "")))}</code></td></tr>'
        for name, d in sorted(deaths.items())
    )
    deaths_html = ('<table class="deaths"><thead><tr><th>Task</th><th class="num">Deaths</th><th>Last error</th>'
                   f"</tr></thead><tbody>{death_rows}</tbody></table>" if deaths
                   else '<p class="muted">No task has died.</p>')
    return (f'<h2>Controller</h2><section class="controller">{head}<dl class="facts">{facts}'
            f"<dt>Tasks running</dt><dd>{running}</dd></dl>{deaths_html}</section>")
