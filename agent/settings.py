"""The agent's own settings: who it is, where it connects, where it keeps its files.

Read from an `agent.yaml` (what `nanofleet enroll` writes for a device) with `NANOFLEET_*` environment overrides.
Routing policy is not here: the controller pushes it over MQTT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nanofleet.agent.runtime.grpc_target import channel_target
from nanofleet.config import ConfigError, ModelSpec
from nanofleet.tcp import is_loopback


def default_runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/nanofleet-{os.getuid()}"
    return Path(base) / "nanofleet"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "nanofleet"


class LocalBridge(BaseModel):
    """A local `Inference` gRPC server that is the local model (an Android companion exposing AICore's Gemini Nano,
    llama.cpp on a Jetson). Loopback or a unix socket only: the local route carries `sensitive` requests, which
    never leave the device."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(description="unix:/path or a loopback host:port")
    ca: Path | None = Field(None, description="CA bundle for the bridge's TLS; None: plaintext")
    token: str | None = Field(None, description="sent as authorization: Bearer …")
    timeout: float = Field(30, gt=0, le=3600, description="deadline of every call, seconds")
    cooldown: float = Field(5, gt=0, le=3600, description="seconds the local route rests after the bridge fails")
    model: str | None = Field(None, min_length=1, max_length=200,
                              description="model name sent to and shown for the bridge; None: the bridge's own")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        """`local_bridge: unix:/run/bridge.sock` (and the env var) give the address alone."""
        return {"address": data} if isinstance(data, str) else data

    @field_validator("address")
    @classmethod
    def _local_only(cls, value: str) -> str:
        if value.startswith("unix:"):
            if not value[5:].lstrip("/"):
                raise ValueError("expected unix:/path/to/bridge.sock")
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected unix:/path or host:port, got {value!r}")
        if not is_loopback(host):
            raise ValueError(f"{host!r} is not loopback: the local bridge must be on this device (unix:/path, "
                             "127.0.0.1:port or [::1]:port), since sensitive requests go to it")
        return value


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fleet: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    data_dir: Path = Field(default_factory=default_data_dir)  # model cache, queue.db, telemetry buffer (0700)
    socket_path: Path = Field(default_factory=lambda: default_runtime_dir() / "agent.sock")
    tcp_listen: str | None = Field(None, description="opt-in loopback TCP listener, e.g. 127.0.0.1:8765")
    broker_url: str | None = Field("mqtt://127.0.0.1:1883", description="None: run without a controller")
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    gateway_address: str | None = Field(None, description="host:port of the gateway; None: no cloud route")
    gateway_addresses: list[str] | None = Field(None, min_length=1, max_length=64,
                                                description="several gateways (IP:port each): round robin, "
                                                "health-checked; exclusive with gateway_address")
    gateway_token: str | None = None
    gateway_ca: Path | None = Field(None, description="CA bundle for the gateway's TLS; None: plaintext (loopback)")
    gateway_tls_name: str | None = Field(None, min_length=1, max_length=253,
                                         description="the name the gateways' TLS certificates carry; needed with "
                                         "gateway_ca and several gateway_addresses")
    model: ModelSpec = ModelSpec()
    local_bridge: LocalBridge | None = Field(None, description="None: llama.cpp in-process serves the local route")
    sysfs_root: Path = Path("/sys")
    telemetry_interval_s: float = Field(10, gt=0, le=86_400)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    preload: bool = Field(False, description="load the model at start instead of on the first request")
    http_fast_path: bool = Field(True, description="serve non-streaming chat completions on the fast HTTP protocol "
                                 "(agent/api/fastpath.py); false: uvicorn's stock protocol")
    queue_max_items: int = Field(10_000, ge=1, le=10_000_000)   # until a policy sets queue.max_items
    queue_ttl_s: float = Field(86_400, gt=0)                    # until a policy sets queue.ttl
    queue_max_bytes: int = Field(64 << 20, ge=1024)
    queue_keep_s: float = Field(86_400, ge=0)
    queue_max_file_bytes: int | None = Field(None, ge=65_536)

    @field_validator("gateway_addresses", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """`NANOFLEET_GATEWAY_ADDRESSES=10.0.0.5:50051,10.0.0.6:50051` (env values are strings)."""
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _gateways(self) -> AgentSettings:
        """One gateway field, addresses the gRPC channel can take, and a TLS name when several share a CA."""
        if self.gateway_address is not None and self.gateway_addresses is not None:
            raise ValueError("gateway_address and gateway_addresses are both set: give one (gateway_addresses "
                             "lists every gateway, gateway_address is the one-gateway form)")
        if self.gateway_addresses is not None:
            try:
                channel_target(self.gateway_addresses)
            except ValueError as exc:
                raise ValueError(f"gateway_addresses: {exc}") from None
            if self.gateway_ca is not None and len(self.gateway_addresses) > 1 and not self.gateway_tls_name:
                raise ValueError("gateway_tls_name: required with gateway_ca and several gateway_addresses (the "
                                 "name the gateways' certificates carry, since an address list is no host name)")
        elif self.gateway_address is not None:
            try:
                channel_target([self.gateway_address])
            except ValueError as exc:
                raise ValueError(f"gateway_address: {exc}") from None
        return self

    @property
    def gateways(self) -> list[str]:
        """Every gateway address ([] = no cloud route), whichever of the two fields gave them."""
        if self.gateway_addresses is not None:
            return list(self.gateway_addresses)
        return [self.gateway_address] if self.gateway_address else []

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "models"


def load_agent_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> AgentSettings:
    """agent.yaml (optional) ← NANOFLEET_<FIELD> env vars ← explicit overrides; ConfigError names the field."""
    data: dict[str, Any] = {}
    source = str(path) if path else "agent settings"
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{source}: cannot read: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping")
        data.update(loaded)
    for name in AgentSettings.model_fields:
        env = os.environ.get(f"NANOFLEET_{name.upper()}")
        if env is not None and name != "model":
            data[name] = env
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        # a check across fields (the gateways) has no location: its message names the fields itself
        raise ConfigError(f"{source}: {loc}: {err['msg']}" if loc else f"{source}: {err['msg']}") from None
