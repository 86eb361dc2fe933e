"""The durable offline queue (DESIGN.md "Offline queue"): `QueueStore` keeps requests on disk, `Drainer` answers
them when a route opens, `schedule` holds the pure decisions (FIFO per app, round-robin, retries, TTL)."""

from nanofleet.agent.queue.schedule import Candidate, RetryPolicy, plan
from nanofleet.agent.queue.store import TCP_UID, Accepted, Limits, QueueStore

__all__ = ["TCP_UID", "Accepted", "Candidate", "Limits", "QueueStore", "RetryPolicy", "plan"]
