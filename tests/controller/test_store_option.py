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


def test_a_store_server_that_is_down_is_one_clear_error_for_the_controller_and_the_gateway(tmp_path: Path) -> None:
    """PostgreSQL not there when a controller or a gateway starts: exit 1 with one line naming the store (its
    password left out), no traceback (it was psycopg's traceback)."""
    import subprocess
    import sys

    from nanofleet.tcp import free_port

    (tmp_path / "fleet.yaml").write_text("fleet: f1\n")
    url = f"postgresql://fleet:s3cret@127.0.0.1:{free_port()}/nanofleet"
    for args in (["controller", "--data-dir", str(tmp_path / "c")], ["gateway", "serve", "--data-dir",
                                                                     str(tmp_path / "g")]):
        proc = subprocess.run([sys.executable, "-m", "nanofleet", *args, "--config", str(tmp_path / "fleet.yaml"),
                               "--store", url], capture_output=True, text=True, timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert "cannot open" in out and "Traceback" not in out and "s3cret" not in out, out
