"""Several gateways in agent.yaml: the address rules (pure) and the errors that name the fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanofleet.agent.runtime.grpc_target import SERVICE_CONFIG, channel_target
from nanofleet.agent.settings import load_agent_settings
from nanofleet.config import ConfigError


def test_targets() -> None:
    assert channel_target(["gw.example.net:50051"]) == "gw.example.net:50051"  # one name: its A records
    assert channel_target(["10.0.0.5:50051", "10.0.0.6:50052"]) == "ipv4:10.0.0.5:50051,10.0.0.6:50052"
    assert channel_target(["[fd00::5]:50051", "[fd00::6]:50051"]) == "ipv6:[fd00::5]:50051,[fd00::6]:50051"
    config = json.loads(SERVICE_CONFIG)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "nanofleet.v1.Inference"}


@pytest.mark.parametrize(("addresses", "words"), [
    ([], "at least one"),
    ([" "], "empty"),
    (["gw1.example:50051", "gw2.example:50051"], "must be IP addresses"),
    (["10.0.0.5:50051", "[fd00::6]:50051"], "cannot be mixed"),
    (["10.0.0.5:50051", "10.0.0.5:50051"], "listed twice"),
    (["10.0.0.5", "10.0.0.6:1"], "expected IP:port"),
    (["10.0.0.5:0", "10.0.0.6:1"], "expected IP:port"),
])
def test_bad_lists_say_why(addresses: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        channel_target(addresses)


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: d1\n" + text)
    return path


def test_settings_accept_a_list_or_the_one_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_agent_settings(_yaml(tmp_path, "gateway_addresses: [10.0.0.5:50051, 10.0.0.6:50051]\n"))
    assert s.gateways == ["10.0.0.5:50051", "10.0.0.6:50051"] and s.gateway_address is None
    assert load_agent_settings(_yaml(tmp_path, "gateway_address: gw:50051\n")).gateways == ["gw:50051"]
    assert load_agent_settings(_yaml(tmp_path, "")).gateways == []
    monkeypatch.setenv("NANOFLEET_GATEWAY_ADDRESSES", "10.0.0.5:1, 10.0.0.6:2")
    assert load_agent_settings(_yaml(tmp_path, "")).gateways == ["10.0.0.5:1", "10.0.0.6:2"]


@pytest.mark.parametrize(("text", "words"), [
    ("gateway_address: 10.0.0.5:1\ngateway_addresses: [10.0.0.6:1]\n",
     "gateway_address and gateway_addresses are both set"),
    ("gateway_addresses: [gw1:1, gw2:1]\n", "gateway_addresses: 'gw1:1': several gateways must be IP addresses"),
    ("gateway_addresses: []\n", "gateway_addresses: List should have at least 1 item"),
    ("gateway_address: ''\n", "gateway_address: empty address"),
    ("gateway_addresses: [10.0.0.5:1, 10.0.0.6:1]\ngateway_ca: /etc/ca.pem\n", "gateway_tls_name: required"),
])
def test_settings_errors_name_the_fields(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        load_agent_settings(_yaml(tmp_path, text))
    assert str(caught.value).startswith(f"{tmp_path / 'agent.yaml'}: ")


def test_tls_list_with_its_name(tmp_path: Path) -> None:
    s = load_agent_settings(_yaml(tmp_path, "gateway_addresses: [10.0.0.5:1, 10.0.0.6:1]\ngateway_ca: /etc/ca.pem\n"
                                             "gateway_tls_name: gw.example.net\n"))
    assert s.gateway_tls_name == "gw.example.net"


def test_enroll_writes_several_gateways_and_refuses_host_names(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from nanofleet.cli import main

    root = Path(__file__).resolve().parents[2]
    args = ["enroll", "pi-lab-01", "--config", str(root / "fleet.yaml"), "--state-dir", str(tmp_path / "s"), "--init"]
    result = CliRunner().invoke(main, [*args, "--gateway", "10.0.0.5:50051", "--gateway", "10.0.0.6:50051"])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / "s" / "devices" / "pi-lab-01" / "agent.yaml").read_text())
    assert written["gateway_addresses"] == ["10.0.0.5:50051", "10.0.0.6:50051"] and "gateway_address" not in written
    result = CliRunner().invoke(main, [*args, "--gateway", "gw1.example:50051", "--gateway", "gw2.example:50051"])
    assert result.exit_code == 2 and "--gateway" in result.output and "must be IP addresses" in result.output
    result = CliRunner().invoke(main, [*args, "--gateway", "gw.example:50051"])  # one name: the one-gateway field
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / "s" / "devices" / "pi-lab-01" / "agent.yaml").read_text())
    assert written["gateway_address"] == "gw.example:50051" and "gateway_addresses" not in written
