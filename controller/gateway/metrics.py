"""The gateway's Prometheus metrics and the small HTTP listener that serves them (`gateway.metrics_listen`).

The gateway speaks only gRPC to devices, so /metrics gets a listener of its own (uvicorn, in the gateway's event loop,
under its task supervisor). Off by default. On a loopback address it may run without a token; bound beyond
loopback it requires one — `Authorization: Bearer <token>` with the token taken from the environment variable
`gateway.metrics_token_env` (Prometheus: `authorization: {credentials_file: …}`) — and the gateway refuses to start
without it, as it refuses plaintext gRPC beyond loopback. A wrong or missing token gets 401, any other path 404.

Exposed (prefix `nanofleet_gateway_`): `calls_total{method,code}` (every Generate/GenerateStream/CountTokens answer
by gRPC status name), `tokens_total{direction,model}` (input/output tokens charged), `cost_usd_total{model}`,
`upstream_latency_seconds{method,outcome}` (histogram: a unary call's upstream time, a stream's time to its first
chunk, a token count), `budget_refusals_total{scope}` (device, app, fleet), `upstream_retries_total`,
`internal_errors_total` (bugs, logged). docs/operations.md ("Monitoring") names each; a test holds it to this.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import Receive, Scope, Send

from .errors import GatewayError

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "MetricsApp", "MetricsConfigError"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_P = "nanofleet_gateway_"
# upstream calls run from ~0.3 s (Flash's first token) to the 30 s cap
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class MetricsConfigError(GatewayError):
    """The metrics listener cannot run as configured (beyond loopback without a token)."""


class _Live(Collector):
    """Counters the service already keeps, read at each scrape."""

    def __init__(self, retries: Callable[[], int], bugs: Callable[[], int]) -> None:
        self._retries, self._bugs = retries, bugs

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(f"{_P}upstream_retries", "upstream calls tried again (5xx, timeouts)",
                                  value=self._retries())
        yield CounterMetricFamily(f"{_P}internal_errors", "bugs answered INTERNAL (each logged with its traceback)",
                                  value=self._bugs())


class GatewayMetrics:
    """The gateway's metrics in a registry of their own (not prometheus_client's process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(f"{_P}calls", "answers to devices by method and gRPC status", ["method", "code"],
                             registry=r)
        self.tokens = Counter(f"{_P}tokens", "tokens charged, by direction (input, output) and model",
                              ["direction", "model"], registry=r)
        self.cost = Counter(f"{_P}cost_usd", "cost charged in USD, by model (gateway.prices_per_million)", ["model"],
                            registry=r)
        self.upstream_latency = Histogram(f"{_P}upstream_latency_seconds", "upstream time: a unary call, a stream's "
                                          "first chunk, a token count", ["method", "outcome"], buckets=_BUCKETS,
                                          registry=r)
        self.budget_refusals = Counter(f"{_P}budget_refusals", "calls refused for a spent cloud budget, by scope",
                                       ["scope"], registry=r)
        for method in ("Generate", "GenerateStream", "CountTokens"):  # the series exist before the first call
            self.calls.labels(method, "OK")
        for scope in ("device", "app", "fleet"):
            self.budget_refusals.labels(scope)

    def watch(self, retries: Callable[[], int], bugs: Callable[[], int]) -> None:
        self.registry.register(_Live(retries, bugs))

    def charged(self, model: str, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        self.tokens.labels("input", model).inc(input_tokens)
        self.tokens.labels("output", model).inc(output_tokens)
        self.cost.labels(model).inc(cost_usd)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsApp:
    """The ASGI app of the metrics listener: GET /metrics, behind a bearer token when one is set."""

    def __init__(self, metrics: GatewayMetrics, token: str | None) -> None:
        self.metrics, self.token = metrics, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; nothing else is served
        status, body, ctype = 200, b"", CONTENT_TYPE
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if scope["path"] != "/metrics":
            status, body, ctype = 404, b"not found: the gateway serves only GET /metrics here\n", "text/plain"
        elif scope["method"] not in ("GET", "HEAD"):
            status, body, ctype = 405, b"method not allowed: GET /metrics\n", "text/plain"
        elif self.token is not None and not _bearer_ok(headers.get(b"authorization", b""), self.token):
            status, body, ctype = 401, b"unauthorized: send 'Authorization: Bearer <metrics token>'\n", "text/plain"
        else:
            body = self.metrics.render()
        extra = [(b"www-authenticate", b'Bearer realm="nanofleet-gateway-metrics"')] if status == 401 else []
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                                (b"cache-control", b"no-store"), *extra]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def _bearer_ok(header: bytes, token: str) -> bool:
    scheme, _, value = header.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
