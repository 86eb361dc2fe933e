"""`--store` on `nanofleet controller` and `nanofleet up`: a URL given is passed on; a bad one is refused naming the
option, before anything starts (no traceback)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from nanofleet import cli
from nanofleet.up import store_args


def test_up_passes_the_store_on_and_never_prints_its_password(tmp_path: Path) -> None:
    assert store_args(None, tmp_path)[0] == []
    url = "postgresql://fleet:s3cret@127.0.0.1:5432/nanofleet"
    args, desc = store_args(url, tmp_path)
    assert args == ["--store", url]
    assert "s3cret" not in desc and "127.0.0.1:5432/nanofleet" in desc


def test_up_refuses_a_bad_store_url_before_starting_anything(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text("fleet: f1\n")
    state = tmp_path / "state"
    result = CliRunner().invoke(cli.main, ["up", "--config", str(tmp_path / "fleet.yaml"), "--state-dir", str(state),
                                           "--store", "mysql://x/y"])
    assert result.exit_code == 2 and "--store" in result.output and "postgresql://" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not state.exists()  # refused before the state folder (or any child) was made


def test_controller_refuses_a_bad_store_url(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text("fleet: f1\n")
    result = CliRunner().invoke(cli.main, ["controller", "--config", str(tmp_path / "fleet.yaml"),
                                           "--data-dir", str(tmp_path / "ctl"), "--store", "mysql://x/y"])
    assert result.exit_code == 2 and "--store" in result.output and "sqlite:///path" in result.output
    assert not (tmp_path / "ctl").exists()
