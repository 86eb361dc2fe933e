"""Device telemetry: the system collector (psutil + sysfs) and its sysfs readers."""

from nanofleet.agent.telemetry.collector import Collector

__all__ = ["Collector"]
