"""Resolve a program's DT_NEEDED libraries the way the dynamic loader will, before it does.

The exec event arrives while the new image has only the executable and ld.so
mapped; its libraries appear in /proc/PID/maps a few hundred microseconds to
milliseconds later, and a short-lived client may make its first TLS call soon
after. Resolving the dependency list ourselves (inside the process's root, so
containers get their own libraries) lets libssl be probed before it is even
mapped.

Search order, as glibc's ld.so (man 8 ld.so): DT_RPATH (only when there is no
DT_RUNPATH), LD_LIBRARY_PATH, DT_RUNPATH, /etc/ld.so.cache, default dirs.
Candidates of another ELF class or machine are skipped, as ld.so does.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable

from llmspyd.discovery import procmaps

LD_CACHE = "/etc/ld.so.cache"
LD_CACHE_MAGIC = b"glibc-ld.so.cache1.1"
LD_CACHE_OLD_MAGIC = b"ld.so-1.7.0"
# struct cache_file_new: magic+version (20), nlibs, len_strings, flags(1)+pad(3), extension_offset, unused[3]
LD_CACHE_HEADER = struct.Struct("<20sII4sI12x")
# struct file_entry_new: flags, key, value, osversion, hwcap
LD_CACHE_ENTRY = struct.Struct("<iIIIQ")
LD_CACHE_OLD_ENTRY_SIZE = 12  # struct file_entry: flags, key, value
DEFAULT_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)
# a dependency closure deeper than this is not a real program (and would cost too much at exec time)
MAX_CLOSURE = 512
# bytes of /proc/PID/environ read to find LD_LIBRARY_PATH
MAX_ENVIRON = 1 << 20


def parse_ld_cache(data: bytes) -> dict[str, list[str]]:
    """soname -> paths, in cache order (best first), from the bytes of /etc/ld.so.cache; {} if unreadable."""
    start = 0
    if data.startswith(LD_CACHE_OLD_MAGIC):
        # old format first, then the new one aligned to 8 bytes
        if len(data) < 16:
            return {}
        (nlibs,) = struct.unpack_from("<I", data, 12)
        start = 16 + nlibs * LD_CACHE_OLD_ENTRY_SIZE
        start = (start + 7) & ~7
    if data[start : start + len(LD_CACHE_MAGIC)] != LD_CACHE_MAGIC or len(data) < start + LD_CACHE_HEADER.size:
        return {}
    _, nlibs, _, _, _ = LD_CACHE_HEADER.unpack_from(data, start)
    out: dict[str, list[str]] = {}
    pos = start + LD_CACHE_HEADER.size
    for _ in range(nlibs):
        if pos + LD_CACHE_ENTRY.size > len(data):
            break
        _, key, value, _, _ = LD_CACHE_ENTRY.unpack_from(data, pos)
        pos += LD_CACHE_ENTRY.size
        # string offsets are from the start of the new-format header (which is the file start in 1.1-only caches)
        name, path = _cstr(data, start + key), _cstr(data, start + value)
        if name and path:
            out.setdefault(name, []).append(path)
    return out


def _cstr(data: bytes, at: int) -> str:
    if not 0 <= at < len(data):
        return ""
    end = data.find(b"\0", at)
    return data[at : end if end >= 0 else len(data)].decode("utf-8", "replace")


def elf_ident(path: str) -> tuple[int, int] | None:
    """(EI_CLASS, e_machine) of an ELF file, None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    little = head[5] == 1
    (machine,) = struct.unpack_from("<H" if little else ">H", head, 18)
    return head[4], machine


class LdCaches:
    """/etc/ld.so.cache per process root (mount namespaces have their own), reread when it changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, int, int, int], dict[str, list[str]]] = {}

    def get(self, pid: int) -> dict[str, list[str]]:
        path = procmaps.root_path(pid, LD_CACHE)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                with self._lock:
                    hit = self._cache.get(key)
                if hit is not None:
                    return hit
                parsed = parse_ld_cache(f.read())
        except OSError:
            return {}
        with self._lock:
            self._cache[key] = parsed
        return parsed


def ld_library_path(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read(MAX_ENVIRON)
    except OSError:
        return []
    for var in env.split(b"\0"):
        if var.startswith(b"LD_LIBRARY_PATH="):
            return [d for d in var[16:].decode("utf-8", "replace").split(":") if d]
    return []


def _expand(dirs: list[str], origin: str) -> list[str]:
    out = []
    for entry in dirs:
        for d in entry.split(":"):
            if not d:
                continue
            d = d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
            out.append(d)
    return out


class Resolver:
    """Find a library by name for one process, as its dynamic loader would, inside the process's root."""

    def __init__(self, pid: int, caches: LdCaches, ident: tuple[int, int] | None) -> None:
        self.pid = pid
        self.ident = ident  # (class, machine) of the executable: candidates must match
        self._cache = caches.get(pid)
        self._env_dirs = ld_library_path(pid)

    def resolve(self, name: str, origin: str, rpath: list[str], runpath: list[str]) -> str | None:
        """Path of `name` inside the process's namespace (not yet through /proc/PID/root), or None."""
        if "/" in name:
            return name if self._fits(name) else None
        dirs: list[str] = []
        if not runpath:
            dirs += _expand(rpath, origin)
        dirs += self._env_dirs
        dirs += _expand(runpath, origin)
        for d in dirs:
            cand = f"{d.rstrip('/')}/{name}"
            if self._fits(cand):
                return cand
        for cand in self._cache.get(name, []):
            if self._fits(cand):
                return cand
        for d in DEFAULT_DIRS:
            cand = f"{d}/{name}"
            if self._fits(cand):
                return cand
        return None

    def _fits(self, ns_path: str) -> bool:
        ident = elf_ident(procmaps.root_path(self.pid, ns_path))
        return ident is not None and (self.ident is None or ident == self.ident)


DynamicInfo = Callable[[procmaps.OpenedFile], "tuple[list[str], list[str], list[str]] | None"]
"""(needed, rpath, runpath) of an opened file, or None when it is not a dynamic ELF (cached by the caller)."""


def needed_closure(
    pid: int,
    exe_ns_path: str,
    exe_file: procmaps.OpenedFile,
    dynamic_info: DynamicInfo,
    caches: LdCaches,
) -> list[tuple[str, procmaps.OpenedFile]]:
    """Every library the loader will map for the executable: (path in the namespace, opened file), breadth first."""
    resolver = Resolver(pid, caches, elf_ident(exe_file.path))
    out: list[tuple[str, procmaps.OpenedFile]] = []
    seen_names: set[str] = set()
    seen_keys: set[tuple[int, int]] = {exe_file.key}
    queue: list[tuple[str, procmaps.OpenedFile]] = [(exe_ns_path, exe_file)]
    exe_info = dynamic_info(exe_file)
    exe_rpath = exe_info[1] if exe_info else []
    while queue and len(out) < MAX_CLOSURE:
        ns_path, opened = queue.pop(0)
        info = dynamic_info(opened)
        if info is None:
            continue
        needed, rpath, runpath = info
        origin = os.path.dirname(ns_path)
        for name in needed:
            if name in seen_names:
                continue
            seen_names.add(name)
            # DT_RPATH of the executable applies to every object without a DT_RUNPATH
            found = resolver.resolve(name, origin, rpath + ([] if runpath else exe_rpath), runpath)
            if found is None:
                continue
            lib = procmaps.open_in_root(pid, found)
            if lib is None or lib.key in seen_keys:
                continue
            seen_keys.add(lib.key)
            out.append((found, lib))
            queue.append((found, lib))
    return out
