"""The docs stay honest: every setting, endpoint, error code and routing reason in the code is documented, every
documented setting exists with the default and choices the code has, and the examples run (STYLE.md #8)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from nanofleet.agent.router import MODES, AppRule, Connectivity, DeviceState, Policy, RouteRequest, decide
from nanofleet.agent.settings import AgentSettings
from nanofleet.config import FleetConfig, parse_fleet

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)$")


# -- walking the settings models -------------------------------------------------------------------------------------

def _args(annotation: Any) -> tuple[Any, ...]:
    """The members of a union / Optional / Annotated, flattened."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _args(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return tuple(a for arg in typing.get_args(annotation) for a in _args(arg))
    return (annotation,)


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def model_paths(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo | None]]:
    """Every field path (`gateway.upstream.kind`, `groups.<name>`, ...), with its FieldInfo (None for map keys)."""
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        yield path, field
        for member in _args(field.annotation):
            if _is_model(member):
                yield from model_paths(member, path)
            elif typing.get_origin(member) is dict:
                value = typing.get_args(member)[1]
                for v in _args(value):
                    if _is_model(v):
                        yield f"{path}.<name>", None
                        yield from model_paths(v, f"{path}.<name>")


def literal_choices(field: FieldInfo) -> list[Any]:
    return [v for member in _args(field.annotation) if typing.get_origin(member) is Literal
            for v in typing.get_args(member)]


def doc_rows(text: str) -> dict[str, str]:
    """`| `path` | rest |` table rows: path -> the rest of the row."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if m := _ROW.match(line):
            rows.setdefault(m.group(1), m.group(2))
    return rows


def _default_matches(field: FieldInfo, cell: str) -> bool:
    token = cell.replace("`", "").strip().split(" ")[0]
    if field.is_required():
        return token == "required"
    default = field.default
    if default is None:
        return token == "null"
    if isinstance(default, bool):
        return token == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(token) == float(default)
        except ValueError:
            return False
    if isinstance(default, str):
        return token == default
    return True  # mappings / nested models: described in words


def check_model_doc(model: type[BaseModel], rows: dict[str, str], top: set[str] | None = None) -> list[str]:
    """Problems: undocumented paths, documented paths that do not exist, wrong defaults, missing choices."""
    paths = dict(model_paths(model))
    problems = [f"{p}: not documented" for p in paths if p not in rows]
    top = top if top is not None else set(model.model_fields)
    for path in rows:
        if path.split(".")[0] in top and path not in paths:
            problems.append(f"{path}: documented but not a field")
    for path, field in paths.items():
        if field is None or path not in rows:
            continue
        cells = [c.strip() for c in rows[path].split("|")]
        if field.default_factory is None and not _default_matches(field, cells[1]):
            problems.append(f"{path}: default cell {cells[1]!r} does not match {field.default!r}")
        for choice in literal_choices(field):
            if f"`{choice}`" not in rows[path]:
                problems.append(f"{path}: choice {choice!r} not documented")
    return problems


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


# -- fleet.yaml ------------------------------------------------------------------------------------------------------

def test_every_fleet_yaml_field_is_documented_with_its_default_and_choices() -> None:
    rows = doc_rows((DOCS / "fleet-yaml.md").read_text(encoding="utf-8"))
    problems = check_model_doc(FleetConfig, rows)
    assert not problems, "docs/fleet-yaml.md:\n" + "\n".join(problems)


def test_the_fleet_yaml_doc_example_loads_and_merges_as_described() -> None:
    text = (DOCS / "fleet-yaml.md").read_text(encoding="utf-8")
    example = re.search(r"## Example\n\n```yaml\n(.*?)```", text, re.S)
    assert example, "docs/fleet-yaml.md has no ## Example yaml block"
    cfg = parse_fleet(example.group(1).replace("<64 hex digits of that file>", "0" * 64), "docs example")
    lab = cfg.profile_for("pi-lab-01")
    assert (lab.routing.prefer, lab.routing.thermal_limit, lab.routing.min_free_ram_mb) == ("cloud", "moderate", 256)
    assert lab.routing.cloud_budget == cfg.defaults.routing.cloud_budget
    notes = lab.routing.apps["com.example.notes"]
    assert (notes.privacy, notes.tokens_per_day) == ("sensitive", 0)
    assert cfg.profile_for("tab-007").routing.cloud == "denied"


# -- agent.yaml ------------------------------------------------------------------------------------------------------

def test_every_agent_setting_and_its_env_override_is_documented() -> None:
    text = (DOCS / "agent.md").read_text(encoding="utf-8")
    part = section(text, "agent.yaml")
    problems = check_model_doc(AgentSettings, doc_rows(part))
    assert not problems, "docs/agent.md, agent.yaml:\n" + "\n".join(problems)
    missing = [f"NANOFLEET_{name.upper()}" for name in AgentSettings.model_fields
               if name != "model" and f"`NANOFLEET_{name.upper()}`" not in part]
    assert missing == []


def test_env_overrides_work_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanofleet.agent.settings import load_agent_settings

    f = tmp_path / "agent.yaml"
    f.write_text("device_id: from-file\nbroker_url: null\nmax_body_bytes: 4096\n")
    monkeypatch.setenv("NANOFLEET_MAX_BODY_BYTES", "8192")
    monkeypatch.setenv("NANOFLEET_DEVICE_ID", "from-env")
    s = load_agent_settings(f, device_id="from-cli")
    assert (s.device_id, s.max_body_bytes, s.broker_url) == ("from-cli", 8192, None)


# -- socket API ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from nanofleet.agent.api import Dispatcher, create_app
    from nanofleet.agent.runtime.lifecycle import ModelManager
    from nanofleet.config import ModelSpec

    tmp = tmp_path_factory.mktemp("openapi")
    app = create_app(Dispatcher(ModelManager(ModelSpec(), tmp / "models", tmp / "private", warmup=False)))
    return app.api.openapi()


def test_every_socket_endpoint_is_documented(openapi: dict[str, Any]) -> None:
    text = (DOCS / "socket-api.md").read_text(encoding="utf-8")
    endpoints = [f"{method.upper()} {path}" for path, ops in openapi["paths"].items() for method in ops]
    assert len(endpoints) >= 8
    assert [e for e in endpoints if f"`{e}`" not in text] == []
    documented = set(re.findall(r"`((?:GET|POST|PUT|PATCH|DELETE) /v1/[^`]*)`", section(text, "Endpoints")))
    assert documented - set(endpoints) == set(), "documented endpoints the agent does not serve"


def _source(*globs: str) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for g in globs for p in sorted((ROOT / "agent").glob(g)))


def test_every_error_code_of_the_socket_api_is_documented() -> None:
    text = (DOCS / "socket-api.md").read_text(encoding="utf-8")
    src = _source("api/*.py", "runtime/base.py")
    codes = set(re.findall(r'code="([a-z_]+)"', src)) | set(re.findall(r'^\s+code = "([a-z_]+)"', src, re.M))
    assert {"invalid_json", "busy", "session_not_found", "queue_unavailable"} <= codes  # the scan itself works
    part = section(text, "Errors")
    # a code built at run time ("invalid_" + pydantic's error type) is documented as `invalid_<...>`
    assert sorted(c for c in codes if f"`{c}`" not in part and not (c.endswith("_") and f"`{c}<" in part)) == []


def _all_reasons() -> set[str]:
    """Every reason decide() can give, found by running it over a grid of its inputs (it is pure and fast)."""
    policies = [Policy(), Policy(cloud_allowed=False), Policy(prefer="cloud"), Policy(thermal_limit=2),
                Policy(cloud_tokens_per_day=10), Policy(apps={"a": AppRule("sensitive", "")})]
    devices = [DeviceState(thermal_level=t, ram_available_mb=ram, battery_pct=bat, charging=bat is None,
                           metered=met, model_availability=av)
               for t in (0, 3) for ram in (100, 4096) for bat in (None, 5.0) for met in (False, True)
               for av in ("available", "downloading", "unavailable")]
    conns = [Connectivity(), Connectivity(True, True), Connectivity(True, False), Connectivity(True, True, True),
             Connectivity(True, True, False, 10)]
    reqs = [RouteRequest(mode, sens, queue, tokens, app)
            for mode in (None, *MODES) for sens in (False, True) for queue in (False, True)
            for tokens in (10, 10_000) for app in ("", "a")]
    reasons = set()
    for policy, dev, conn, req in itertools.product(policies, devices, conns, reqs):
        reasons.add(re.sub(r"^thermal_\w+$", "thermal_<level>", decide(req, policy, dev, conn).reason))
    return reasons


def test_every_routing_reason_is_documented() -> None:
    text = (DOCS / "socket-api.md").read_text(encoding="utf-8")
    reasons = _all_reasons()
    assert {"prefer_local", "cloud_budget_exhausted", "thermal_<level>", "metered_network"} <= reasons
    agent_reasons = set(re.findall(r'"agent", "([a-z_]+)"', _source("api/*.py"))) | {"not_routed"}
    part = section(text, "Response headers")
    assert sorted(r for r in reasons | agent_reasons if f"`{r}`" not in part) == []


def test_the_openai_example_runs_against_a_real_agent(tmp_path: Path, tiny_gguf: Path) -> None:
    """The doc's Python example, run as written (socket path swapped) against `nanofleet agent` on a unix socket."""
    text = (DOCS / "socket-api.md").read_text(encoding="utf-8")
    code = re.search(r"## From Python: the openai client\n\n```python\n(.*?)```", text, re.S)
    assert code, "docs/socket-api.md has no openai example"
    sock = tmp_path / "run" / "agent.sock"
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device_id: doc-test\nbroker_url: null\ndata_dir: {tmp_path / 'data'}\nsocket_path: {sock}\n"
                   f"model: {{source: 'file:{tiny_gguf}', n_ctx: 512}}\n")
    agent = subprocess.Popen([sys.executable, "-m", "nanofleet", "agent", "--config", str(cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline()  # the agent prints its ready line once the socket accepts
        assert "serving on unix:" in line, line + agent.stdout.read() if agent.poll() is not None else line
        example = code.group(1).replace("/run/nanofleet/agent.sock", str(sock))
        out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == "local local_only"
    finally:
        agent.terminate()
        agent.wait(timeout=15)
    assert not sock.exists()


# -- controller REST API ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def controller_openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The controller's OpenAPI with every optional part on (a command service, the gateway's usage db)."""
    from nanofleet.controller.auth import ensure_operator_token
    from nanofleet.controller.store import Store
    from nanofleet.controller.web import create_app

    class Commands:
        async def send(self, device_id: str, kind: str, args: dict[str, str]) -> None:
            raise AssertionError("never called: only the schema is read")

    tmp = tmp_path_factory.mktemp("rest")
    store = Store(tmp / "store.db")
    try:
        _, token_hash = ensure_operator_token(tmp / "data")
        app = create_app(store, parse_fleet("fleet: demo\n"), operator_token_hash=token_hash, commands=Commands(),
                         usage_db=tmp / "usage.db")
        return app.openapi()
    finally:
        store.close()


def _subsections(text: str) -> dict[str, str]:
    """`### `METHOD /path`` heading -> its text up to the next heading."""
    parts = re.split(r"^### `([A-Z]+ /[^`]*)`$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_rest_endpoint_and_parameter_is_documented(controller_openapi: dict[str, Any]) -> None:
    text = (DOCS / "rest-api.md").read_text(encoding="utf-8")
    ops = {f"{method.upper()} {path}": op for path, item in controller_openapi["paths"].items()
           for method, op in item.items()}
    assert {"GET /api/policy/convergence", "GET /api/usage", "GET /api/rejections",
            "GET /api/devices/{device_id}/telemetry", "POST /api/devices/{device_id}/commands"} <= set(ops)
    documented = _subsections(section(text, "Endpoints"))
    assert sorted(set(ops) - set(documented)) == [], "endpoints docs/rest-api.md does not describe"
    assert sorted(set(documented) - set(ops)) == [], "documented endpoints the controller does not serve"
    missing = [f"{name}: {p['name']}" for name, op in ops.items() for p in op.get("parameters", [])
               if p["in"] == "query" and f"`{p['name']}`" not in documented[name]]
    assert missing == [], "query parameters not documented"


def test_every_rest_error_code_and_command_kind_is_documented() -> None:
    from nanofleet.protos.names import COMMAND_KINDS

    text = (DOCS / "rest-api.md").read_text(encoding="utf-8")
    src = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "controller" / "web").glob("*.py")))
    codes = (set(re.findall(r'WebError\(\d+, "([a-z_]+)"', src)) | set(re.findall(r'Unauthorized\("([a-z_]+)"', src))
             | set(re.findall(r'\b\d{3}: "([a-z_]+)"', src)) | set(re.findall(r'exc\.status_code,\s*"([a-z_]+)"', src)))
    assert {"device_not_found", "invalid_token", "internal_error", "method_not_allowed", "http_error"} <= codes
    errors = section(text, "Errors")
    assert sorted(c for c in codes if f"`{c}`" not in errors) == []
    assert [k for k in COMMAND_KINDS if f"| `{k}` |" not in text] == []
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/rest-api.md)" in readme


# -- command lines in the docs and the systemd units -----------------------------------------------------------------

def _command_lines() -> list[tuple[str, str]]:
    """(where, args) for every `nanofleet …` command in the docs' code blocks and the units' ExecStart lines."""
    found: list[tuple[str, str]] = []
    command = re.compile(r"^(?:ExecStart=)?(?:sudo -u \S+ )?(?:/opt/nanofleet/bin/)?nanofleet (.*)$")
    for path in sorted(DOCS.glob("*.md")) + sorted((ROOT / "deploy" / "systemd").glob("*.service")):
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        if path.suffix == ".md":
            blocks = re.findall(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)
            text = "\n".join(body for lang, body in blocks if lang in ("", "sh"))
        for line in text.splitlines():
            if (m := command.match(line.strip())) and "[" not in line:  # not a usage synopsis
                found.append((path.name, m.group(1)))
    return found


def test_every_documented_command_line_parses() -> None:
    """Each command names real (sub)commands and options: click parses it without running it."""
    import shlex

    import click

    from nanofleet.cli import main

    lines = _command_lines()
    assert len(lines) >= 10, lines
    bad = []
    for where, line in lines:
        args = ["x" if a.startswith("$") else a for a in shlex.split(line.split("  #")[0])]
        cmd: click.Command = main
        ctx = click.Context(main)
        try:
            while isinstance(cmd, click.Group) and args and args[0] in cmd.list_commands(ctx):
                name, args = args[0], args[1:]
                cmd = cmd.get_command(ctx, name)  # type: ignore[assignment]
                assert cmd is not None
            cmd.make_context(cmd.name or "nanofleet", list(args), resilient_parsing=False)
        except click.BadParameter as exc:
            if "does not exist" not in exc.format_message():  # paths of a production host
                bad.append(f"{where}: nanofleet {line}: {exc.format_message()}")
        except click.UsageError as exc:
            bad.append(f"{where}: nanofleet {line}: {exc.format_message()}")
        except click.exceptions.Exit:
            pass
    assert not bad, "\n".join(bad)
