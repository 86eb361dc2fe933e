"""Example files and command output in the docs are the real thing: each block is compared with what the code
writes or prints (secrets, paths and pids of the run put back to the doc's spelling)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from click.testing import CliRunner

from nanofleet.cli import main
from nanofleet.controller.store import Store
from nanofleet.protos import fleet_pb2

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def doc_block(doc: str, after: str) -> str:
    """The first fenced block that starts after the text `after` in docs/`doc`."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    at = text.index(after) + len(after)
    match = re.compile(r"^```\w*\n(.*?)^```$", re.S | re.M).search(text, at)
    assert match, f"docs/{doc}: no block after {after!r}"
    return match.group(1)


def test_the_agent_yaml_example_is_the_file_enroll_writes(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["enroll", "pi-lab-01", "--config", str(ROOT / "fleet.yaml"), "--init",
                                  "--state-dir", str(tmp_path / "state"), "--broker-url", "mqtt://10.0.0.5:1883",
                                  "--gateway", "10.0.0.5:50051"])
    assert r.exit_code == 0, r.output
    written = yaml.safe_load((tmp_path / "state" / "devices" / "pi-lab-01" / "agent.yaml").read_text())
    written.update(mqtt_password="…", gateway_token="…")
    shown = yaml.safe_load(doc_block("agent.md", "What `nanofleet enroll pi-lab-01"))
    assert shown == written and list(shown) == list(written)  # same settings, values and order


def test_the_policy_apply_output_is_what_it_prints(broker, tmp_path: Path) -> None:
    data = tmp_path / "ctl"
    data.mkdir()
    with Store(data / "controller.db") as store:
        store.write_status("docs", fleet_pb2.DeviceStatus(fleet="docs", device_id="pi-lab-01", online=True,
                                                          bd_seq=1), 1)
    fleet = tmp_path / "fleet.yaml"
    base = f"fleet: docs\nbroker: {{url: '{broker.url}'}}\ndevices: {{pi-lab-01: {{}}}}\n"
    fleet.write_text(base)
    runner = CliRunner()
    assert runner.invoke(main, ["policy", "apply", str(fleet), "--data-dir", str(data)]).exit_code == 0
    fleet.write_text(base + "defaults: {routing: {battery_floor_pct: 30, thermal_limit: moderate}}\n")
    r = runner.invoke(main, ["policy", "apply", str(fleet), "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    assert r.output == doc_block("operations.md", "--mqtt-username controller\n```\n")


def test_every_agent_yaml_example_loads() -> None:
    from nanofleet.agent.settings import AgentSettings

    text = (DOCS / "agent.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```$", text, re.S | re.M)]
    examples = [b for b in blocks if isinstance(b, dict) and "device_id" in b]
    assert len(examples) >= 3
    for example in examples:
        assert AgentSettings.model_validate(example).device_id == example["device_id"]
