"""Compatibility path: the thermal scale moved to `nanofleet.thermal` (the simulator uses it too, and `nanofleet/`
must not import the agent). Import it from there; this re-export goes once nothing imports the old path."""

from nanofleet.thermal import *  # noqa: F403
from nanofleet.thermal import __all__ as __all__
