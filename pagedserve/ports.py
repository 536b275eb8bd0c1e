"""Port helpers: fail fast, with the culprit named, when a port we must listen on is taken; pick a free one."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from pagedserve.errors import ConfigError


def _listener_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    return inodes


def port_owner(port: int) -> str | None:
    """'pid 1234 (python3 -m http.server)' for the process listening on `port`, where /proc tells."""
    inodes = _listener_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in targets for fd in fds):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                return f"pid {pid} ({cmd[:80]})"
        except OSError:  # gone, or not ours to read
            continue
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it): for child servers, tests and benchmarks."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int, what: str = "--port") -> None:
    """Raise ConfigError naming the port (and its owner) if we cannot bind it."""
    if not 0 < port < 65536:
        raise ConfigError(f"{what} must be in 1..65535, got {port}", param="port")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            owner = port_owner(port)
            held = f"; it is held by {owner}" if owner else ""
            raise ConfigError(f"{what} {host}:{port} is not free ({e.strerror}){held}",
                              hint="stop that process or pick another port") from None
