from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ThermalLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THERMAL_LEVEL_NONE: _ClassVar[ThermalLevel]
    THERMAL_LEVEL_LIGHT: _ClassVar[ThermalLevel]
    THERMAL_LEVEL_MODERATE: _ClassVar[ThermalLevel]
    THERMAL_LEVEL_SEVERE: _ClassVar[ThermalLevel]
    THERMAL_LEVEL_CRITICAL: _ClassVar[ThermalLevel]
    THERMAL_LEVEL_EMERGENCY: _ClassVar[ThermalLevel]
    THERMAL_LEVEL_SHUTDOWN: _ClassVar[ThermalLevel]

class ModelAvailability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_AVAILABILITY_UNSPECIFIED: _ClassVar[ModelAvailability]
    MODEL_AVAILABILITY_UNAVAILABLE: _ClassVar[ModelAvailability]
    MODEL_AVAILABILITY_DOWNLOADABLE: _ClassVar[ModelAvailability]
    MODEL_AVAILABILITY_DOWNLOADING: _ClassVar[ModelAvailability]
    MODEL_AVAILABILITY_AVAILABLE: _ClassVar[ModelAvailability]
THERMAL_LEVEL_NONE: ThermalLevel
THERMAL_LEVEL_LIGHT: ThermalLevel
THERMAL_LEVEL_MODERATE: ThermalLevel
THERMAL_LEVEL_SEVERE: ThermalLevel
THERMAL_LEVEL_CRITICAL: ThermalLevel
THERMAL_LEVEL_EMERGENCY: ThermalLevel
THERMAL_LEVEL_SHUTDOWN: ThermalLevel
MODEL_AVAILABILITY_UNSPECIFIED: ModelAvailability
MODEL_AVAILABILITY_UNAVAILABLE: ModelAvailability
MODEL_AVAILABILITY_DOWNLOADABLE: ModelAvailability
MODEL_AVAILABILITY_DOWNLOADING: ModelAvailability
MODEL_AVAILABILITY_AVAILABLE: ModelAvailability

class ModelState(_message.Message):
    __slots__ = ("name", "sha256", "availability", "download_progress", "loaded", "reason", "tokens_per_s", "update_state", "update_sha256", "update_reason", "previous_sha256", "requests", "errors", "p95_latency_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    UPDATE_STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    UPDATE_REASON_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SHA256_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    P95_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    availability: ModelAvailability
    download_progress: float
    loaded: bool
    reason: str
    tokens_per_s: float
    update_state: str
    update_sha256: str
    update_reason: str
    previous_sha256: str
    requests: int
    errors: int
    p95_latency_ms: float
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., availability: _Optional[_Union[ModelAvailability, str]] = ..., download_progress: _Optional[float] = ..., loaded: _Optional[bool] = ..., reason: _Optional[str] = ..., tokens_per_s: _Optional[float] = ..., update_state: _Optional[str] = ..., update_sha256: _Optional[str] = ..., update_reason: _Optional[str] = ..., previous_sha256: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., p95_latency_ms: _Optional[float] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("platform", "machine", "cpu_count", "ram_total_mb", "board")
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    RAM_TOTAL_MB_FIELD_NUMBER: _ClassVar[int]
    BOARD_FIELD_NUMBER: _ClassVar[int]
    platform: str
    machine: str
    cpu_count: int
    ram_total_mb: int
    board: str
    def __init__(self, platform: _Optional[str] = ..., machine: _Optional[str] = ..., cpu_count: _Optional[int] = ..., ram_total_mb: _Optional[int] = ..., board: _Optional[str] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("fleet", "device_id", "online", "bd_seq", "ts_ms", "agent_version", "model", "capabilities", "hardware", "policy_version", "reason", "telemetry_interval_s")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    BD_SEQ_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    device_id: str
    online: bool
    bd_seq: int
    ts_ms: int
    agent_version: str
    model: ModelState
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    hardware: Hardware
    policy_version: int
    reason: str
    telemetry_interval_s: int
    def __init__(self, fleet: _Optional[str] = ..., device_id: _Optional[str] = ..., online: _Optional[bool] = ..., bd_seq: _Optional[int] = ..., ts_ms: _Optional[int] = ..., agent_version: _Optional[str] = ..., model: _Optional[_Union[ModelState, _Mapping]] = ..., capabilities: _Optional[_Iterable[str]] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., policy_version: _Optional[int] = ..., reason: _Optional[str] = ..., telemetry_interval_s: _Optional[int] = ...) -> None: ...

class Battery(_message.Message):
    __slots__ = ("present", "percent", "charging")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    CHARGING_FIELD_NUMBER: _ClassVar[int]
    present: bool
    percent: float
    charging: bool
    def __init__(self, present: _Optional[bool] = ..., percent: _Optional[float] = ..., charging: _Optional[bool] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("device_id", "bd_seq", "seq", "ts_ms", "cpu_percent", "load1", "ram_total_mb", "ram_available_mb", "swap_used_mb", "disk_free_mb", "temperatures_c", "temp_max_c", "thermal_level", "throttle_ratio", "throttled", "pi_throttled_flags", "battery", "model", "route_counts", "queue_depth", "policy_version", "gateway_reachable", "metered_network", "replayed", "slots_waiting", "queue_oldest_age_s", "queue_counters")
    class TemperaturesCEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RouteCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class QueueCountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BD_SEQ_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    RAM_TOTAL_MB_FIELD_NUMBER: _ClassVar[int]
    RAM_AVAILABLE_MB_FIELD_NUMBER: _ClassVar[int]
    SWAP_USED_MB_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_MB_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_C_FIELD_NUMBER: _ClassVar[int]
    TEMP_MAX_C_FIELD_NUMBER: _ClassVar[int]
    THERMAL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_RATIO_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_FIELD_NUMBER: _ClassVar[int]
    PI_THROTTLED_FLAGS_FIELD_NUMBER: _ClassVar[int]
    BATTERY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    METERED_NETWORK_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    QUEUE_OLDEST_AGE_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_COUNTERS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    bd_seq: int
    seq: int
    ts_ms: int
    cpu_percent: float
    load1: float
    ram_total_mb: int
    ram_available_mb: int
    swap_used_mb: int
    disk_free_mb: int
    temperatures_c: _containers.ScalarMap[str, float]
    temp_max_c: float
    thermal_level: ThermalLevel
    throttle_ratio: float
    throttled: bool
    pi_throttled_flags: int
    battery: Battery
    model: ModelState
    route_counts: _containers.ScalarMap[str, int]
    queue_depth: int
    policy_version: int
    gateway_reachable: bool
    metered_network: bool
    replayed: bool
    slots_waiting: int
    queue_oldest_age_s: float
    queue_counters: _containers.ScalarMap[str, int]
    def __init__(self, device_id: _Optional[str] = ..., bd_seq: _Optional[int] = ..., seq: _Optional[int] = ..., ts_ms: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., load1: _Optional[float] = ..., ram_total_mb: _Optional[int] = ..., ram_available_mb: _Optional[int] = ..., swap_used_mb: _Optional[int] = ..., disk_free_mb: _Optional[int] = ..., temperatures_c: _Optional[_Mapping[str, float]] = ..., temp_max_c: _Optional[float] = ..., thermal_level: _Optional[_Union[ThermalLevel, str]] = ..., throttle_ratio: _Optional[float] = ..., throttled: _Optional[bool] = ..., pi_throttled_flags: _Optional[int] = ..., battery: _Optional[_Union[Battery, _Mapping]] = ..., model: _Optional[_Union[ModelState, _Mapping]] = ..., route_counts: _Optional[_Mapping[str, int]] = ..., queue_depth: _Optional[int] = ..., policy_version: _Optional[int] = ..., gateway_reachable: _Optional[bool] = ..., metered_network: _Optional[bool] = ..., replayed: _Optional[bool] = ..., slots_waiting: _Optional[int] = ..., queue_oldest_age_s: _Optional[float] = ..., queue_counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class AppPolicy(_message.Message):
    __slots__ = ("privacy", "mode")
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    privacy: str
    mode: str
    def __init__(self, privacy: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class CloudBudget(_message.Message):
    __slots__ = ("tokens_per_day",)
    TOKENS_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    tokens_per_day: int
    def __init__(self, tokens_per_day: _Optional[int] = ...) -> None: ...

class RoutingPolicy(_message.Message):
    __slots__ = ("fleet", "device_id", "group", "version", "issued_at_ms", "prefer", "cloud_allowed", "thermal_limit", "min_free_ram_mb", "battery_floor_pct", "metered_network", "max_local_prompt_tokens", "cloud_budget", "apps", "telemetry_interval_s", "model_source", "model_sha256", "queue_max_items", "queue_ttl_s", "queue_max_bytes")
    class AppsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AppPolicy
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AppPolicy, _Mapping]] = ...) -> None: ...
    FLEET_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    PREFER_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    THERMAL_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MIN_FREE_RAM_MB_FIELD_NUMBER: _ClassVar[int]
    BATTERY_FLOOR_PCT_FIELD_NUMBER: _ClassVar[int]
    METERED_NETWORK_FIELD_NUMBER: _ClassVar[int]
    MAX_LOCAL_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_BUDGET_FIELD_NUMBER: _ClassVar[int]
    APPS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    device_id: str
    group: str
    version: int
    issued_at_ms: int
    prefer: str
    cloud_allowed: bool
    thermal_limit: ThermalLevel
    min_free_ram_mb: int
    battery_floor_pct: int
    metered_network: str
    max_local_prompt_tokens: int
    cloud_budget: CloudBudget
    apps: _containers.MessageMap[str, AppPolicy]
    telemetry_interval_s: int
    model_source: str
    model_sha256: str
    queue_max_items: int
    queue_ttl_s: int
    queue_max_bytes: int
    def __init__(self, fleet: _Optional[str] = ..., device_id: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[int] = ..., issued_at_ms: _Optional[int] = ..., prefer: _Optional[str] = ..., cloud_allowed: _Optional[bool] = ..., thermal_limit: _Optional[_Union[ThermalLevel, str]] = ..., min_free_ram_mb: _Optional[int] = ..., battery_floor_pct: _Optional[int] = ..., metered_network: _Optional[str] = ..., max_local_prompt_tokens: _Optional[int] = ..., cloud_budget: _Optional[_Union[CloudBudget, _Mapping]] = ..., apps: _Optional[_Mapping[str, AppPolicy]] = ..., telemetry_interval_s: _Optional[int] = ..., model_source: _Optional[str] = ..., model_sha256: _Optional[str] = ..., queue_max_items: _Optional[int] = ..., queue_ttl_s: _Optional[int] = ..., queue_max_bytes: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("id", "kind", "args", "issued_at_ms", "timeout_s")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    args: _containers.ScalarMap[str, str]
    issued_at_ms: int
    timeout_s: int
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., args: _Optional[_Mapping[str, str]] = ..., issued_at_ms: _Optional[int] = ..., timeout_s: _Optional[int] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("id", "device_id", "status", "message", "data", "ts_ms")
    class DataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    device_id: str
    status: str
    message: str
    data: _containers.ScalarMap[str, str]
    ts_ms: int
    def __init__(self, id: _Optional[str] = ..., device_id: _Optional[str] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., data: _Optional[_Mapping[str, str]] = ..., ts_ms: _Optional[int] = ...) -> None: ...
