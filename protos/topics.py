"""The MQTT topic scheme (DESIGN.md): `nanofleet/v1/{fleet}/{device}/{kind}`.

One function per topic, and `parse` for the reverse. Fleet and device ids are single topic levels: no `/`, no MQTT
wildcards, no leading `$`, so an id can never widen a subscription or escape a device's ACL prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ROOT = "nanofleet/v1"
Kind = Literal["status", "telemetry", "policy", "cmd", "cmd/result"]
KINDS: tuple[Kind, ...] = ("status", "telemetry", "policy", "cmd", "cmd/result")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class TopicError(ValueError):
    """A topic or id that is not part of nanofleet's scheme."""


def check_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a valid fleet or device id, else raise TopicError saying why."""
    if not isinstance(value, str) or not _ID.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: expected 1-128 characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return value


def topic(fleet: str, device: str, kind: Kind) -> str:
    if kind not in KINDS:
        raise TopicError(f"unknown topic kind {kind!r}: expected one of {', '.join(KINDS)}")
    return f"{ROOT}/{check_id(fleet, 'fleet')}/{check_id(device, 'device')}/{kind}"


def status(fleet: str, device: str) -> str:
    return topic(fleet, device, "status")


def telemetry(fleet: str, device: str) -> str:
    return topic(fleet, device, "telemetry")


def policy(fleet: str, device: str) -> str:
    return topic(fleet, device, "policy")


def cmd(fleet: str, device: str) -> str:
    return topic(fleet, device, "cmd")


def cmd_result(fleet: str, device: str) -> str:
    return topic(fleet, device, "cmd/result")


def device_prefix(fleet: str, device: str) -> str:
    """Everything a device may publish or subscribe to lies under this prefix (the broker ACL's pattern)."""
    return f"{ROOT}/{check_id(fleet, 'fleet')}/{check_id(device, 'device')}/#"


def fleet_filter(fleet: str, kind: Kind | Literal["+"] = "+") -> str:
    """Subscription filter for one kind (or, with '+', the single-level kinds) across every device of a fleet."""
    if kind != "+" and kind not in KINDS:
        raise TopicError(f"unknown topic kind {kind!r}")
    return f"{ROOT}/{check_id(fleet, 'fleet')}/+/{kind}"


@dataclass(frozen=True, slots=True)
class Topic:
    fleet: str
    device: str
    kind: Kind


def parse(name: str) -> Topic:
    """Split a topic into fleet, device and kind; raise TopicError naming the problem for one that is not ours."""
    if not name.startswith(ROOT + "/"):
        raise TopicError(f"topic {name!r} is not a nanofleet topic: expected it to start with {ROOT}/")
    parts = name[len(ROOT) + 1 :].split("/")
    if len(parts) < 3:
        raise TopicError(f"topic {name!r} is too short: expected {ROOT}/{{fleet}}/{{device}}/{{kind}}")
    fleet, device, kind = parts[0], parts[1], "/".join(parts[2:])
    if kind not in KINDS:
        raise TopicError(f"topic {name!r} has unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    return Topic(check_id(fleet, "fleet"), check_id(device, "device"), kind)  # type: ignore[arg-type]
