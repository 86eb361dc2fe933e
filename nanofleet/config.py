"""`fleet.yaml`: the operator's whole intent for a fleet, loaded into typed models.

Groups and devices override `defaults` field by field (deep merge), so `profile_for(device)` is what a device runs.
Every problem is raised as `ConfigError` naming the file, the field path and what was expected — never a traceback.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from nanofleet.protos import topics
from nanofleet.protos.names import THERMAL_LEVELS as THERMAL_LEVELS  # re-exported: the names fleet.yaml takes
from nanofleet.protos.names import ThermalName

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class ConfigError(ValueError):
    """A fleet.yaml that cannot be used; the message names the file, the field and what was expected."""


def parse_duration(value: Any) -> float:
    """Seconds from `30`, `"30s"`, `"5m"`, `"24h"`, `"7d"`; numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 24h")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 30s, 5m, 24h, got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
# Fleet and device ids become MQTT topic levels: checked by the topic scheme's own rule, the one place it lives.
FleetId = Annotated[str, AfterValidator(lambda v: topics.check_id(v, "fleet"))]
DeviceId = Annotated[str, AfterValidator(lambda v: topics.check_id(v, "device"))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CloudBudget(_Model):
    tokens_per_day: int = Field(default=200_000, ge=0)


class AppRule(_Model):
    privacy: Literal["normal", "sensitive"] = "normal"
    mode: Literal["prefer_local", "local_only", "cloud_only", "prefer_cloud"] | None = None
    tokens_per_day: int | None = Field(default=None, ge=0, description="cloud budget for this app on each device")


class Routing(_Model):
    prefer: Literal["local", "cloud"] = "local"
    cloud: Literal["allowed", "denied"] = "allowed"
    thermal_limit: ThermalName = "severe"
    min_free_ram_mb: int = Field(default=512, ge=0, le=1_048_576)
    battery_floor_pct: int = Field(default=20, ge=0, le=100)
    metered_network: Literal["local_only", "allowed"] = "local_only"
    max_local_prompt_tokens: int = Field(default=6000, ge=1, le=10_000_000)
    cloud_budget: CloudBudget = CloudBudget()
    apps: dict[str, AppRule] = {}


class ModelSpec(_Model):
    source: str = Field(default="builtin:tiny-test", pattern=r"^(builtin:[a-z0-9-]+|hf://\S+|https?://\S+|file:\S+)$")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    keep_alive: Duration | Literal[-1] = 300.0  # seconds idle before unloading; 0 = at once; -1 = keep loaded
    n_ctx: int = Field(default=2048, ge=128, le=1_048_576)
    n_parallel: int = Field(default=2, ge=1, le=64)
    threads: int | None = Field(default=None, ge=1, le=1024, description="llama.cpp threads; None: llama.cpp's default")

    @model_validator(mode="after")
    def _remote_needs_hash(self) -> ModelSpec:
        if self.source.startswith(("hf://", "http://", "https://")) and not self.sha256:
            raise ValueError("a downloaded model needs sha256 (64 lowercase hex digits) so devices can verify it")
        return self


class QueueSpec(_Model):
    max_items: int = Field(default=10_000, ge=1, le=10_000_000)
    ttl: Duration = 86_400.0
    max_bytes: int = Field(default=64 << 20, ge=1024, le=1 << 40)


class Profile(_Model):
    """What one device runs: `defaults`, then its group's overrides, then its own."""

    telemetry_interval_s: float = Field(default=10, gt=0, le=86_400)
    model: ModelSpec = ModelSpec()
    routing: Routing = Routing()
    queue: QueueSpec = QueueSpec()


DEFAULT_GROUP = "default"  # the group of every device no group claims: it runs `defaults`


class Group(_Model):
    """Partial profile (validated against `Profile` after merging), plus `match`: device id globs that put unlisted
    devices in this group, so an operator with a hundred devices need not list each."""

    model_config = ConfigDict(extra="allow", frozen=True)
    match: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default=[], description="fnmatch globs of device ids (sim-00*, pi-lab-??)")


class DeviceEntry(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)
    group: str | None = None


class Broker(_Model):
    url: str = Field(default="mqtt://127.0.0.1:1883", pattern=r"^mqtts?://[^/\s:]+(:\d{1,5})?/?$")
    ca: Path | None = Field(default=None,
                            description="the fleet's CA (PEM) for an mqtts:// broker; None: the system store")
    # A separately run Mosquitto: `nanofleet enroll` and `revoke` keep its password and ACL files and reload it.
    password_file: Path | None = Field(default=None, description="mosquitto's password_file that enroll/revoke keep")
    acl_file: Path | None = Field(default=None, description="mosquitto's acl_file that enroll/revoke keep")
    pid_file: Path | None = Field(default=None, description="mosquitto's pid_file: enroll/revoke SIGHUP that pid")

    @model_validator(mode="after")
    def _ca_needs_tls(self) -> Broker:
        if self.ca is not None and not self.url.startswith("mqtts://"):
            raise _FieldError(("broker", "ca"), f"a CA file needs an mqtts:// url (broker.url is {self.url!r})")
        return self


class Upstream(_Model):
    kind: Literal["gemini", "openai", "llamacpp"] = "gemini"
    model: str = "gemini-2.5-flash"
    api_key_env: str = Field(default="GEMINI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    base_url: str | None = None
    thinking_budget: int | None = Field(default=0, ge=-1, le=24_576)
    timeout: Duration = 30.0
    max_retries: int = Field(default=2, ge=0, le=10)


class Price(_Model):
    input: float = Field(ge=0)
    output: float = Field(ge=0)


DEFAULT_PRICES = {
    "gemini-2.5-flash": Price(input=0.30, output=2.50),
    "gemini-2.5-flash-lite": Price(input=0.10, output=0.40),
}


class Budgets(_Model):
    fleet_tokens_per_day: int | None = Field(default=None, ge=0)
    app_tokens_per_day: int | None = Field(default=None, ge=0, description="default per-app cloud budget for the fleet")


class Gateway(_Model):
    listen: str = Field(default="127.0.0.1:50051", pattern=r"^[^\s:]+:\d{1,5}$")
    upstream: Upstream = Upstream()
    prices_per_million: dict[str, Price] = DEFAULT_PRICES
    budgets: Budgets = Budgets()
    idempotency_window: Duration = 86_400.0
    metrics_listen: str | None = Field(default=None, pattern=r"^[^\s:]+:\d{1,5}$",
                                       description="host:port of the gateway's Prometheus /metrics; None: off")
    metrics_token_env: str = Field(default="NANOFLEET_GATEWAY_METRICS_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class Controller(_Model):
    listen: str = Field(default="127.0.0.1:8080", pattern=r"^[^\s:]+:\d{1,5}$")
    # the controller's own MQTT 3.1.1 reader (controller/mqtt_reader.py) or paho, ~3x its cost a message
    ingest_reader: Literal["builtin", "paho"] = "builtin"


class Store(_Model):
    url: str | None = Field(
        default=None, pattern=r"^(sqlite:///\S+|postgres(ql)?://\S+)$",
        description="sqlite:///path, or postgresql://user@host:port/db (password from PGPASSWORD or ~/.pgpass, not "
                    "here) for several controllers and gateways sharing one fleet; None: SQLite in the data folder")


class Alerts(_Model):
    offline_after_s: float = Field(default=60, gt=0)
    thermal_at: ThermalName = "severe"
    min_free_ram_mb: int = Field(default=256, ge=0)
    queue_depth: int = Field(default=500, ge=0)
    policy_behind_s: float = Field(default=300, gt=0, description="a device behind its published policy this long")
    budget_pct: float = Field(default=80, gt=0, le=100, description="cloud tokens used today, % of the budget")
    rejections_window_s: float = Field(default=300, gt=0, description="an alert while payloads were rejected within")


class FleetConfig(_Model):
    fleet: FleetId
    broker: Broker = Broker()
    gateway: Gateway = Gateway()
    controller: Controller = Controller()
    defaults: Profile = Profile()
    groups: dict[str, Group] = {}
    devices: dict[DeviceId, DeviceEntry] = {}
    alerts: Alerts = Alerts()
    store: Store = Store()

    @model_validator(mode="after")
    def _check_references(self) -> FleetConfig:
        if DEFAULT_GROUP in self.groups:
            raise _FieldError(("groups", DEFAULT_GROUP), f"the name {DEFAULT_GROUP!r} is reserved: it is the group of "
                                                         "every device no group claims (they run `defaults`); "
                                                         "name this group otherwise")
        for name, dev in self.devices.items():
            if dev.group is not None and dev.group != DEFAULT_GROUP and dev.group not in self.groups:
                known = ", ".join(sorted(self.groups)) or "none defined"
                raise _FieldError(("devices", name, "group"), f"unknown group {dev.group!r} (groups: {known})")
        for kind, entries in (("groups", self.groups), ("devices", self.devices)):
            for name, entry in entries.items():
                _merged_profile(self.defaults, (entry,), (kind, name))
        return self

    def group_of(self, device_id: str) -> str:
        """The device's group — the one rule the dashboard, the store and policy compilation share: its own
        `devices:` entry's group, else the first group in file order whose `match` globs take its id, else
        `default` (it runs `defaults`)."""
        entry = self.devices.get(device_id)
        if entry is not None and entry.group is not None:
            return entry.group
        for name, group in self.groups.items():
            if any(fnmatch.fnmatchcase(device_id, pattern) for pattern in group.match):
                return name
        return DEFAULT_GROUP

    def group_profile(self, group: str) -> Profile:
        """What a device of `group` runs without overrides of its own (`default`: the defaults)."""
        if group == DEFAULT_GROUP:
            return self.defaults
        if group not in self.groups:
            raise ConfigError(f"groups: no group {group!r}")
        return _merged_profile(self.defaults, (self.groups[group],), ("groups", group))

    def profile_for(self, device_id: str) -> Profile:
        """The effective profile of a device: defaults ← group ← device (a device in no group gets the defaults)."""
        layers: list[BaseModel] = []
        group = self.group_of(device_id)
        if group != DEFAULT_GROUP:
            layers.append(self.groups[group])
        entry = self.devices.get(device_id)
        if entry is not None:
            layers.append(entry)
        return _merged_profile(self.defaults, layers, ("devices", device_id))


class _FieldError(ValueError):
    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc, self.msg = loc, msg


def _deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _merged_profile(defaults: Profile, layers: Any, where: tuple[str | int, ...]) -> Profile:
    merged = defaults.model_dump()
    for layer in layers:
        extra = dict(layer.model_extra or {})
        merged = _deep_merge(merged, extra)
    try:
        return Profile.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise _FieldError((*where, *err["loc"]), _describe(err)) from None


def _describe(err: Any) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field missing"
    return f"{msg} (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else msg


def _format_loc(loc: tuple[str | int, ...]) -> str:
    """`a.b.c`; a part that is not plain printable text (a NUL, a newline, an escape sequence in a YAML key) is
    shown escaped, never echoed raw to the operator's terminal."""
    return ".".join(str(p) if str(p).isprintable() else ascii(str(p)) for p in loc) or "(top level)"


def load_fleet(path: str | os.PathLike[str]) -> FleetConfig:
    """Read and validate a fleet.yaml; raise ConfigError `"<file>: <field.path>: <problem>"`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_fleet(text, str(path))


def parse_fleet(text: str, source: str = "fleet.yaml") -> FleetConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: invalid YAML: {where}{problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping with at least 'fleet', got {type(data).__name__}")
    try:
        return FleetConfig.model_validate(data)
    except ValidationError as exc:
        messages = []
        for err in exc.errors():
            inner = (err.get("ctx") or {}).get("error")
            if isinstance(inner, _FieldError):
                messages.append(f"{source}: {_format_loc(inner.loc)}: {inner.msg}")
            else:
                messages.append(f"{source}: {_format_loc(tuple(err['loc']))}: {_describe(err)}")
        raise ConfigError("\n".join(messages)) from None
