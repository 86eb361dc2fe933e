"""Rollouts of a model to a group, in steps, gated on what the canaries report against the rest of the group.

Pure: no I/O. `parse_steps`, `parse_gate`, `parse_bake` turn the operator's text into values (RolloutInputError
naming the bad term); `advance(rollout, devices, now_ms)` is the state machine the controller's task runs
(controller/rollout_engine.py) over the devices' stored reports, returning the rollout's next state, the model each
device should run, and what happened.

    running ──(every online device of the step applied or failed)──▶ baking ──(bake time over)──▶ gate
      gate passes: the next step (running), or done after the last (100 %)
      gate fails, or too many devices of the step failed to apply: rolled_back (everyone back on the baseline)
    paused: nothing advances and nothing more is assigned (resume goes on);
    aborting (the operator's abort) → aborted: everyone back on the baseline, as a rollback.

Which devices a step takes: the first ceil(step % × eligible) of the group's eligible devices (pinned ones are not
eligible) in a fixed pseudo-random order (sha256 of rollout id + device id), so steps only ever add devices.
Canaries are the step's devices running the target; the rest of the group (not assigned) is the baseline. A device
that refuses the model (RAM, disk) or fails to load it is a failure of its step: more than `failed<N%` (default
10 %) of the step's devices fails the step. Terms that compare with the baseline use the figures of the last
evaluation that had one when no baseline device is left (the 100 % step).

Gate terms (comma-separated, all must hold):

    errors<2%           canaries' failed requests / requests (absolute)
    p95_latency<+20%    median canary p95 latency vs the baseline's median, relative
    tokens_per_s>-10%   median canary tokens/s vs the baseline's median, relative
    thermal<severe      the hottest canary's thermal level (none … shutdown)
    failed<10%          devices of the step that could not apply the model
    requests>500        the canaries' local requests needed before the gate is judged: the step bakes on until
                        they served that many (without it, a step whose canaries served nothing passes the
                        request-based terms for want of evidence)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from nanofleet.config import Profile, parse_duration
from nanofleet.controller.errors import ControllerError
from nanofleet.protos.names import THERMAL_LEVELS

__all__ = ["DeviceReport", "Gate", "Outcome", "Rollout", "RolloutInputError", "Term", "advance", "parse_bake",
           "parse_gate", "parse_steps"]

THERMAL = THERMAL_LEVELS  # none … shutdown, from the proto enum (protos/names.py)
METRICS = ("errors", "p95_latency", "tokens_per_s", "thermal", "failed", "requests")
State = Literal["running", "baking", "paused", "aborting", "done", "rolled_back", "aborted"]
ACTIVE = ("running", "baking", "paused", "aborting")


class RolloutInputError(ControllerError, ValueError):
    """The operator's steps, gate or bake time cannot be used (the message names the bad term)."""


@dataclass(frozen=True)
class Term:
    metric: str
    op: Literal["<", ">"]
    value: float
    relative: bool  # +N% / -N% against the baseline (else an absolute rate, or a thermal level)

    def __str__(self) -> str:
        if self.metric == "thermal":
            return f"thermal{self.op}{THERMAL[int(self.value)]}"
        if self.metric == "requests":
            return f"requests>{int(self.value)}"
        if self.relative:
            return f"{self.metric}{self.op}{self.value:+g}%"
        return f"{self.metric}{self.op}{self.value:g}%"


@dataclass(frozen=True)
class Gate:
    terms: tuple[Term, ...]

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)

    @property
    def max_failed_pct(self) -> float:
        return next((t.value for t in self.terms if t.metric == "failed"), 10.0)

    @property
    def min_requests(self) -> int:
        return int(next((t.value for t in self.terms if t.metric == "requests"), -1))


_TERM = re.compile(r"^\s*([a-z_0-9]+)\s*([<>])\s*(\S+?)\s*$")
_PCT = re.compile(r"^([+-]?)(\d+(?:\.\d+)?)%$")


def parse_gate(text: str) -> Gate:
    """`errors<2%,p95_latency<+20%,tokens_per_s>-10%,thermal<severe` → Gate; RolloutInputError names the term."""
    if not text.strip():
        raise RolloutInputError("--gate: empty; e.g. \"errors<2%,p95_latency<+20%,thermal<severe\"")
    terms: list[Term] = []
    for raw in text.split(","):
        m = _TERM.match(raw)
        if not m:
            raise RolloutInputError(f"--gate term {raw.strip()!r}: expected METRIC<VALUE or METRIC>VALUE")
        metric, op, value = m.groups()
        if metric not in METRICS:
            raise RolloutInputError(f"--gate term {raw.strip()!r}: unknown metric {metric!r} "
                                    f"(known: {', '.join(METRICS)})")
        if metric in {t.metric for t in terms}:
            raise RolloutInputError(f"--gate term {raw.strip()!r}: {metric} is given twice")
        if metric == "requests":
            if op != ">" or not value.isdigit() or int(value) > 10**9:
                raise RolloutInputError(f"--gate term {raw.strip()!r}: expected requests>N (a count of local "
                                        "requests the canaries must have served before the gate is judged)")
            terms.append(Term(metric, ">", float(value), False))
            continue
        if metric == "thermal":
            if op != "<" or value not in THERMAL:
                raise RolloutInputError(f"--gate term {raw.strip()!r}: expected thermal<LEVEL, LEVEL one of "
                                        f"{', '.join(THERMAL)}")
            terms.append(Term(metric, "<", float(THERMAL.index(value)), False))
            continue
        p = _PCT.match(value)
        if not p:
            raise RolloutInputError(f"--gate term {raw.strip()!r}: expected a percentage such as 2% or +20%")
        sign, number = p.groups()
        relative = bool(sign)
        if metric in ("errors", "failed") and relative:
            raise RolloutInputError(f"--gate term {raw.strip()!r}: {metric} is a share of the canaries: "
                                    f"give it without a sign, e.g. {metric}<2%")
        if metric in ("p95_latency", "tokens_per_s") and not relative:
            raise RolloutInputError(f"--gate term {raw.strip()!r}: {metric} compares with the rest of the group: "
                                    f"give a signed change, e.g. {metric}{op}+20%")
        if metric in ("errors", "failed") and op != "<":
            raise RolloutInputError(f"--gate term {raw.strip()!r}: {metric} takes an upper bound (<)")
        v = float(number) * (-1 if sign == "-" else 1)
        if not math.isfinite(v) or abs(v) > 1000 or (not relative and v > 100):
            raise RolloutInputError(f"--gate term {raw.strip()!r}: {value} is out of range")
        terms.append(Term(metric, op, v, relative))  # type: ignore[arg-type]
    return Gate(tuple(terms))


def parse_steps(text: str) -> tuple[int, ...]:
    """`5,25,100` → (5, 25, 100): increasing percentages ending at 100."""
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise RolloutInputError(f"--steps {text!r}: expected increasing percentages such as 5,25,100") from None
    if not steps or any(not 1 <= s <= 100 for s in steps):
        raise RolloutInputError(f"--steps {text!r}: each step is a percentage from 1 to 100")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise RolloutInputError(f"--steps {text!r}: steps must increase")
    if steps[-1] != 100:
        raise RolloutInputError(f"--steps {text!r}: the last step must be 100 (the whole group)")
    return steps


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def overlay(profile: Profile, settings: dict[str, Any]) -> Profile:
    """`profile` with a settings rollout's partial profile on top (nested mappings merged, the rest replaced)."""
    def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in top.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return Profile.model_validate(merge(profile.model_dump(), settings))


def parse_settings(data: Any, base: Profile) -> dict[str, Any]:
    """A settings file's content, checked by applying it to `base`; RolloutInputError naming the field."""
    if not isinstance(data, dict) or not data:
        raise RolloutInputError("--settings: expected a mapping of profile fields (routing:, queue:, "
                                "telemetry_interval_s:)")
    if "model" in data:
        raise RolloutInputError("--settings: model: roll a model out with --model (an artifact), not in settings")
    try:
        overlay(base, data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RolloutInputError(f"--settings: {where}: {err['msg']}") from None
    return data


def parse_bake(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise RolloutInputError(f"--bake {text!r}: {exc}") from None
    if not 0 <= seconds <= 30 * 86_400:
        raise RolloutInputError(f"--bake {text!r}: from 0 to 30d")
    return seconds


@dataclass(frozen=True)
class DeviceReport:
    """What the store knows of one device of the group (its `model_report` and thermal level)."""

    device_id: str
    online: bool
    sha256: str = ""          # the model serving now
    update_state: str = ""    # downloading | loading | applied | failed
    update_sha256: str = ""
    update_reason: str = ""
    requests: int = 0
    errors: int = 0
    p95_ms: float = 0.0
    tokens_per_s: float = 0.0
    thermal_level: int = 0
    policy_version: int = 0

    @classmethod
    def from_row(cls, device_id: str, state: str, report_json: str, thermal_level: int,
                 policy_version: int = 0) -> DeviceReport:
        try:
            r = json.loads(report_json or "{}")
        except ValueError:
            r = {}
        return cls(device_id, state == "online", str(r.get("sha", "")), str(r.get("state", "")),
                   str(r.get("usha", "")), str(r.get("why", "")), int(r.get("req", 0)), int(r.get("err", 0)),
                   float(r.get("p95", 0.0)), float(r.get("tps", 0.0)), int(thermal_level), int(policy_version))


@dataclass
class Rollout:
    """A rollout's whole state (stored as JSON in `rollouts.state_json`)."""

    id: int
    group: str
    target_source: str
    target_sha256: str
    baseline_source: str
    baseline_sha256: str
    steps: tuple[int, ...]
    gate: str
    bake_s: float
    state: State = "running"
    step: int = 0                 # index into steps
    step_started_ms: int = 0
    bake_started_ms: int = 0
    reason: str = ""              # why it paused, rolled back or ended
    reference: dict[str, float] = field(default_factory=dict)  # the baseline's last figures
    step_results: list[dict[str, Any]] = field(default_factory=list)  # per finished step: devices, figures
    kind: Literal["model", "settings"] = "model"
    settings: dict[str, Any] = field(default_factory=dict)  # a settings rollout's partial profile (target_sha256:
    #                                                         the sha256 of its canonical JSON)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Rollout:
        d = json.loads(text)
        d["steps"] = tuple(d["steps"])
        return cls(**d)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


@dataclass
class Outcome:
    rollout: Rollout
    desired: dict[str, tuple[str, str]]  # device -> (model source, sha256) it should run
    events: list[tuple[str, str]]        # (kind, detail) for the event log / audit
    progress: dict[str, int]             # assigned, applied, failed, pending (of the current step)


def order(rollout_id: int, device_ids: Iterable[str]) -> list[str]:
    return sorted(device_ids, key=lambda d: hashlib.sha256(f"{rollout_id}:{d}".encode()).hexdigest())


def assigned(r: Rollout, eligible: Iterable[str], step: int | None = None) -> list[str]:
    ordered = order(r.id, eligible)
    pct = r.steps[r.step if step is None else step]
    return ordered[:math.ceil(len(ordered) * pct / 100)]


def figures(reports: Iterable[DeviceReport]) -> dict[str, float]:
    rs = list(reports)
    if not rs:
        return {}
    requests = sum(r.requests for r in rs)
    p95 = [r.p95_ms for r in rs if r.p95_ms > 0]
    tps = [r.tokens_per_s for r in rs if r.tokens_per_s > 0]
    out = {"devices": float(len(rs)), "requests": float(requests),
           "errors_pct": 100.0 * sum(r.errors for r in rs) / requests if requests else 0.0,
           "thermal": float(max(r.thermal_level for r in rs))}
    if p95:
        out["p95_ms"] = statistics.median(p95)
    if tps:
        out["tokens_per_s"] = statistics.median(tps)
    return out


def check_gate(gate: Gate, canary: dict[str, float], baseline: dict[str, float]) -> list[str]:
    """The gate's failed terms, each with the figures that failed it (empty: the gate holds)."""
    failed = []
    for t in gate.terms:
        if t.metric == "errors" and canary.get("errors_pct", 0.0) >= t.value:
            failed.append(f"{t}: canaries' errors {canary['errors_pct']:.2f}%")
        elif t.metric == "thermal" and canary.get("thermal", 0.0) >= t.value:
            failed.append(f"{t}: hottest canary at {THERMAL[min(int(canary['thermal']), 6)]}")
        elif t.metric in ("p95_latency", "tokens_per_s"):
            key = "p95_ms" if t.metric == "p95_latency" else "tokens_per_s"
            c, b = canary.get(key), baseline.get(key)
            if c is None or not b:
                continue  # no figure on one side: nothing to compare (the canaries served no local request)
            change = 100.0 * (c - b) / b
            if (t.op == "<" and change >= t.value) or (t.op == ">" and change <= t.value):
                failed.append(f"{t}: canaries {c:.1f} vs baseline {b:.1f} ({change:+.1f}%)")
    return failed


def advance(r: Rollout, devices: list[DeviceReport], pinned: set[str], now_ms: int) -> Outcome:
    """One tick of the state machine over the group's devices (pure: `r` is copied, not changed)."""
    r = dataclasses.replace(r, reference=dict(r.reference), step_results=list(r.step_results))
    gate = parse_gate(r.gate)
    by_id = {d.device_id: d for d in devices}
    eligible = [d for d in by_id if d not in pinned]
    events: list[tuple[str, str]] = []
    target = (r.target_source, r.target_sha256)
    baseline = (r.baseline_source, r.baseline_sha256)

    def desired_for(ids: Iterable[str], model: tuple[str, str]) -> dict[str, tuple[str, str]]:
        return {d: model for d in ids}

    if r.state == "aborting":
        r.state, r.reason = "aborted", r.reason or "aborted by the operator"
        events.append(("aborted", r.reason))
    if r.state in ("rolled_back", "aborted"):
        return Outcome(r, desired_for(eligible, baseline), events, {})
    cohort = assigned(r, eligible)
    if r.state == "done":
        return Outcome(r, desired_for(eligible, target), events, {})
    # paused keeps what was assigned so far: the current step's devices stay on the target
    desired = desired_for(eligible, baseline) | desired_for(cohort, target)
    applied = [d for d in cohort if by_id[d].sha256 == r.target_sha256]
    failed = [d for d in cohort if d not in applied and by_id[d].update_state == "failed"
              and by_id[d].update_sha256 == r.target_sha256]
    pending = [d for d in cohort if d not in applied and d not in failed]
    progress = {"assigned": len(cohort), "applied": len(applied), "failed": len(failed), "pending": len(pending),
                "eligible": len(eligible)}
    if r.state == "paused":
        return Outcome(r, desired, events, progress)
    if cohort and 100.0 * len(failed) / len(cohort) > gate.max_failed_pct:
        reasons = "; ".join(f"{d}: {by_id[d].update_reason or 'failed'}" for d in failed[:5])
        return _roll_back(r, eligible, baseline, events, progress, now_ms,
                          f"step {r.step + 1} ({r.steps[r.step]}%): {len(failed)} of {len(cohort)} devices could "
                          f"not apply the model ({reasons})")
    if r.state == "running":
        if any(by_id[d].online for d in pending):
            return Outcome(r, desired, events, progress)  # online devices still updating
        r.state, r.bake_started_ms = "baking", now_ms
        events.append(("baking", f"step {r.step + 1} ({r.steps[r.step]}%): {len(applied)} applied, "
                                 f"{len(failed)} failed, {len(pending)} offline; baking {r.bake_s:g} s"))
        return Outcome(r, desired, events, progress)
    # baking
    if now_ms - r.bake_started_ms < r.bake_s * 1000:
        return Outcome(r, desired, events, progress)
    canary = figures(by_id[d] for d in applied)
    if applied and canary.get("requests", 0.0) <= gate.min_requests:
        return Outcome(r, desired, events, progress)  # not enough evidence yet: the step bakes on
    rest = figures(by_id[d] for d in eligible if d not in cohort and by_id[d].sha256 != r.target_sha256)
    if rest:
        r.reference = rest
    bad = check_gate(gate, canary, rest or r.reference)
    r.step_results.append({"step": r.steps[r.step], "devices": len(cohort), "applied": len(applied),
                           "failed": len(failed), "canary": canary, "baseline": rest or r.reference,
                           "gate": "failed" if bad else "passed"})
    if bad:
        return _roll_back(r, eligible, baseline, events, progress, now_ms,
                          f"gate failed at step {r.step + 1} ({r.steps[r.step]}%): " + "; ".join(bad))
    events.append(("step_passed", f"step {r.step + 1} ({r.steps[r.step]}%) passed the gate {r.gate}"))
    if r.step + 1 == len(r.steps):
        r.state, r.reason = "done", f"all {len(eligible)} eligible devices on the target"
        events.append(("done", r.reason))
        return Outcome(r, desired_for(eligible, target), events, progress)
    r.step, r.state, r.step_started_ms, r.bake_started_ms = r.step + 1, "running", now_ms, 0
    nxt = assigned(r, eligible)
    events.append(("step_started", f"step {r.step + 1} ({r.steps[r.step]}%): {len(nxt)} devices"))
    return Outcome(r, desired | desired_for(nxt, target), events,
                   {**progress, "assigned": len(nxt)})


def _roll_back(r: Rollout, eligible: list[str], baseline: tuple[str, str], events: list[tuple[str, str]],
               progress: dict[str, int], now_ms: int, why: str) -> Outcome:
    r.state, r.reason, r.bake_started_ms = "rolled_back", why, 0
    events.append(("rolled_back", why))
    return Outcome(r, {d: baseline for d in eligible}, events, progress)
