"""Loopback checks, port and file-descriptor helpers for `nanofleet up`, the simulator, the agent and the gateway."""

from __future__ import annotations

import contextlib
import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IPv4/IPv6 address, brackets allowed) is this machine only: the one rule for
    what may listen without TLS or a token."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def raise_nofile() -> tuple[int, int]:
    """Raise this process's open-file limit (soft) to its hard limit; children started after it inherit it.

    Thousands of MQTT connections (the simulator's devices, and the broker `nanofleet up` starts) need a socket each,
    and a soft limit of 1024 is still common. Returns the (soft, hard) limits now in force.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # a hard limit of RLIM_INFINITY some kernels refuse as soft
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
