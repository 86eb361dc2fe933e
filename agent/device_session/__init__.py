"""The agent's MQTT session with the controller: birth/death, telemetry, policy, commands (after Sparkplug B).

- Every connection gets a new bdSeq (persisted in the data dir); its last will is a retained offline DeviceStatus
  carrying that bdSeq (reason "last_will"), set before the CONNECT. After CONNACK the session publishes the
  retained birth with the same bdSeq, and telemetry restarts at seq 0 (0..255, wrapping).
- A persistent MQTT session (fixed client id, clean_session False) keeps policy and commands queued at the broker.
- While the broker is unreachable (or the buffer still holds older samples) telemetry goes to a bounded disk
  buffer and is replayed in order with its original timestamps, flagged `replayed`, each batch deleted only once
  the broker acknowledged it. Live telemetry and replay wait until the controller is known to listen (a live,
  not retained, policy message after this connection's birth), with `replay_grace_s` as the fallback: telemetry
  published while no controller is subscribed would be dropped by the broker.
- Policy (device_policy.py has the rule): a RoutingPolicy addressed to this fleet and device whose content differs
  from the applied one goes to `hooks.apply_policy`, whatever its version (the last one received on the retained
  topic is the controller's current one); one addressed elsewhere is refused and counted. The session then
  re-publishes its birth so the controller sees the applied version at once. An `apply_policy` that raises is
  logged, counted and shown in `status()`; the session goes on taking policy and commands.
- Commands: ack first, then the result; rebirth, ping and reload-policy are the session's own, the rest go to
  `hooks.handle_command`.
- Every loop runs under a TaskSupervisor: a loop that dies is logged, counted, shown in `status()` and restarted.
Nothing here publishes from a paho callback: everything runs on the event loop.

Modules: base.py (state, bdSeq, birth, status), telemetry.py (sampling, buffer, replay), control.py (policy and
commands), session.py (DeviceSession: start/stop), hooks.py (what the session needs from the rest of the agent).

Exceptions: DeviceSessionError (root).
"""

from .base import (
    AGENT_VERSION,
    CAPABILITIES,
    SESSION_COMMANDS,
    DeviceSessionError,
    ReportsReadErrors,
    SampleSource,
    now_ms,
    to_json,
)
from .hooks import AgentHooks, AgentMetrics
from .session import DeviceSession

__all__ = ["AGENT_VERSION", "CAPABILITIES", "SESSION_COMMANDS", "AgentHooks", "AgentMetrics", "DeviceSession",
           "DeviceSessionError", "ReportsReadErrors", "SampleSource", "now_ms", "to_json"]
