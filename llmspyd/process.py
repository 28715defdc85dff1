"""Facts about a traced process, read from /proc once and cached per pid."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(slots=True)
class ProcessInfo:
    pid: int
    comm: str = ""
    exe: str = ""
    cmdline: list[str] | None = None
    uid: int = -1
    cgroup: str = ""  # unified cgroup path, e.g. /system.slice/foo.service
    container: str = ""  # container id or unit derived from the cgroup, when there is one


def read_process(pid: int, comm: str = "") -> ProcessInfo:
    """Best effort: a process that already exited gives what is known."""
    info = ProcessInfo(pid=pid, comm=comm)
    base = f"/proc/{pid}"
    try:
        info.exe = os.readlink(f"{base}/exe")
    except OSError:
        pass
    try:
        with open(f"{base}/cmdline", "rb") as f:
            raw = f.read()
        info.cmdline = [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] or None
    except OSError:
        pass
    if not info.comm:
        try:
            with open(f"{base}/comm") as f:
                info.comm = f.read().rstrip("\n")
        except OSError:
            pass
    try:
        info.uid = os.stat(base).st_uid
    except OSError:
        pass
    try:
        with open(f"{base}/cgroup") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("0::"):
                info.cgroup = line[3:]
        from llmspyd.discovery.cgroups import container_of  # pure; imported here to keep this module light

        info.container = container_of(text)
    except OSError:
        pass
    return info
