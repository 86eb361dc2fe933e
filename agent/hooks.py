"""Compatibility path: the hooks moved next to the device session (`nanofleet.agent.device_session.hooks`), which
is written against them; import them from there. This re-export goes once nothing imports the old path."""

from nanofleet.agent.device_session.hooks import AgentHooks, AgentMetrics

__all__ = ["AgentHooks", "AgentMetrics"]
