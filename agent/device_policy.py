"""The routing policy on the device (DESIGN.md "Policy on the device"): who it must be addressed to, which one is
current, and the copy kept on disk so the fleet's limits hold from start, before any broker connection.

Which policy is current: the one received LAST on the device's own retained policy topic. Versions are the
controller's per-fleet publish rounds, not a clock the device can trust: a controller whose database was reset
starts again at 1, and a stray message must not lock the device out. MQTT keeps per-topic order from one publisher
and the broker hands a (re)subscribing client the retained copy, which is the last one published; so the agent
applies any addressed policy whose content differs from the one applied, whatever its version number. A policy
whose `fleet` or `device_id` is not the agent's own is refused, counted and logged.

The file (`policy.json` in the data dir, 0600) is written atomically: a temp file, fsync, rename, fsync of the
folder. A file that cannot be read or parsed, or addressed to another device, is reported and the agent starts on
the built-in defaults.

    PolicyError (AgentError)          root
    ├── PolicyRefused                 addressed to another fleet or device
    └── PolicyFileError               the file on disk is unreadable, corrupt or not this device's
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from nanofleet.agent.errors import AgentError
from nanofleet.protos import fleet_pb2

FILE_NAME = "policy.json"


class PolicyError(AgentError):
    code = "policy_error"


class PolicyRefused(PolicyError):
    code = "policy_refused"


class PolicyFileError(PolicyError):
    code = "policy_file_error"


def check_addressed(policy: fleet_pb2.RoutingPolicy, fleet: str, device_id: str) -> None:
    """Raise PolicyRefused unless `policy` names this fleet and this device."""
    if policy.fleet != fleet or policy.device_id != device_id:
        raise PolicyRefused(f"policy v{policy.version} is addressed to fleet {policy.fleet!r} device "
                            f"{policy.device_id!r}, not to this device ({fleet!r}, {device_id!r}); refused")


def same(a: fleet_pb2.RoutingPolicy | None, b: fleet_pb2.RoutingPolicy | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def content(policy: fleet_pb2.RoutingPolicy | None) -> dict[str, Any]:
    """The policy as proto3 JSON fields (defaults included), for /v1/status and the change log."""
    if policy is None:
        return {}
    return json_format.MessageToDict(policy, always_print_fields_with_no_presence=True)


def changes(old: fleet_pb2.RoutingPolicy | None, new: fleet_pb2.RoutingPolicy) -> str:
    """`field: old -> new, …` for the log line of an applied policy (version and issue time left out)."""
    before, after = content(old), content(new)
    diffs = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(after.keys() | before.keys())
             if k not in ("version", "issuedAtMs") and before.get(k) != after.get(k)]
    return ", ".join(diffs) or "no field changed"


class PolicyFile:
    """The last applied policy of this device, on disk."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME

    def load(self, fleet: str, device_id: str) -> fleet_pb2.RoutingPolicy | None:
        """The stored policy, None when there is none yet; PolicyFileError when it cannot be used."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PolicyFileError(f"{self.path}: cannot read the stored policy: {exc}") from exc
        try:
            policy = json_format.Parse(raw, fleet_pb2.RoutingPolicy())
        except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
            raise PolicyFileError(f"{self.path}: the stored policy is corrupt: {exc}") from exc
        try:
            check_addressed(policy, fleet, device_id)
        except PolicyRefused as exc:
            raise PolicyFileError(f"{self.path}: {exc.message}") from exc
        return policy

    def save(self, policy: fleet_pb2.RoutingPolicy) -> None:
        """Atomically replace the file (0600): a crash leaves the old policy or the new one, never a torn file."""
        data = json.dumps(content(policy), sort_keys=True).encode()
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, 0o600)  # whatever the umask, and even if a stale temp file had another mode
                f.write(data)
                f.flush()
                os.fsync(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise PolicyFileError(f"{self.path}: cannot store the applied policy: {exc}") from exc
