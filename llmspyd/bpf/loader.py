"""Load several BPF objects that share their maps (one ring buffer, one stats array, ...).

Each .bpf.o declares the maps it uses (bpf/common.bpf.h). The first object to
declare a map, by name, owns it: it is created when that object loads, and every
later object reuses its fd before loading, so all programs write to the same
kernel map. Internal maps (.rodata/.bss/.data/.kconfig) stay private to their
object: each has its own knobs and globals.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from llmspyd.bpf import abi
from llmspyd.bpf.libbpf import BPF_TRACE_UPROBE_MULTI, BpfMap, BpfObject, BpfProgram, uprobe_multi_supported

log = logging.getLogger(__name__)

OBJECTS_ENV = "LLMSPY_BPF_DIR"


# inode number of the initial pid namespace (PROC_PID_INIT_INO in include/linux/proc_ns.h)
INIT_PIDNS_INO = 0xEFFFFFFC


def pidns_knobs(ns_path: str = "/proc/self/ns/pid") -> dict[str, int]:
    """The `pidns_dev`/`pidns_ino` knobs of bpf/common.bpf.h: set when the daemon runs in a pid namespace of its
    own (a container), so that records carry the pids it can resolve in /proc; empty on the host."""
    try:
        st = os.stat(ns_path)
    except OSError:
        return {}
    if st.st_ino == INIT_PIDNS_INO:
        return {}
    return {"pidns_dev": st.st_dev, "pidns_ino": st.st_ino}


def objects_dir() -> Path:
    """Where the compiled .bpf.o files are: package data, unless $LLMSPY_BPF_DIR says otherwise."""
    env = os.environ.get(OBJECTS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "objects"


class ObjectSet:
    """Open, configure and load `paths` in order, sharing maps by name.

    `rodata` is set on every object that has that `const volatile` global.
    `max_entries` is applied to the owning object's map of that name.
    On any failure everything opened so far is closed before the error propagates.
    """

    def __init__(
        self,
        paths: list[Path],
        *,
        rodata: Mapping[str, int | bytes] = {},
        max_entries: Mapping[str, int] = {},
        uprobe_multi: bool = False,
    ) -> None:
        self._objects: list[BpfObject] = []
        self._owners: dict[str, BpfMap] = {}  # map name -> the map in its owning object
        # uprobe programs loaded for uprobe_multi links (attach_uprobe_multi), when asked and the kernel has them
        self.uprobe_multi = uprobe_multi and uprobe_multi_supported()
        try:
            self._load_all(paths, rodata, max_entries)
        except BaseException:
            self.close()
            raise

    def _load_all(self, paths: list[Path], rodata: Mapping[str, int | bytes], max_entries: Mapping[str, int]) -> None:
        used_rodata: set[str] = set()
        for path in paths:
            obj = BpfObject.open(path)
            self._objects.append(obj)
            knobs = obj.rodata_vars()
            for name, value in rodata.items():
                if name in knobs:
                    obj.set_rodata(name, value)
                    used_rodata.add(name)
            new_here: list[BpfMap] = []
            for m in obj.maps():
                if m.is_internal:
                    continue
                owner = self._owners.get(m.name)
                if owner is None:
                    if m.name in max_entries:
                        m.set_max_entries(max_entries[m.name])
                    new_here.append(m)
                else:
                    self._check_compatible(owner, m)
                    m.reuse_fd(owner.fd)
            if self.uprobe_multi:
                for prog in obj.programs():
                    if prog.section.startswith(("uprobe", "uretprobe")):
                        prog.set_expected_attach_type(BPF_TRACE_UPROBE_MULTI)
            obj.load()
            for m in new_here:
                self._owners[m.name] = m
            log.debug("loaded %s (owns maps %s)", path, [m.name for m in new_here])
        # a knob or map that no loaded object has is likely a typo, but also normal when a caller loads only
        # some of the objects (llmspy sniff without GnuTLS, say): warn, do not fail
        unknown = set(rodata) - used_rodata
        if unknown:
            log.warning("no loaded object has const volatile global(s) %s", sorted(unknown))
        missing = set(max_entries) - set(self._owners)
        if missing:
            log.warning("no loaded object has map(s) %s to resize", sorted(missing))

    @staticmethod
    def _check_compatible(owner: BpfMap, m: BpfMap) -> None:
        # libbpf would catch this at load too, but with a vaguer message
        a = (owner.type, owner.key_size, owner.value_size)
        b = (m.type, m.key_size, m.value_size)
        if a != b:
            raise ValueError(f"map {m.name}: (type, key, value) {b} in {m._obj.path} differs from {a} in {owner._obj.path}")

    @property
    def objects(self) -> list[BpfObject]:
        return list(self._objects)

    def map(self, name: str) -> BpfMap:
        """The shared map `name` (its owning object's view)."""
        try:
            return self._owners[name]
        except KeyError:
            raise KeyError(f"no map {name!r} in {[o.path for o in self._objects]}") from None

    def program(self, name: str) -> BpfProgram:
        for obj in self._objects:
            for p in obj.programs():
                if p.name == name:
                    return p
        raise KeyError(f"no program {name!r} in {[o.path for o in self._objects]}")

    def programs(self) -> list[BpfProgram]:
        return [p for obj in self._objects for p in obj.programs()]

    def close(self) -> None:
        # later objects hold dups of earlier maps' fds: close in reverse
        for obj in reversed(self._objects):
            obj.close()
        self._objects.clear()
        self._owners.clear()

    def __enter__(self) -> ObjectSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_stats(stats_map: BpfMap) -> dict[str, int]:
    """Sum the per-CPU array "stats" (u64 per llmspyd.bpf.abi.Stat) over CPUs: {"lost_records": n, ...}."""
    out: dict[str, int] = {}
    for stat in abi.Stat:
        if stat >= stats_map.max_entries:
            break
        values = stats_map.lookup_percpu(struct.pack("<I", stat))
        out[stat.name.lower()] = sum(struct.unpack_from("<Q", v)[0] for v in values)
    return out
