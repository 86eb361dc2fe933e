"""The controller's dashboard and REST API: `create_app(store, config, operator_token_hash=...)`."""

from .app import create_app

__all__ = ["create_app"]
