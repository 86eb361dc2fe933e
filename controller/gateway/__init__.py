"""The gateway: gRPC `Inference` for devices — auth, policy and budget enforcement, Gemini Flash upstream.

Public surface (other parts call these):
- `issue_token(store, device_id, fleet, group=None) -> str`, `revoke_token`, `list_tokens` (device tokens); `store`
  is a SQLite file's path, a store URL (`postgresql://…`, `sqlite:///…`) or a nanofleet.store_url.StoreTarget
- `UsageStore(store).summary(day=None) -> list[UsageRow]` (usage accounting, read side)
- `Gateway(config, data_dir, listen=..., tls_cert=..., tls_key=..., store=...)` (async context manager; `store`,
  `db_path`, `address`)
- `GatewayError` and its tree (`errors`)

`Gateway` is imported lazily so reading usage or issuing a token does not load grpc servers or google-genai.
"""

from __future__ import annotations

from typing import Any

from .auth import issue_token, list_tokens, revoke_token
from .errors import GatewayError
from .usage import UsageRow, UsageStore

__all__ = ["DB_NAME", "Gateway", "GatewayError", "UsageRow", "UsageStore", "issue_token", "list_tokens",
           "revoke_token"]


def __getattr__(name: str) -> Any:
    if name in ("Gateway", "DB_NAME"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
