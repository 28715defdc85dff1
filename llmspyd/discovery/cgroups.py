"""Which container (or systemd unit) a process runs in, from the text of /proc/PID/cgroup.

Pure. Container engines name their cgroups after the container id, under both
cgroup drivers:
  docker      /system.slice/docker-<id>.scope          /docker/<id>
  podman      /machine.slice/libpod-<id>.scope         /libpod_parent/libpod-<id>
  containerd  .../cri-containerd-<id>.scope            /kubepods/.../<id>
  cri-o       .../crio-<id>.scope
  nspawn      /machine.slice/systemd-nspawn@<name>.service, /machine.slice/machine-<name>.scope
  lxc         /lxc.payload.<name>/...                  /lxc/<name>
Without a container, the systemd unit (`unit:sshd.service`) identifies the
process's service. The unified hierarchy (0::) is preferred; on a hybrid
host where it is "/", the v1 name=systemd and other hierarchies are used.
"""

from __future__ import annotations

import re

SHORT_ID = 12  # docker's short id length: enough to be unique on a host, short enough for a record

_ID = r"([0-9a-f]{32,64})"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("docker", re.compile(rf"(?:^|/)docker-{_ID}\.scope(?:/|$)")),
    ("docker", re.compile(rf"(?:^|/)docker/{_ID}(?:/|$)")),
    ("podman", re.compile(rf"(?:^|/)libpod-(?!conmon-){_ID}\.scope(?:/|$)")),
    ("podman", re.compile(rf"(?:^|/)libpod-(?!conmon-){_ID}(?:/|$)")),
    ("containerd", re.compile(rf"(?:^|/)cri-containerd-{_ID}\.scope(?:/|$)")),
    ("cri-o", re.compile(rf"(?:^|/)crio-(?!conmon-){_ID}\.scope(?:/|$)")),
    ("containerd", re.compile(rf"(?:^|/)kubepods[^/]*/(?:[^/]+/)*{_ID}(?:/|$)")),
)
_NSPAWN = (
    re.compile(r"(?:^|/)systemd-nspawn@([^/]+)\.service(?:/|$)"),
    re.compile(r"(?:^|/)machine-([^/]+)\.scope(?:/|$)"),
)
_LXC = (re.compile(r"(?:^|/)lxc\.payload\.([^/]+)"), re.compile(r"^/lxc/([^/]+)"))
_UNIT = re.compile(r"([^/]+\.(?:service|scope))(?:/|$)")


def _unescape(name: str) -> str:
    """systemd escapes '-' in machine names as \\x2d."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), name)


def container_of_path(path: str) -> str:
    """ "docker:<id12>", "nspawn:<name>", "unit:<name>", ... for one cgroup path; "" when nothing applies."""
    for engine, pat in _PATTERNS:
        m = pat.search(path)
        if m:
            return f"{engine}:{m.group(1)[:SHORT_ID]}"
    for pat in _NSPAWN:
        m = pat.search(path)
        if m:
            return f"nspawn:{_unescape(m.group(1))}"
    for pat in _LXC:
        m = pat.search(path)
        if m:
            return f"lxc:{m.group(1)}"
    units = _UNIT.findall(path)
    if units:
        # the innermost unit; user@1000.service/app.slice/foo.service -> foo.service
        return f"unit:{units[-1]}"
    return ""


def container_of(cgroup_text: str) -> str:
    """Container or unit from the whole /proc/PID/cgroup text (unified line first, then v1 lines)."""
    unified, others = "", []
    for line in cgroup_text.splitlines():
        hid, _, rest = line.partition(":")
        _, _, path = rest.partition(":")
        if hid == "0":
            unified = path
        else:
            others.append(path)
    for path in ([unified] if unified else []) + others:
        found = container_of_path(path)
        if found and not found.startswith("unit:"):
            return found
    for path in ([unified] if unified else []) + others:
        found = container_of_path(path)
        if found:
            return found
    return ""
