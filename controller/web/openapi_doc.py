"""The controller's OpenAPI errors, as the app answers them: one body (`ErrorOut`) for every error. FastAPI documents
its own 422 body (`detail` as a list); the app answers 422 with `ErrorOut` (`detail` a sentence naming each field),
and 400 when a body cannot be parsed at all. tests/contract/test_api_conformance.py holds the two together."""

from __future__ import annotations

from typing import Any

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}


def document_errors(schema: dict[str, Any]) -> None:
    """Point every 422 at ErrorOut, add the 400 of a body that cannot be parsed and the 500 of a bug, drop FastAPI's
    own error models."""
    for item in schema.get("paths", {}).values():
        for op in item.values():
            responses: dict[str, Any] = op.get("responses", {})
            if "422" in responses:
                responses["422"] = {"description": "invalid_request: a parameter or body field is wrong; the detail "
                                                   "names each (e.g. query.since_ms)", "content": _ERROR}
            responses.setdefault("500", {"description": "internal_error: a bug, logged with its traceback under the "
                                                        "error id the detail names", "content": _ERROR})
            if "requestBody" in op:
                responses.setdefault("400", {"description": "invalid_request: the body cannot be parsed",
                                             "content": _ERROR})
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
