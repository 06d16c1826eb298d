"""What a server process holds open, read from ``/proc`` (Linux): fds, sockets, memory.

Used by the fault tests and ``bench/soak.py`` to observe the gateway from outside.
"""

from __future__ import annotations

import os
from pathlib import Path


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def connections_to(pid: int, port: int) -> int:
    """TCP sockets process ``pid`` holds whose remote end is 127.0.0.1:``port`` (any state)."""
    inodes = _socket_inodes(pid)
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[9] in inodes:
                count += 1
    return count


def children(pid: int, *, cmdline_has: str = "spawn_main") -> list[int]:
    """Direct children of ``pid`` whose command line contains ``cmdline_has`` (by default
    the worker processes multiprocessing starts, e.g. uvicorn's ``--workers``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and cmdline_has.encode() in cmdline:
            found.append(int(entry))
    return sorted(found)
