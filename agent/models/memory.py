"""How much RAM a model needs: weights (file size) + KV cache for every slot + compute buffers.

Used to refuse a load that would get the agent OOM-killed. The KV size comes from the GGUF header when it can be
read (layers × context × kv-width × 2 tensors × f16); otherwise a tenth of the file size stands in. Neither a header
that cannot be read nor a free-RAM reading that fails may turn the guard off unseen: `RamGuard` logs each distinct
problem once, counts every one, and is shown in /v1/status as `model.ram_guard` (`on`, `approximate`: the KV size
is a guess, `unavailable`: no free-RAM reading at all, so loads are not checked).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

COMPUTE_OVERHEAD = 48 * 2**20
log = logging.getLogger("nanofleet.agent.model")
# What a damaged or foreign GGUF header raises in gguf's reader (and int() of its fields)
_HEADER_ERRORS = (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError, UnicodeDecodeError)


@dataclass(slots=True)
class RamGuard:
    state: str = "on"             # on | approximate | unavailable
    why: str = ""
    errors: int = 0
    _logged: set[str] = field(default_factory=set)

    def problem(self, state: str, why: str) -> None:
        self.state, self.why = state, why
        self.errors += 1
        if why not in self._logged:  # once per distinct problem: a failing sensor must not flood the log
            self._logged.add(why)
            log.error("RAM guard %s: %s", state, why)

    def ok(self) -> None:
        self.state, self.why = "on", ""

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "why": self.why or None, "errors": self.errors}

    def free_bytes(self, reading: Callable[[], int]) -> int | None:
        """Free RAM from `reading`, else from psutil; None (guard unavailable, reported) when neither answers."""
        try:
            return int(reading())
        except (OSError, ValueError, psutil.Error) as exc:
            first = f"free RAM reading failed ({type(exc).__name__}: {exc})"
        try:
            free = int(psutil.virtual_memory().available)
        except (OSError, psutil.Error) as exc:
            self.problem("unavailable", f"{first}; psutil failed too ({exc}): loads are not checked")
            return None
        self.problem("approximate", f"{first}; using psutil's reading")
        return free


def _kv_bytes(path: Path, n_ctx_total: int, guard: RamGuard | None) -> int | None:
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        arch = _field(reader, "general.architecture")
        if isinstance(arch, bytes | bytearray | memoryview):
            arch = bytes(arch).decode()
        layers = int(_field(reader, f"{arch}.block_count"))
        emb = int(_field(reader, f"{arch}.embedding_length"))
        heads = int(_field(reader, f"{arch}.attention.head_count"))
        kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv") or heads)
    except _HEADER_ERRORS as exc:
        if guard is not None:
            guard.problem("approximate", f"{path.name}: GGUF header unreadable ({type(exc).__name__}: {exc}); "
                          "KV cache estimated as a tenth of the file")
        return None
    return 2 * layers * n_ctx_total * (emb * kv_heads // max(heads, 1)) * 2


def _field(reader: object, key: str) -> Any:
    f = reader.fields[key]  # type: ignore[attr-defined]
    value = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode()
    return value[0]


def estimate_bytes(path: Path, n_ctx: int, n_parallel: int, guard: RamGuard | None = None) -> int:
    size = path.stat().st_size
    kv = _kv_bytes(path, n_ctx * n_parallel, guard)
    return size + (kv if kv is not None else size // 10) + COMPUTE_OVERHEAD
