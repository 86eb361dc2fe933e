"""The gateway package's public surface (its `__init__` docstring): everything in `__all__` importable, and the
server (gRPC server, google-genai) loaded only when `Gateway` is asked for — token and usage work stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nanofleet.controller.gateway as gateway


def test_every_exported_name_resolves() -> None:
    for name in gateway.__all__:
        assert getattr(gateway, name) is not None, name
    from nanofleet.controller.gateway import server

    assert gateway.Gateway is server.Gateway and gateway.DB_NAME == server.DB_NAME == "gateway.db"


def test_an_unknown_name_is_an_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = gateway.no_such_thing
    assert not hasattr(gateway, "also_missing")


def test_issuing_a_token_does_not_load_the_server_or_google_genai(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from nanofleet.controller.gateway import issue_token, list_tokens\n"
        f"token = issue_token(Path({str(tmp_path / 'g.db')!r}), 'dev-1', 'fleet-a')\n"
        f"assert [t.device_id for t in list_tokens(Path({str(tmp_path / 'g.db')!r}))] == ['dev-1']\n"
        "heavy = sorted(m for m in sys.modules if m.startswith('google.genai') or m.endswith('gateway.server'))\n"
        "print('loaded:', heavy)\n"
        "from nanofleet.controller.gateway import Gateway\n"
        "print('after Gateway:', 'nanofleet.controller.gateway.server' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "loaded: []" in run.stdout
    assert "after Gateway: True" in run.stdout
