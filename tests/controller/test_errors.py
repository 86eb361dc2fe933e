"""The controller's one exception root: every domain error sits under ControllerError and stays importable from
the module that raises it; the tree in errors.py's docstring names every class."""

from __future__ import annotations

import importlib

import pytest

from nanofleet.controller import errors


@pytest.mark.parametrize(("module", "name"), [
    ("store", "StoreError"), ("store", "StoreClosed"), ("auth", "AuthError"), ("auth", "TokenFileError"),
    ("commands", "CommandError"), ("commands", "UnknownCommand"), ("decode", "PayloadError"),
    ("web.security", "WebError"), ("web.security", "Unauthorized"),
])
def test_each_error_is_under_the_root_and_importable_where_it_is_raised(module: str, name: str) -> None:
    cls = getattr(importlib.import_module(f"nanofleet.controller.{module}"), name)
    assert issubclass(cls, errors.ControllerError)
    assert name in (errors.__doc__ or "")


def test_payload_error_is_still_a_value_error_with_its_reason() -> None:
    exc = errors.PayloadError("invalid json")
    assert isinstance(exc, ValueError) and exc.reason == "invalid json"
