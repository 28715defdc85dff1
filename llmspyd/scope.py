"""Which processes to trace, from `[trace]` settings: pure matching, no I/O besides name lookups.

`all` traces everything but `exclude_pids`. `selected` traces a process when
one selector matches: its executable, its comm, its user, a cgroup prefix, or
a systemd unit in its cgroup path. The kernel is told per cgroup (units,
cgroups: known before any process starts) and per pid (executables, comms,
users: known at exec), see app.Daemon._apply_scope.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from llmspyd.process import ProcessInfo
from llmspyd.settings import TraceSettings

CGROUP_ROOT = "/sys/fs/cgroup"


def _uid(user: str | int) -> int | None:
    if isinstance(user, int):
        return user
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


@dataclass(frozen=True, slots=True)
class Scope:
    everything: bool
    executables: frozenset[str]
    comms: frozenset[str]
    uids: frozenset[int]
    cgroups: tuple[str, ...]
    units: frozenset[str]
    excluded: frozenset[int]
    unknown_users: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, t: TraceSettings) -> Scope:
        uids, unknown = set(), []
        for u in t.users:
            uid = _uid(u)
            if uid is None:
                unknown.append(str(u))
            else:
                uids.add(uid)
        return cls(
            everything=t.scope == "all",
            executables=frozenset(t.executables),
            comms=frozenset(t.comms),
            uids=frozenset(uids),
            cgroups=tuple(c.rstrip("/") or "/" for c in t.cgroups),
            units=frozenset(t.units),
            excluded=frozenset(t.exclude_pids),
            unknown_users=tuple(unknown),
        )

    def matches(self, p: ProcessInfo) -> bool:
        if p.pid in self.excluded:
            return False
        if self.everything:
            return True
        if p.exe in self.executables or p.comm in self.comms or p.uid in self.uids:
            return True
        if p.cgroup and self.cgroup_matches(p.cgroup):
            return True
        return False

    def cgroup_matches(self, cgroup: str) -> bool:
        for prefix in self.cgroups:
            if prefix == "/" or cgroup == prefix or cgroup.startswith(prefix + "/"):
                return True
        return any(part in self.units for part in cgroup.split("/"))

    def cgroup_dirs(self, root: str = CGROUP_ROOT) -> list[str]:
        """Existing cgroup directories selected by `cgroups` and `units` (their inode is the kernel's cgroup id)."""
        out = [os.path.join(root, c.lstrip("/")) for c in self.cgroups]
        if self.units:
            for dirpath, dirnames, _ in os.walk(root):
                for d in list(dirnames):
                    if d in self.units:
                        out.append(os.path.join(dirpath, d))
                        dirnames.remove(d)  # its children are covered by the unit's verdict
        return [d for d in out if os.path.isdir(d)]
