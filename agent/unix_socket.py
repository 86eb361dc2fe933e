"""The listening sockets of the agent, created safely.

The unix socket is made 0660 inside a 0750 folder (DESIGN.md: apps in the agent's group reach it). A socket file
left by a crash (nothing accepts on it) is replaced;
a live one means another agent is serving there, and we refuse to start rather than steal it. TCP is opt-in and
loopback only.

    SocketError                 root
    ├── AlreadyServing          a live agent owns the socket path
    └── UnsafeListen            a TCP address that is not loopback, or a path that is not a socket
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from nanofleet.agent.errors import AgentError
from nanofleet.tcp import is_loopback


class SocketError(AgentError):
    code = "socket_error"


class AlreadyServing(SocketError):
    pass


class UnsafeListen(SocketError):
    pass


def _alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:  # e.g. EAGAIN: listening but its backlog is full — it is alive
        return True
    finally:
        probe.close()


def bind_unix(path: Path, mode: int = 0o660) -> socket.socket:
    """A listening unix socket at `path` (folder 0750, socket `mode`)."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    if folder.stat().st_uid == os.getuid():
        os.chmod(folder, 0o750)  # group members may enter and connect; others may not even list it
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise UnsafeListen(f"{path} exists and is not a socket; refusing to replace it")
        if _alive(path):
            raise AlreadyServing(f"another nanofleet agent is already serving on {path}; stop it first "
                                 "or give this one a different --socket")
        path.unlink()  # stale: left by a crashed agent
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # the socket never exists with looser permissions, even for an instant
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def bind_tcp(address: str) -> socket.socket:
    """`host:port` on a loopback address only (the API has no auth of its own beyond file permissions)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not is_loopback(host) or not port.isdigit():
        raise UnsafeListen(f"tcp_listen {address!r}: only a loopback host:port is allowed (e.g. 127.0.0.1:8765)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1" if host == "localhost" else host, int(port)))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def remove_socket(path: Path, inode: int | None = None) -> None:
    """Remove our socket file — only if it is still ours (same inode as when we bound it)."""
    try:
        st = path.lstat()
        if stat.S_ISSOCK(st.st_mode) and (inode is None or st.st_ino == inode):
            path.unlink()
    except OSError:
        pass
