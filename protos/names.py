"""Names the parts share, each from one source: thermal levels from the proto enum `ThermalLevel`, command kinds
from the one list below (the controller's web API, dashboard and command service use it; the agent handles exactly
these, held so by tests/contract/test_names.py)."""

from __future__ import annotations

from typing import Literal, get_args

from nanofleet.protos import fleet_pb2

__all__ = ["COMMAND_KINDS", "THERMAL_LEVELS", "CommandKind", "ThermalName", "thermal_name"]

# `none` … `shutdown` in the enum's order (index = ThermalLevel value), as Android names them.
THERMAL_LEVELS: tuple[str, ...] = tuple(
    fleet_pb2.ThermalLevel.Name(v).removeprefix("THERMAL_LEVEL_").lower()
    for v in sorted(fleet_pb2.ThermalLevel.values()))
# The same names spelled out for type checkers and pydantic (a Literal cannot be built at run time for mypy);
# the check below fails at import if the proto and this line ever disagree.
ThermalName = Literal["none", "light", "moderate", "severe", "critical", "emergency", "shutdown"]
if get_args(ThermalName) != THERMAL_LEVELS:
    raise ImportError(f"protos/names.py: ThermalName {get_args(ThermalName)} is not the proto's {THERMAL_LEVELS}")

# What an operator can send a device (topics `cmd` / `cmd/result`); the device session answers ping, rebirth and
# reload-policy itself, the agent service the model and queue ones.
CommandKind = Literal["ping", "rebirth", "reload-policy", "reload-model", "unload-model", "drain-queue"]
COMMAND_KINDS: tuple[str, ...] = get_args(CommandKind)


def thermal_name(level: int) -> str:
    """The name of a ThermalLevel value; out-of-range values (a newer proto, a corrupt row) read as `none`."""
    return THERMAL_LEVELS[level] if 0 <= level < len(THERMAL_LEVELS) else "none"
