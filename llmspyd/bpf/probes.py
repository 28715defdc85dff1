"""Bind the loaded BPF programs to files (role -> programs), and drive the kernel-side filters.

A Target (llmspyd.discovery.target) names one file and the FILE offsets of each role in it. Attaching is per
file, keyed by (dev, ino): one attach covers every process that maps the file, including ones started later.

Also a first OpenSSL finder (`openssl_target`, `OpenSslScanner`) that the full discovery scanner
(llmspyd.discovery) replaces; issue 2 needs it to capture anything at all.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llmspyd.bpf.abi import Verdict
from llmspyd.bpf.libbpf import LibbpfError, Link
from llmspyd.bpf.loader import ObjectSet, read_stats
from llmspyd.chunks import Stack
from llmspyd.discovery.target import Target

log = logging.getLogger(__name__)

# role -> [(program name, retprobe)]: the TLS programs of bpf/tls_*.bpf.c. A role whose programs are not in
# the loaded objects is skipped (e.g. `llmspy sniff` loading only the OpenSSL object).
ROLE_PROBES: dict[str, list[tuple[str, bool]]] = {
    "SSL_write": [("ssl_write_enter", False), ("ssl_rw_return", True)],
    "SSL_read": [("ssl_read_enter", False), ("ssl_rw_return", True)],
    "SSL_write_ex": [("ssl_write_ex_enter", False), ("ssl_rw_return", True)],
    "SSL_read_ex": [("ssl_read_ex_enter", False), ("ssl_rw_return", True)],
    "SSL_free": [("ssl_free_enter", False)],
    # GnuTLS: each role may list several entry points (send and send2, recv and recv_seq)
    "gnutls_record_send": [("gnutls_send_enter", False), ("gnutls_rw_return", True)],
    "gnutls_record_recv": [("gnutls_recv_enter", False), ("gnutls_rw_return", True)],
    "gnutls_deinit": [("gnutls_deinit_enter", False)],
    # Go crypto/tls: plain uprobes only, never uretprobes (Go moves stacks); go_read_ret = every RET of Read
    "go_write": [("go_write_enter", False)],
    "go_read": [("go_read_enter", False)],
    "go_read_ret": [("go_read_ret", False)],
    "go_close": [("go_close_enter", False)],
}

# programs attached once, not per file (process.bpf.c)
GLOBAL_PROGRAMS = ("sys_enter_io", "process_exec", "process_exit")

OPENSSL_ROLES = ("SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex", "SSL_free")

# struct llmspy_conn_key (bpf/common.bpf.h): tgid, dir, conn
_CONN_KEY = struct.Struct("<IIQ")


@dataclass(slots=True)
class Attachment:
    target: Target
    roles: list[str] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)


class ProbeManager:
    """Attach the programs of an ObjectSet to targets; mute connections; set process verdicts; read counters."""

    def __init__(self, objects: ObjectSet) -> None:
        self._objects = objects
        self._lock = threading.Lock()
        self._attached: dict[tuple[int, int], Attachment] = {}
        self._global_links: list[Link] = []
        self._programs = {p.name: p for p in objects.programs()}

    def attach_global(self) -> list[str]:
        """Attach the non-file programs (exec/exit events, socket learning) that are loaded."""
        names = []
        with self._lock:
            if self._global_links:
                return [lk.desc for lk in self._global_links]
            for name in GLOBAL_PROGRAMS:
                prog = self._programs.get(name)
                if prog is not None:
                    self._global_links.append(prog.attach())
                    names.append(name)
        return names

    def attach(self, target: Target) -> list[str]:
        """Attach every known role of `target`; returns the roles attached. Idempotent per (dev, ino).

        A role that fails to attach is logged and left out; the others stay.
        """
        with self._lock:
            if target.key in self._attached:
                return list(self._attached[target.key].roles)
            att = Attachment(target)
            attach = self._attach_multi if self._objects.uprobe_multi else self._attach_classic
            if not attach(target, att):
                return []
            if att.roles and target.params:
                self._apply_params(target)
            if not att.roles:
                destroy_links(att.links)  # programs of roles that failed half-way
            else:
                self._attached[target.key] = att
                log.info("attached %s in %s (%s)", ",".join(att.roles), target.path, target.stack.name)
            return list(att.roles)

    def _roles(self, target: Target) -> dict[str, tuple[list[int], list[tuple[str, bool]]]]:
        """role -> (offsets, probes) for the roles of `target` whose programs are loaded."""
        roles = {}
        for role, offsets in target.offsets.items():
            probes = ROLE_PROBES.get(role)
            if not probes or not offsets:
                continue
            if any(name not in self._programs for name, _ in probes):
                log.debug("no program loaded for role %s: skipped in %s", role, target.path)
                continue
            roles[role] = (offsets, probes)
        return roles

    def _vanished(self, target: Target, att: Attachment) -> bool:
        """The path died with its process (/proc/PID/root/...): attach nothing, so that a later scan through a
        live path attaches every role, not the ones left. Returns False for the caller to pass on."""
        log.info("%s vanished while attaching: not probed", target.path)
        destroy_links(att.links)
        att.links.clear()
        return False

    def _attach_classic(self, target: Target, att: Attachment) -> bool:
        """One perf-event uprobe per offset and program (kernels without uprobe_multi). Fills `att` with the
        roles whose probes all attached; False when the path vanished."""
        for role, (offsets, probes) in self._roles(target).items():
            links: list[Link] = []
            try:
                for off in offsets:
                    for name, ret in probes:
                        # the cookie tells shared programs which stack they serve (OpenSSL programs on BoringSSL)
                        links.append(self._programs[name].attach_uprobe(
                            target.path, offset=off, retprobe=ret, cookie=int(target.stack)))
            except (LibbpfError, OSError) as e:
                destroy_links(links)
                if e.errno == errno.ENOENT:
                    return self._vanished(target, att)
                log.warning("cannot attach %s in %s: %s", role, target.path, e)
                continue
            att.links.extend(links)
            att.roles.append(role)
        return True

    def _attach_multi(self, target: Target, att: Attachment) -> bool:
        """One uprobe_multi link per program for the whole file (all its offsets at once): no perf event per
        probe, so a fresh file is probed in ~1 ms and detached in one RCU grace period. Fills `att` with the
        roles whose programs all attached; False when the path vanished."""
        roles = self._roles(target)
        groups: dict[tuple[str, bool], list[int]] = {}
        for offsets, probes in roles.values():
            for probe in probes:
                offs = groups.setdefault(probe, [])
                offs.extend(o for o in offsets if o not in offs)
        failed: set[tuple[str, bool]] = set()
        for (name, ret), offs in groups.items():
            try:
                # the cookie tells shared programs which stack they serve (OpenSSL programs on BoringSSL)
                att.links.append(self._programs[name].attach_uprobe_multi(
                    target.path, offs, retprobe=ret, cookies=[int(target.stack)] * len(offs)))
            except (LibbpfError, OSError) as e:
                if e.errno == errno.ENOENT:
                    return self._vanished(target, att)
                log.warning("cannot attach %s in %s: %s", name, target.path, e)
                failed.add((name, ret))
        att.roles = [r for r, (_, probes) in roles.items() if not failed.intersection(probes)]
        return True

    def _apply_params(self, target: Target) -> None:
        """Numbers the probes need besides offsets: the Go fd layout (bpf/tls_gotls.bpf.c, go_fd_layouts)."""
        from llmspyd.discovery.golang import fd_layout_entry

        entry = fd_layout_entry(target.params) if target.stack == Stack.GOTLS else None
        if entry is None:
            return
        try:
            self._objects.map("go_fd_layouts").update(*entry)
        except (KeyError, LibbpfError) as e:
            log.warning("no Go fd layout for %s (fd from syscalls instead): %s", target.path, e)

    def detach(self, key: tuple[int, int]) -> bool:
        with self._lock:
            att = self._attached.pop(key, None)
        if att is None:
            return False
        destroy_links(att.links)
        return True

    def attached(self) -> dict[tuple[int, int], Attachment]:
        with self._lock:
            return dict(self._attached)

    def mute(self, pid: int, conn: int) -> None:
        """Stop capturing connection (pid, conn) in the kernel; freed with the connection (SSL_free)."""
        self._objects.map("muted").update(_CONN_KEY.pack(pid, 0, conn), b"\x01")

    def unmute(self, pid: int, conn: int) -> None:
        self._objects.map("muted").delete(_CONN_KEY.pack(pid, 0, conn))

    def set_pid_verdict(self, pid: int, verdict: Verdict | None) -> None:
        """TRACE or SKIP process `pid` whatever its cgroup says; None forgets it."""
        self._set_verdict("pid_verdict", struct.pack("<I", pid), verdict)

    def set_cgroup_verdict(self, cgroup_id: int, verdict: Verdict | None) -> None:
        """TRACE or SKIP every process in cgroup `cgroup_id` (the cgroup directory's inode number)."""
        self._set_verdict("cgroup_verdict", struct.pack("<Q", cgroup_id), verdict)

    def _set_verdict(self, map_name: str, key: bytes, verdict: Verdict | None) -> None:
        m = self._objects.map(map_name)
        if verdict is None or verdict == Verdict.UNSET:
            m.delete(key)
        else:
            m.update(key, bytes([int(verdict)]))

    def stats(self) -> dict[str, int]:
        return read_stats(self._objects.map("stats"))

    def close(self) -> None:
        with self._lock:
            atts, self._attached = list(self._attached.values()), {}
            glob_links, self._global_links = self._global_links, []
        destroy_links([lk for att in atts for lk in att.links] + glob_links)


# threads that detach at once: each uprobe detach waits for a kernel RCU grace period (~200 ms here), and
# grace periods overlap, so 100 probes take ~1 s in parallel instead of ~20 s one by one
DETACH_THREADS = 16


def destroy_links(links: list[Link]) -> None:
    if len(links) <= 1:
        for lk in links:
            lk.destroy()
        return
    with ThreadPoolExecutor(min(DETACH_THREADS, len(links)), thread_name_prefix="llmspy-detach") as ex:
        for fut in [ex.submit(lk.destroy) for lk in links]:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - one failed detach must not keep the others attached
                log.warning("detach failed: %s", e)


def cgroup2_mount() -> str | None:
    """Where the unified (v2) cgroup hierarchy is mounted: /sys/fs/cgroup, or .../unified on hybrid systems."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return None


def cgroup_id(cgroup: str) -> int | None:
    """The id the kernel reports (bpf_get_current_cgroup_id) for a v2 cgroup path such as
    /system.slice/foo.service: the inode number of its directory. None if there is no such cgroup."""
    base = cgroup2_mount()
    if base is None:
        return None
    try:
        return os.stat(os.path.join(base, cgroup.lstrip("/"))).st_ino
    except OSError:
        return None


# ---- a first OpenSSL finder: symbols -> file offsets ----


def elf_function_offsets(path: str, names: Iterable[str]) -> tuple[dict[str, int], str]:
    """FILE offsets of the defined functions `names` in ELF `path` (dynsym first, then symtab), and where found."""
    from llmspyd.discovery.elfsyms import NotElf, open_elf

    try:
        with open_elf(path) as elf:
            syms = elf.lookup(list(names))
    except (OSError, NotElf, ValueError) as e:
        log.debug("cannot read symbols of %s: %s", path, e)
        return {}, ""
    how = sorted({s.table.lstrip(".") for s in syms.values()})
    return {name: s.offset for name, s in syms.items()}, "+".join(how)


def openssl_target(path: str) -> Target | None:
    """A Target for a libssl or an executable exporting OpenSSL's SSL_* functions; None if it has none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    offsets, how = elf_function_offsets(path, OPENSSL_ROLES)
    has_write = "SSL_write" in offsets or "SSL_write_ex" in offsets
    has_read = "SSL_read" in offsets or "SSL_read_ex" in offsets
    if not (has_write and has_read):
        return None
    return Target(
        path=path,
        dev=st.st_dev,
        ino=st.st_ino,
        stack=Stack.OPENSSL,
        offsets={role: [off] for role, off in offsets.items()},
        how=how,
    )


# ---- a first scanner: which files to probe ----

_LIBSSL_RE = re.compile(r"/libssl\.so[.\d]*$")
SYSTEM_LIBSSL_GLOBS = (
    "/usr/lib/*/libssl.so*",
    "/lib/*/libssl.so*",
    "/usr/lib64/libssl.so*",
    "/usr/lib/libssl.so*",
    "/usr/local/lib*/libssl.so*",
)


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def candidate_files(pid: int) -> Iterator[tuple[str, tuple[int, int] | None]]:
    """(path the daemon can open, (dev, ino) if /proc/PID/maps said) for pid's exe and its mapped libssl*."""
    root = f"/proc/{pid}/root"
    yield f"/proc/{pid}/exe", None
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not _LIBSSL_RE.search(parts[5].rstrip("\n")):
            continue
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        yield root + parts[5].rstrip("\n"), (os.makedev(major, minor), int(parts[4]))


_PROC_ROOT_RE = re.compile(r"^/proc/\d+/root(/.*)$")


def _stable_path(path: str, key: tuple[int, int]) -> str:
    """/proc/PID/exe and /proc/PID/root/... die with PID: prefer the plain path when it is the same file here."""
    if path.endswith("/exe"):
        try:
            real = os.readlink(path)
        except OSError:
            return path
    else:
        m = _PROC_ROOT_RE.match(path)
        if m is None:
            return path
        real = m.group(1)
    try:
        st = os.stat(real)
    except OSError:
        return path
    return real if (st.st_dev, st.st_ino) == key else path


class OpenSslScanner:
    """Find OpenSSL targets: system libssl files, files mapped by running processes, new execs.

    Remembers every (dev, ino) it looked at, so a rescan only opens new files.
    """

    def __init__(self, probes: ProbeManager, *, self_pid: int | None = None) -> None:
        self._probes = probes
        self._seen: set[tuple[int, int]] = set()
        self._self_pid = os.getpid() if self_pid is None else self_pid
        self._lock = threading.Lock()
        self._pending: list[tuple[float, int]] = []
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False

    def _consider(self, path: str, key: tuple[int, int] | None) -> list[str]:
        if key is None:
            try:
                st = os.stat(path)
            except OSError:
                return []
            key = (st.st_dev, st.st_ino)
        with self._lock:
            if key in self._seen:
                return []
            self._seen.add(key)
        target = openssl_target(_stable_path(path, key))
        if target is None:
            return []
        roles = self._probes.attach(target)
        if not roles:
            with self._lock:
                self._seen.discard(key)  # try again on the next scan
        return roles

    def scan_file(self, path: str) -> list[str]:
        """Probe one library or executable now; returns its attached roles (also if attached before)."""
        try:
            st = os.stat(path)
        except OSError:
            return []
        key = (st.st_dev, st.st_ino)
        att = self._probes.attached().get(key)
        if att is not None:
            return list(att.roles)
        with self._lock:
            self._seen.discard(key)
        return self._consider(path, key)

    def scan_system(self) -> int:
        n = 0
        for pattern in SYSTEM_LIBSSL_GLOBS:
            for path in glob.glob(pattern):
                if os.path.isfile(path) and self._consider(os.path.realpath(path), None):
                    n += 1
        return n

    def scan_pid(self, pid: int) -> int:
        if pid == self._self_pid:
            return 0
        return sum(1 for path, key in candidate_files(pid) if self._consider(path, key))

    def scan_all(self) -> int:
        n = self.scan_system()
        for pid in _pids():
            n += self.scan_pid(pid)
        return n

    # exec events: the exe is there at once, its libraries a little later (the dynamic loader maps them)
    RESCAN_DELAYS = (0.0, 0.2, 1.0, 3.0)

    def on_exec(self, pid: int) -> None:
        now = time.monotonic()
        with self._cond:
            for d in self.RESCAN_DELAYS:
                self._pending.append((now + d, pid))
            self._pending.sort()
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmspy-rescan", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._pending or self._pending[0][0] > time.monotonic()):
                    timeout = (self._pending[0][0] - time.monotonic()) if self._pending else None
                    self._cond.wait(timeout)
                if self._stop:
                    return
                _, pid = self._pending.pop(0)
            try:
                self.scan_pid(pid)
            except Exception:  # a scan must never kill the watcher
                log.exception("rescan of pid %d failed", pid)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
