"""The gRPC target and service config for the cloud route's gateways — pure, so every address rule is unit-tested.

Several gateways share one channel: gRPC's `round_robin` policy spreads calls over them and client-side health
checking (the `healthCheckConfig` of the service config: a `grpc.health.v1.Health/Watch` stream per connection, on
the `nanofleet.v1.Inference` service the gateway reports) takes a dead or NOT_SERVING gateway out of the rotation,
and puts it back when it serves again.

What gRPC's resolvers allow, and so what `gateway_addresses` allows:

- one entry: any target gRPC takes (`host:port`, `dns:///host:port`, `unix:/path`). A DNS name with several A/AAAA
  records is several gateways too: round robin spreads over every address the name resolves to; TLS verifies that
  name. This is the form for gateways behind one name.
- several entries: IP literals of one family, joined into gRPC's static `ipv4:a:p,b:p` / `ipv6:[a]:p,[b]:p` list
  (its resolvers take no host names). With TLS the channel's authority is then no host name, so the certificate's
  name is given apart (`gateway_tls_name`) and set as the channel's default authority.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

INFERENCE_SERVICE = "nanofleet.v1.Inference"

# round robin over every gateway, each checked by the standard health service of the Inference service
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": INFERENCE_SERVICE},
})
# without the health check: the probe channel that asks a gateway why it failed (a NOT_SERVING one included)
PROBE_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def _split(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected IP:port, got {address!r}")
    try:
        ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        raise ValueError(f"{address!r}: several gateways must be IP addresses (gRPC's ipv4:/ipv6: address "
                         "lists take no host names); for gateways behind one DNS name, give that name alone: "
                         "round robin covers every address it resolves to") from None
    return ip, int(port)


def channel_target(addresses: Sequence[str]) -> str:
    """The gRPC target for these gateways; ValueError says which entry is wrong and why."""
    if not addresses:
        raise ValueError("at least one address is required")
    if len(addresses) == 1:
        if not addresses[0].strip():
            raise ValueError("empty address")
        return addresses[0]
    parsed = [_split(a) for a in addresses]
    if len(set(parsed)) != len(parsed):
        raise ValueError("an address is listed twice")
    versions = {ip.version for ip, _ in parsed}
    if len(versions) > 1:
        raise ValueError("IPv4 and IPv6 addresses cannot be mixed in one list (gRPC's ipv4: and ipv6: lists are "
                         "separate); use one family, or one DNS name with A and AAAA records")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in parsed)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in parsed)
