"""The agent's socket API against the model it wraps, side by side in one run, on the same tiny GGUF:

- **direct**: xllamacpp's `handle_chat_completions` called in this process (no HTTP at all);
- **llama.cpp server**: llama.cpp's own HTTP server (xllamacpp's listener) on a unix socket, in its own process;
- **agent**: `nanofleet agent` in its own process — socket API, routing, admission, sessions all in place;
- **FastAPI shim**: the issue's yardstick — a bare FastAPI app on uvicorn (unix socket) that parses the body and calls
  xllamacpp in a thread, nothing else (no validation, routing, admission); its own process;
- **LiteLLM proxy** in front of a llama.cpp server (TCP), when `litellm` is installed (PATH or $LITELLM_BIN).

Latency: 1-token completions, interleaved round by round. Throughput: 128- and 448-token completions (ignore_eos),
interleaved. The same httpx client code drives every HTTP contender, so its cost cancels out in the differences.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.stats import interleaved, percentile

N_CTX = 512          # per slot, as ModelSpec.n_ctx
N_PARALLEL = 2
THREADS = 1          # every contender: one llama.cpp thread, so four of them share two cores without spinning
LATENCY_ROUNDS = 400
THROUGHPUT_ROUNDS = 60
LONG_TOKENS = 128
SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
LONG = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": LONG_TOKENS,
        "ignore_eos": True}
# Throughput proper: as many tokens as a slot's context holds. The tiny model makes ~3,500 tokens/s, so at 128 tokens
# a request lasts ~35 ms and the fixed per-request cost of any HTTP hop (measured by the 1-token rounds) is ~5% of it;
# a real edge model (5-50 tokens/s) spends seconds on the same answer. The goal is judged on this one.
LONGEST_TOKENS = 448
LONGEST = {**LONG, "max_tokens": LONGEST_TOKENS}

# argv: model, where (socket path or port), n_ctx per slot, slots, threads — the agent's backend settings
_PARAMS = """
import sys, xllamacpp
p = xllamacpp.CommonParams()
p.model.path = sys.argv[1]
p.n_ctx = int(sys.argv[3]) * int(sys.argv[4])
p.n_parallel = int(sys.argv[4])
p.verbosity = -1
p.cpuparams.poll = 0  # as the agent's backend sets it
p.cpuparams_batch.poll = 0
p.cpuparams.n_threads = p.cpuparams_batch.n_threads = int(sys.argv[5])
"""

LLAMA_SERVER = _PARAMS + """
where = sys.argv[2]
if where.startswith("/"):
    p.hostnames = [where]
else:
    p.hostnames = ["127.0.0.1"]
    p.port = int(where)
s = xllamacpp.Server(p)
print("ready", flush=True)
sys.stdin.read()
"""


FASTAPI_SHIM = _PARAMS + """
import asyncio, json, uvicorn
from concurrent.futures import ThreadPoolExecutor
from fastapi import FastAPI, Request
from fastapi.responses import Response
p.hostnames = [sys.argv[2] + ".llama.sock"]  # llama.cpp listens on a unix socket when the name ends in .sock
server = xllamacpp.Server(p)
pool = ThreadPoolExecutor(4)
app = FastAPI()

@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    body = await request.json()
    out = await asyncio.get_running_loop().run_in_executor(pool, server.handle_chat_completions, body)
    return Response(json.dumps(out), media_type="application/json")

print("ready", flush=True)
uvicorn.run(app, uds=sys.argv[2], log_level="error", loop="uvloop", http="httptools")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, httpx.HTTPError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: {what} did not start within {timeout}s")
        time.sleep(0.05)


def _direct_server(model: Path, sock: Path) -> Any:
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = str(model)
    p.n_ctx = N_CTX * N_PARALLEL
    p.n_parallel = N_PARALLEL
    p.verbosity = -1
    p.cpuparams.poll = 0  # as the agent's backend sets it
    p.cpuparams_batch.poll = 0
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = THREADS
    p.hostnames = [str(sock)]
    return xllamacpp.Server(p)


def _llama_server(model: Path, where: str) -> subprocess.Popen[str]:
    """llama.cpp's own HTTP server in its own process, on a unix socket path or a loopback TCP port."""
    args = [sys.executable, "-c", LLAMA_SERVER, str(model), where, str(N_CTX), str(N_PARALLEL), str(THREADS)]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _fastapi_shim(model: Path, sock: Path) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", FASTAPI_SHIM, str(model), str(sock), str(N_CTX), str(N_PARALLEL), str(THREADS)]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _litellm_bin() -> str | None:
    """$LITELLM_BIN, or `litellm` beside this interpreter (pip install -e '.[bench]'), or on PATH."""
    beside = Path(sys.executable).parent / "litellm"
    return os.environ.get("LITELLM_BIN") or (str(beside) if beside.exists() else None) or shutil.which("litellm")


def run() -> dict[str, Any]:
    from nanofleet.agent.tiny_model import make_tiny_gguf

    tmp = Path(tempfile.mkdtemp(prefix="nf-bench-"))
    model = make_tiny_gguf(tmp / "tiny.gguf")
    procs: list[subprocess.Popen[str]] = []
    clients: list[httpx.Client] = []
    try:
        # llama.cpp's own server on a unix socket (its own process, as the agent has)
        llama_sock = tmp / "llama.sock"
        procs.append(_llama_server(model, str(llama_sock)))
        # the agent
        agent_sock = tmp / "run" / "agent.sock"
        cfg = tmp / "agent.yaml"
        cfg.write_text(f"device_id: bench\ndata_dir: {tmp / 'data'}\nsocket_path: {agent_sock}\nbroker_url: null\n"
                       f"model: {{source: 'file:{model}', n_ctx: {N_CTX}, n_parallel: {N_PARALLEL}, keep_alive: -1, "
                       f"threads: {THREADS}}}\n")
        procs.append(subprocess.Popen([sys.executable, "-m", "nanofleet", "agent", "--config", str(cfg)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        shim_sock = tmp / "shim.sock"
        procs.append(_fastapi_shim(model, shim_sock))
        for p in procs:
            assert p.stdout is not None and p.stdout.readline(), "bench: a server failed to start"
        _wait(shim_sock.exists, 30, "FastAPI shim")  # "ready" comes before uvicorn binds

        def uds(path: Path) -> httpx.Client:
            c = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://local", timeout=60)
            clients.append(c)
            return c

        llama, agent, shim = uds(llama_sock), uds(agent_sock), uds(shim_sock)
        direct = _direct_server(model, tmp / "direct.sock")

        def post(client: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
            def call() -> int:
                r = client.post("/v1/chat/completions", json=body, headers=headers)
                if r.status_code != 200:
                    raise RuntimeError(f"bench: {r.status_code} {r.text[:200]}")
                return int(r.json()["usage"]["completion_tokens"])
            return call

        def direct_call(body: dict[str, Any]) -> Any:
            def call() -> int:
                out = direct.handle_chat_completions(dict(body))
                return int(out["usage"]["completion_tokens"])
            return call

        contenders_short = {"direct": direct_call(SHORT), "llama.cpp server": post(llama, SHORT),
                            "FastAPI shim": post(shim, SHORT), "agent": post(agent, SHORT)}
        contenders_long = {"direct": direct_call(LONG), "llama.cpp server": post(llama, LONG),
                           "FastAPI shim": post(shim, LONG), "agent": post(agent, LONG)}
        contenders_longest = {"direct": direct_call(LONGEST), "llama.cpp server": post(llama, LONGEST),
                              "FastAPI shim": post(shim, LONGEST), "agent": post(agent, LONGEST)}
        litellm_note = ""
        lbin = _litellm_bin()
        if lbin:
            port, lport = _free_port(), _free_port()
            procs.append(_llama_server(model, str(port)))
            assert procs[-1].stdout is not None and procs[-1].stdout.readline()
            (tmp / "litellm.yaml").write_text(
                "model_list:\n  - model_name: tiny\n    litellm_params:\n      model: openai/tiny\n"
                f"      api_base: http://127.0.0.1:{port}/v1\n      api_key: none\n")
            env = {**os.environ, "LITELLM_MASTER_KEY": "sk-bench", "LITELLM_LOG": "ERROR"}
            procs.append(subprocess.Popen([lbin, "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1",
                                           "--port", str(lport), "--num_workers", "1"], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, text=True))
            lite = httpx.Client(base_url=f"http://127.0.0.1:{lport}", timeout=60)
            clients.append(lite)
            auth = {"authorization": "Bearer sk-bench"}
            try:
                _wait(lambda: lite.get("/health/liveliness").status_code == 200, 90, "litellm proxy")
                contenders_short["LiteLLM proxy"] = post(lite, {**SHORT, "model": "tiny"}, auth)
                contenders_long["LiteLLM proxy"] = post(lite, {**LONG, "model": "tiny"}, auth)
            except RuntimeError as exc:
                litellm_note = f"LiteLLM proxy not measured: {exc}"
        else:
            litellm_note = ("LiteLLM proxy not measured: `litellm` is not installed (pip install -e '.[bench]', "
                            "or set LITELLM_BIN)")

        import psutil

        servers = {"llama.cpp server": psutil.Process(procs[0].pid), "agent": psutil.Process(procs[1].pid)}
        for fn in contenders_short.values():  # warm every path before the CPU clocks start
            for _ in range(20):
                fn()
        cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in servers.items()}
        lat = interleaved(contenders_short, LATENCY_ROUNDS, warmup=0, budget_s=45)
        cpu = {k: (sum(p.cpu_times()[:2]) - cpu0[k]) / len(lat[k]) * 1e3 for k, p in servers.items()}
        thr = interleaved(contenders_long, THROUGHPUT_ROUNDS, warmup=3, budget_s=25)
        thr_longest = interleaved(contenders_longest, THROUGHPUT_ROUNDS, warmup=2, budget_s=30)
        return _report(lat, thr, thr_longest, cpu, litellm_note)
    finally:
        for c in clients:
            c.close()
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _report(lat: dict[str, list[float]], thr: dict[str, list[float]], thr_longest: dict[str, list[float]],
            cpu: dict[str, float], note: str) -> dict[str, Any]:
    ms = {k: {"p50": percentile(v, 50) * 1e3, "p95": percentile(v, 95) * 1e3} for k, v in lat.items()}
    tps = {k: LONG_TOKENS / percentile(v, 50) for k, v in thr.items()}
    tps_longest = {k: LONGEST_TOKENS / percentile(v, 50) for k, v in thr_longest.items()}

    def paired_ms(a: str, b: str) -> dict[str, float]:  # per round, so drift and other load cancel out
        d = [(x - y) * 1e3 for x, y in zip(lat[a], lat[b], strict=False)]
        return {"p50": round(percentile(d, 50), 3), "p95": round(percentile(d, 95), 3)}

    def paired_ratio(a: str, b: str, rounds: dict[str, list[float]] = thr) -> float:  # tokens/s a over b, per round
        return round(percentile([y / x for x, y in zip(rounds[a], rounds[b], strict=False)], 50), 4)

    figures: dict[str, Any] = {
        "latency_ms_1_token": {k: {q: round(x, 3) for q, x in v.items()} for k, v in ms.items()},
        "tokens_per_s_128": {k: round(v, 1) for k, v in tps.items()},
        f"tokens_per_s_{LONGEST_TOKENS}": {k: round(v, 1) for k, v in tps_longest.items()},
        "agent_vs_direct_tokens_per_s_ratio_128": paired_ratio("agent", "direct"),
        "agent_vs_direct_tokens_per_s_ratio": paired_ratio("agent", "direct", thr_longest),
        "agent_vs_llama_server_tokens_per_s_ratio": paired_ratio("agent", "llama.cpp server", thr_longest),
        "llama_server_vs_direct_tokens_per_s_ratio": paired_ratio("llama.cpp server", "direct", thr_longest),
        "agent_added_ms_vs_direct": paired_ms("agent", "direct"),
        "agent_added_ms_vs_llama_server": paired_ms("agent", "llama.cpp server"),
        "llama_server_added_ms_vs_direct": paired_ms("llama.cpp server", "direct"),
        "shim_added_ms_vs_llama_server": paired_ms("FastAPI shim", "llama.cpp server"),
        "agent_added_ms_vs_shim": paired_ms("agent", "FastAPI shim"),
        "server_cpu_ms_per_1_token_request": {k: round(v, 3) for k, v in cpu.items()},
        "samples": {"latency": len(lat["agent"]), "throughput": len(thr["agent"]),
                    "throughput_longest": len(thr_longest["agent"])},
    }
    if "LiteLLM proxy" in ms:
        figures["litellm_added_ms_vs_llama_server"] = paired_ms("LiteLLM proxy", "llama.cpp server")
    rows = [f"| path | 1-token p50 ms | 1-token p95 ms | 128-token tokens/s | {LONGEST_TOKENS}-token tokens/s |",
            "|---|---:|---:|---:|---:|"]
    for k in ms:
        longest = f"{tps_longest[k]:.0f}" if k in tps_longest else "–"
        rows.append(f"| {k} | {ms[k]['p50']:.2f} | {ms[k]['p95']:.2f} | {tps.get(k, 0):.0f} | {longest} |")
    goal_tps = figures["agent_vs_direct_tokens_per_s_ratio"] >= 0.95
    goal_lat = figures["agent_added_ms_vs_llama_server"]["p50"] <= 0.5
    # the issue's yardstick, on this machine: its "bare FastAPI shim +0.4 ms" against a goal of +0.5 ms means "all
    # of the agent's routing for no more than 0.1 ms over the bare shim" (or 1.25x the shim's cost, where slower)
    shim_cost = figures["shim_added_ms_vs_llama_server"]["p50"]
    goal_rel = figures["agent_added_ms_vs_llama_server"]["p50"] <= max(shim_cost + 0.1, shim_cost * 1.25)
    md = "\n".join([
        f"Tiny GGUF, {N_PARALLEL} slots × {N_CTX} tokens; {figures['samples']['latency']} interleaved 1-token "
        f"rounds, {figures['samples']['throughput']} interleaved {LONG_TOKENS}-token and "
        f"{figures['samples']['throughput_longest']} {LONGEST_TOKENS}-token rounds.", "", *rows, "",
        "Differences and ratios are medians of per-round pairs (robust to other load on the machine).",
        f"- agent / direct tokens/s, {LONGEST_TOKENS} tokens: **{figures['agent_vs_direct_tokens_per_s_ratio']:.3f}** "
        f"(goal ≥ 0.95: {'met' if goal_tps else 'missed'}); agent / llama.cpp server: "
        f"{figures['agent_vs_llama_server_tokens_per_s_ratio']:.3f}; llama.cpp server / direct: "
        f"{figures['llama_server_vs_direct_tokens_per_s_ratio']:.3f}. At 128 tokens (~35 ms a request here, where "
        f"the fixed per-request cost of any HTTP hop weighs ~20x what it does on a real edge model): agent / direct "
        f"{figures['agent_vs_direct_tokens_per_s_ratio_128']:.3f}",
        f"- agent added latency vs direct, 1 token: p50 {figures['agent_added_ms_vs_direct']['p50']:.2f} ms, "
        f"p95 {figures['agent_added_ms_vs_direct']['p95']:.2f} ms",
        f"- agent vs llama.cpp's own server, 1 token, p50: "
        f"**{figures['agent_added_ms_vs_llama_server']['p50']:+.2f} ms** "
        f"(goal ≤ +0.5 ms: {'met' if goal_lat else 'missed'}); llama.cpp server vs direct: "
        f"{figures['llama_server_added_ms_vs_direct']['p50']:+.2f} ms",
        f"- the issue's yardstick measured here: a bare FastAPI shim adds "
        f"**{shim_cost:+.2f} ms** over llama.cpp's server (the issue saw +0.4 ms where it set +0.5 ms); the agent, "
        f"with validation, routing, admission and sessions, vs that shim: "
        f"**{figures['agent_added_ms_vs_shim']['p50']:+.2f} ms** p50 — relative goal (agent ≤ shim + 0.1 ms, or "
        f"1.25x the shim's cost): {'met' if goal_rel else 'missed'}",
        f"- server process CPU per 1-token request (robust to other load on the machine): agent "
        f"{cpu['agent']:.2f} ms, llama.cpp server {cpu['llama.cpp server']:.2f} ms",
        *([f"- LiteLLM proxy vs llama.cpp server, p50: {figures['litellm_added_ms_vs_llama_server']['p50']:+.2f} ms"]
          if "litellm_added_ms_vs_llama_server" in figures else []),
        *([f"- {note}"] if note else []),
    ])
    return {"name": "socket API vs llama.cpp", "figures": figures, "markdown": md}


if __name__ == "__main__":
    print(run()["markdown"])
