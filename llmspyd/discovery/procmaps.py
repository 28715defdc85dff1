"""Which files a process has mapped executable, and a path the daemon can open for each.

The maps entry names a file as the process sees it, inside its own mount
namespace; the daemon lives in another one. So a path is resolved through
`/proc/PID/root/...` and accepted only when the opened file is the very inode
the maps entry names (device and inode). When the path was removed or replaced
since the mapping (" (deleted)", an upgrade, a container image layer), or when
the two views disagree, `/proc/PID/map_files/<start>-<end>` opens the mapped
file itself.

`(dev, ino)` as maps shows it is the key of a file everywhere in discovery.
On overlayfs (container images) what maps shows depends on the kernel (the
real file's device before 6.x, the overlay's with the real inode number on
6.18); a path not mapped yet is keyed the same way by mapping it in the daemon
and asking the kernel (`mapped_key`). Uprobes attach to the real inode under
the overlay whatever path names it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
from dataclasses import dataclass, field

DELETED_SUFFIX = " (deleted)"


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of /proc/PID/maps that names a file."""

    start: int
    end: int
    perms: str  # "r-xp"
    offset: int  # file offset of `start`
    dev: int  # os.makedev(major, minor)
    ino: int
    path: str  # as the process sees it, without " (deleted)"
    deleted: bool = False

    @property
    def executable(self) -> bool:
        return "x" in self.perms

    @property
    def range(self) -> str:
        """The name of this mapping under /proc/PID/map_files/."""
        return f"{self.start:x}-{self.end:x}"


@dataclass(slots=True)
class MappedFile:
    """A file a process maps with execute permission (all its mappings of it grouped)."""

    path: str  # in the process's namespace
    dev: int
    ino: int
    deleted: bool
    is_exe: bool
    ranges: list[str] = field(default_factory=list)  # map_files names of its mappings

    @property
    def key(self) -> tuple[int, int]:
        return (self.dev, self.ino)


@dataclass(frozen=True, slots=True)
class OpenedFile:
    """A path the daemon can open that is verified to be the mapped inode."""

    path: str
    dev: int  # the key, as the maps entry gives it
    ino: int
    size: int
    mtime_ns: int
    via: str  # "root": /proc/PID/root + path; "map_files": the mapping itself; "host": the path as is

    @property
    def key(self) -> tuple[int, int]:
        return (self.dev, self.ino)


def parse_maps(text: str) -> list[Mapping]:
    """Parse /proc/PID/maps text; lines without a file (heap, stack, anon) are skipped."""
    out: list[Mapping] = []
    for line in text.splitlines():
        # addr perms offset dev inode [path]; the path may contain spaces, so split 5 times
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        addr, perms, off, devs, inos, path = parts
        try:
            ino = int(inos)
            if ino == 0 or not path.startswith("/"):
                continue  # [vdso], [heap], anonymous shared memory
            lo, _, hi = addr.partition("-")
            major, _, minor = devs.partition(":")
            deleted = path.endswith(DELETED_SUFFIX)
            if deleted:
                path = path[: -len(DELETED_SUFFIX)]
            out.append(
                Mapping(
                    start=int(lo, 16),
                    end=int(hi, 16),
                    perms=perms,
                    offset=int(off, 16),
                    dev=os.makedev(int(major, 16), int(minor, 16)),
                    ino=ino,
                    path=path,
                    deleted=deleted,
                )
            )
        except ValueError:
            continue  # malformed line: skip it, the rest of the map is still good
    return out


def read_maps(pid: int) -> list[Mapping]:
    """The file-backed mappings of a live process; [] when it is gone."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return parse_maps(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return []
    except PermissionError:
        return []


def exe_key(pid: int) -> tuple[int, int] | None:
    """(dev, ino) of the main executable (stat follows the /proc/PID/exe magic link)."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def executable_files(pid: int, mappings: list[Mapping] | None = None) -> list[MappedFile]:
    """Files mapped executable by `pid`, one entry per (dev, ino), the main executable marked."""
    if mappings is None:
        mappings = read_maps(pid)
    exe = exe_key(pid)
    files: dict[tuple[int, int], MappedFile] = {}
    for m in mappings:
        if not m.executable:
            continue
        mf = files.get((m.dev, m.ino))
        if mf is None:
            mf = files[(m.dev, m.ino)] = MappedFile(
                path=m.path, dev=m.dev, ino=m.ino, deleted=m.deleted, is_exe=(m.dev, m.ino) == exe
            )
        mf.ranges.append(m.range)
    if exe is not None and exe not in files:
        # the executable maps nothing executable of its own (rare); keep it: it may carry probes' targets
        path = exe_path(pid)
        if path:
            deleted = path.endswith(DELETED_SUFFIX)
            files[exe] = MappedFile(
                path=path.removesuffix(DELETED_SUFFIX), dev=exe[0], ino=exe[1], deleted=deleted, is_exe=True
            )
    return list(files.values())


def exe_path(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def root_path(pid: int, path: str) -> str:
    """`path` as process `pid` sees it, reachable from the daemon's namespace."""
    return f"/proc/{pid}/root{path}" if path.startswith("/") else f"/proc/{pid}/cwd/{path}"


def _opened(path: str, dev: int, ino: int, via: str, *, any_dev: bool = False) -> OpenedFile | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_ino != ino or (st.st_dev != dev and not any_dev):
        return None
    return OpenedFile(path=path, dev=dev, ino=ino, size=st.st_size, mtime_ns=st.st_mtime_ns, via=via)


def open_mapped(pid: int, mf: MappedFile) -> OpenedFile | None:
    """A verified path to the inode `mf` names, or None when the process is gone."""
    if not mf.deleted:
        # the daemon's own view first: when it names the same inode (no container), that path outlives the
        # process, so an attach that happens after a short-lived process exits still finds the file
        hit = _opened(mf.path, mf.dev, mf.ino, "host")
        if hit:
            return hit
        hit = _opened(root_path(pid, mf.path), mf.dev, mf.ino, "root")
        if hit:
            return hit
    for r in mf.ranges:
        hit = _opened(f"/proc/{pid}/map_files/{r}", mf.dev, mf.ino, "map_files")
        if hit:
            return hit
    if mf.is_exe:
        hit = _opened(f"/proc/{pid}/exe", mf.dev, mf.ino, "map_files")
        if hit:
            return hit
    # Filesystems whose stat device differs from the superblock's (btrfs subvolumes) never match on dev;
    # the mapping itself is still the right inode.
    for r in mf.ranges:
        hit = _opened(f"/proc/{pid}/map_files/{r}", mf.dev, mf.ino, "map_files", any_dev=True)
        if hit:
            return hit
    return None


def open_in_root(pid: int, path: str) -> OpenedFile | None:
    """Open a path as process `pid` would (for files it has not mapped yet), keyed as maps will show it."""
    full = root_path(pid, path)
    try:
        st = os.stat(full)
    except OSError:
        return None
    via = "root"
    try:
        host = os.stat(path)
        if (host.st_dev, host.st_ino) == (st.st_dev, st.st_ino):
            full, via = path, "host"  # same file in the daemon's namespace: a path that outlives the process
    except OSError:
        pass
    if not stat.S_ISREG(st.st_mode):
        return None
    dev, ino = st.st_dev, st.st_ino
    if os.major(dev) == 0:
        # anonymous device (overlayfs of a container image, btrfs subvolume): stat's (dev, ino) may not be what
        # /proc/PID/maps will show once the process maps it; ask the kernel by mapping it ourselves
        real = mapped_key(full)
        if real is None:
            return None
        dev, ino = real
    return OpenedFile(path=full, dev=dev, ino=ino, size=st.st_size, mtime_ns=st.st_mtime_ns, via=via)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def mapped_key(path: str) -> tuple[int, int] | None:
    """(dev, ino) of `path` as /proc/PID/maps will show it once mapped (differs from stat on overlayfs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        addr = _libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
    finally:
        os.close(fd)
    if addr is None or addr == _MAP_FAILED:
        return None
    try:
        st = os.stat(f"/proc/self/map_files/{addr:x}-{addr + mmap.PAGESIZE:x}")
        return (st.st_dev, st.st_ino)
    except OSError:
        return None
    finally:
        _libc.munmap(addr, mmap.PAGESIZE)
