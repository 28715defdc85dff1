"""Which TLS stack each mapped file carries, decided once per file; which a process is covered by.

One file is analysed once: results are cached by (dev, ino, size, mtime), so
libc, ld.so and a 245 MB agent binary cost their analysis the first time any
process maps them and nothing after. Deciding a file, cheapest test first:

1. `.dynsym` exports SSL_write/SSL_read (libssl.so*, node's static OpenSSL,
   BoringSSL builds that export) -> OpenSSL or BoringSSL (told apart by
   BoringSSL-only exports); exports gnutls_record_send/recv -> GnuTLS.
2. Go build info and crypto/tls in `.gopclntab` -> golang.go_target (helper G).
3. `.symtab` defines SSL_write/SSL_read (static OpenSSL that does not export);
   OpenSSL's error file name without symbols -> Uncovered (stripped static OpenSSL).
4. BoringSSL's error file name `ssl_lib.cc` in read-only data and no symbols
   (Bun, Claude Code) -> boringssl.boringssl_target (helper H).
5. rustls strings in a Rust binary -> Uncovered: no sound plaintext hook yet.

A stack found but not probe-able is an `Uncovered` with its reason, so that
`llmspy status` names it instead of the process being silently missed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from llmspyd.chunks import Stack
from llmspyd.discovery import procmaps
from llmspyd.discovery.cgroups import container_of
from llmspyd.discovery.elfsyms import ElfImage, NotElf, open_elf
from llmspyd.discovery.target import Target, Uncovered

log = logging.getLogger(__name__)

OPENSSL_FUNCS = ("SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex", "SSL_free")
GNUTLS_FUNCS = ("gnutls_record_send", "gnutls_record_recv", "gnutls_deinit")
# other public entry points with the same first three arguments (session, buf, len), probed under the same role;
# a call that goes through both (send -> send2 via the PLT) is emitted once, at the first return
GNUTLS_ALSO = {"gnutls_record_send": ("gnutls_record_send2",), "gnutls_record_recv": ("gnutls_record_recv_seq",)}
# exported only by BoringSSL (and its forks), never by OpenSSL: tells node's OpenSSL from an exporting BoringSSL
BORINGSSL_ONLY = ("CRYPTO_BUFFER_new", "SSL_CTX_set_strict_cipher_list", "BORINGSSL_self_test")
GO_TLS_FUNC = b"crypto/tls.(*Conn).Write\0"
# BoringSSL passes this file name to its error function; OpenSSL's file is ssl_lib.c (no "c" suffix twice)
BORINGSSL_MARK = b"ssl_lib.cc\0"
# OpenSSL's own error file name (OPENSSL_FILE): a static OpenSSL whose symbols were stripped still carries it
OPENSSL_MARK = b"/ssl/ssl_lib.c\0"
# cargo registry paths of the rustls crate end up in panic locations of every build that links it
RUSTLS_MARKS = (b"/rustls-0.", b"rustls::")
RUST_MARKS = (b"/rustc/", b"RUST_BACKTRACE")
# read-only data bigger than this is searched for TLS markers by the slow workers, not at exec time
MARKER_INLINE_MAX = 16 << 20
# too many entries means something keeps producing new inodes (a build loop): drop the oldest verdicts
MAX_CACHED_FILES = 20000


@dataclass(slots=True)
class FileVerdict:
    """What one file carries. Cached; `needed` etc. serve the DT_NEEDED pre-resolution of ldso."""

    key: tuple[int, int]
    path: str
    stack: Stack = Stack.UNKNOWN  # UNKNOWN: no TLS stack found
    target: Target | None = None
    uncovered: Uncovered | None = None
    needed: list[str] = field(default_factory=list)
    rpath: list[str] = field(default_factory=list)
    runpath: list[str] = field(default_factory=list)
    is_dynamic: bool = False
    scan_s: float = 0.0
    note: str = ""  # why nothing was found, for debugging ("not ELF", ...)
    deferred: bool = False  # a slow analysis (analyse(heavy=False)) was left for later: not a verdict, not cached


@dataclass(slots=True)
class ProcessCoverage:
    """Per pid: the TLS stacks found, the probe targets covering them, and what could not be covered."""

    pid: int
    comm: str = ""
    exe: str = ""
    container: str = ""  # llmspyd.discovery.cgroups.container_of: "docker:<id>", "unit:x.service", ""
    stacks: set[Stack] = field(default_factory=set)
    targets: dict[tuple[int, int], Target] = field(default_factory=dict)
    uncovered: dict[tuple[int, int], Uncovered] = field(default_factory=dict)
    new_targets: list[Target] = field(default_factory=list)  # targets of files first analysed by this scan
    deferred: list[procmaps.OpenedFile] = field(default_factory=list)  # slow analyses left for later by this scan
    seen: set[tuple[int, int]] = field(default_factory=set)  # files already considered for this pid
    scanned_at: float = 0.0

    def merge(self, v: FileVerdict, target: Target | None = None) -> None:
        target = target or v.target
        if v.stack != Stack.UNKNOWN:
            self.stacks.add(v.stack)
        if target is not None:
            self.targets[target.key] = target
        if v.uncovered is not None:
            self.uncovered[v.key] = v.uncovered

    def summary(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "exe": self.exe,
            "container": self.container,
            "stacks": sorted(s.name.lower() for s in self.stacks),
            "targets": sorted(f"{t.path} ({t.stack.name.lower()}, {t.how})" for t in self.targets.values()),
            "uncovered": sorted(f"{u.path}: {u.reason}" for u in self.uncovered.values()),
        }


Finder = Callable[..., "Target | Uncovered | None"]


def _optional_finders() -> tuple[Finder | None, Finder | None]:
    """golang.go_target and boringssl.boringssl_target, when those modules are present and import."""
    go = boring = None
    try:
        from llmspyd.discovery import golang

        go = golang.go_target
    except Exception as e:  # noqa: BLE001 - a broken optional finder must not take discovery down
        log.debug("Go finder unavailable: %s", e)
    try:
        from llmspyd.discovery import boringssl  # type: ignore[attr-defined]

        boring = boringssl.boringssl_target
    except Exception as e:  # noqa: BLE001 - as above
        log.debug("BoringSSL finder unavailable: %s", e)
    return go, boring


class Scanner:
    """Analyse files (cached per inode) and processes; pure discovery, attaching is the caller's job.

    Thread-safe: the cache is locked; two threads asking for the same new file may both analyse it once.
    """

    def __init__(
        self, *, go_finder: Finder | None = None, boring_finder: Finder | None = None, load_optional: bool = True
    ) -> None:
        # finders given by the caller (tests) live in this process only: they cannot run in an isolated one
        self.custom_finders = go_finder is not None or boring_finder is not None or not load_optional
        if load_optional:
            go, boring = _optional_finders()
            go_finder = go_finder or go
            boring_finder = boring_finder or boring
        self.go_finder = go_finder
        self.boring_finder = boring_finder
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, int, int, int], FileVerdict] = {}
        self.self_pid = os.getpid()
        self.counters = {"files_analysed": 0, "analysis_errors": 0, "analysis_s": 0.0}

    # ---- files --------------------------------------------------------------------------------------------
    def cached(self, f: procmaps.OpenedFile) -> FileVerdict | None:
        with self._lock:
            return self._cache.get((f.dev, f.ino, f.size, f.mtime_ns))

    def analyse(self, f: procmaps.OpenedFile, *, heavy: bool = True) -> tuple[FileVerdict, bool]:
        """The verdict for an opened file, and whether it was analysed just now (not from the cache).

        heavy=False stops before the slow finders (Go: up to a second with DWARF; stripped BoringSSL: seconds on
        a 245 MB binary) and returns
        a `deferred` verdict instead, so that an exec-time scan never waits for them."""
        ckey = (f.dev, f.ino, f.size, f.mtime_ns)
        with self._lock:
            hit = self._cache.get(ckey)
        if hit is not None:
            return hit, False
        t0 = time.perf_counter()
        try:
            v = self._analyse(f, heavy)
        except Exception as e:  # a malformed file must never stop discovery of the others
            log.warning("analysis of %s failed: %s", f.path, e, exc_info=log.isEnabledFor(logging.DEBUG))
            v = FileVerdict(key=f.key, path=f.path, note=f"analysis failed: {e}")
            self.counters["analysis_errors"] += 1
        v.scan_s = time.perf_counter() - t0
        if v.deferred:
            return v, True
        with self._lock:
            if len(self._cache) >= MAX_CACHED_FILES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[ckey] = v
            self.counters["files_analysed"] += 1
            self.counters["analysis_s"] += v.scan_s
        if v.target or v.uncovered:
            log.debug("%s: %s in %.1f ms", f.path, v.stack.name, v.scan_s * 1e3)
        return v, True

    def store(self, f: procmaps.OpenedFile, v: FileVerdict) -> None:
        """Cache a verdict computed elsewhere (analyse_isolated in a worker process)."""
        with self._lock:
            self._cache[(f.dev, f.ino, f.size, f.mtime_ns)] = v
            self.counters["files_analysed"] += 1
            self.counters["analysis_s"] += v.scan_s

    def _analyse(self, f: procmaps.OpenedFile, heavy: bool = True) -> FileVerdict:
        v = FileVerdict(key=f.key, path=f.path)
        try:
            img = open_elf(f.path)
        except NotElf as e:
            v.note = str(e)
            return v
        except OSError as e:
            v.note = f"cannot open: {e}"
            return v
        with img:
            dyn = img.dynamic()
            v.needed, v.rpath, v.runpath = dyn["needed"], dyn["rpath"], dyn["runpath"]
            v.is_dynamic = img.has_section(".dynamic") or bool(v.needed)
            # shared libraries (a SONAME, no loader of their own) do not carry a stripped TLS stack in practice;
            # their data can be huge (libicudata 31 MB, libLLVM 110 MB): no string search in them
            executable = img.elf_type == "ET_EXEC" or bool(img.interpreter()) or not dyn["soname"]
            self._decide(img, f, v, heavy, executable)
        return v

    def _decide(
        self, img: ElfImage, f: procmaps.OpenedFile, v: FileVerdict, heavy: bool = True, executable: bool = True
    ) -> None:
        also = tuple(n for names in GNUTLS_ALSO.values() for n in names)
        exported = img.lookup(OPENSSL_FUNCS + GNUTLS_FUNCS + also + BORINGSSL_ONLY, tables=(".dynsym",))
        if _has_rw(exported, "SSL"):
            stack = Stack.BORINGSSL if any(n in exported for n in BORINGSSL_ONLY) else Stack.OPENSSL
            v.stack, v.target = stack, _target(f, stack, exported, OPENSSL_FUNCS, "dynsym")
            return
        if _has_rw(exported, "gnutls"):
            v.stack, v.target = Stack.GNUTLS, _target(f, Stack.GNUTLS, exported, GNUTLS_FUNCS, "dynsym")
            for role, names in GNUTLS_ALSO.items():
                v.target.offsets[role] += sorted({exported[n].offset for n in names if n in exported})
            return
        if img.is_go():
            if img.has_section(".gopclntab") and not img.contains(GO_TLS_FUNC, ".gopclntab"):
                v.note = "Go without crypto/tls"
                return
            v.stack = Stack.GOTLS
            if not heavy and self.go_finder is not None:
                v.deferred = True  # DWARF and code decoding can take a second on a binary with debug info
                return
            self._delegate(self.go_finder, "Go", v, f, (f.path, img.elf, f.dev, f.ino))
            return
        if img.has_section(".symtab"):
            static = img.lookup(OPENSSL_FUNCS + BORINGSSL_ONLY, tables=(".symtab",))
            if _has_rw(static, "SSL"):
                stack = Stack.BORINGSSL if any(n in static for n in BORINGSSL_ONLY) else Stack.OPENSSL
                v.stack, v.target = stack, _target(f, stack, static, OPENSSL_FUNCS, "symtab")
                return
        if not executable:
            return
        rodata = ".rodata" if img.has_section(".rodata") else None
        sec = img.section(rodata) if rodata else None
        if not heavy and (sec[1] if sec else img.size) > MARKER_INLINE_MAX:
            # searching 100+ MB of read-only data (Bun, Claude Code) takes ~100 ms: not on the exec-time thread
            v.deferred = True
            return
        if img.contains(OPENSSL_MARK, rodata):
            v.stack = Stack.OPENSSL
            v.uncovered = Uncovered(
                f.path,
                f.dev,
                f.ino,
                Stack.OPENSSL,
                "static OpenSSL without SSL_* symbols (stripped): functions not located",
            )
            return
        if img.contains(BORINGSSL_MARK, rodata):
            v.stack = Stack.BORINGSSL
            if not heavy and self.boring_finder is not None:
                # a binary analysed before (the finder's on-disk cache, e.g. by an earlier run or the start-up
                # prewarm) is answered now, so exec-time attach does not queue behind the slow finders
                cached = self._boring_cached(f)
                if cached is not None and self._delegate(lambda *_: cached, "stripped BoringSSL", v, f, ()):
                    return
                v.deferred = True
                return
            if self._delegate(self.boring_finder, "stripped BoringSSL", v, f, (f.path, f.dev, f.ino)):
                return
            if v.target or v.uncovered:
                return
            v.stack = Stack.UNKNOWN  # the finder says: not BoringSSL after all; go on
        if any(img.contains(m, rodata) for m in RUSTLS_MARKS) and any(img.contains(m, rodata) for m in RUST_MARKS):
            v.stack = Stack.RUSTLS
            v.uncovered = Uncovered(
                f.path,
                f.dev,
                f.ino,
                Stack.RUSTLS,
                "rustls (Rust, statically linked, no TLS symbols): no sound plaintext hook implemented",
            )

    def _boring_cached(self, f: procmaps.OpenedFile) -> Target | Uncovered | None:
        """The real BoringSSL finder's cached answer for `f`, without analysis; None when it has none."""
        try:
            from llmspyd.discovery import boringssl
        except Exception:  # noqa: BLE001 - optional finder, as in _optional_finders
            return None
        if self.boring_finder is not boringssl.boringssl_target:
            return None  # a test's own finder: no cache to consult
        res = boringssl.cached_target(f.path, f.dev, f.ino)
        return res if isinstance(res, (Target, Uncovered)) else None

    def _delegate(
        self, finder: Finder | None, what: str, v: FileVerdict, f: procmaps.OpenedFile, args: tuple[Any, ...]
    ) -> bool:
        """Ask a stack-specific finder; True when it decided (target or uncovered)."""
        if finder is None:
            v.uncovered = Uncovered(f.path, f.dev, f.ino, v.stack, f"{what}: its finder is not installed")
            return True
        try:
            res = finder(*args)
        except Exception as e:  # noqa: BLE001 - a finder bug on one binary is reported as that binary uncovered
            log.warning("%s finder failed on %s: %s", what, f.path, e)
            v.uncovered = Uncovered(f.path, f.dev, f.ino, v.stack, f"{what}: finder error: {e}")
            return True
        if isinstance(res, Target):
            v.target, v.stack = res, res.stack
            return True
        if isinstance(res, Uncovered):
            v.uncovered = res
            return True
        return False

    # ---- processes ---------------------------------------------------------------------------------------
    def scan_process(
        self, pid: int, previous: ProcessCoverage | None = None, *, heavy: bool = True
    ) -> ProcessCoverage | None:
        """Coverage of a live process from its maps; None when it is gone (or is the daemon itself).

        With `previous`, files already considered for this pid are skipped and the result extends it."""
        if pid == self.self_pid:
            return None
        files = procmaps.executable_files(pid)
        if not files:
            return None
        cov = previous or ProcessCoverage(pid=pid)
        cov.new_targets = []
        cov.deferred = []
        if not cov.comm:
            cov.comm = _read_comm(pid)
            cov.container = _read_container(pid)
        cov.exe = procmaps.exe_path(pid) or cov.exe
        for mf in files:
            if mf.key in cov.seen:
                continue
            opened = procmaps.open_mapped(pid, mf)
            if opened is None:
                continue  # gone meanwhile; a later scan retries
            v, fresh = self.analyse(opened, heavy=heavy)
            if v.deferred:
                cov.deferred.append(opened)
                continue  # not seen: the next scan asks again, by then maybe from the cache
            cov.seen.add(mf.key)
            target = None
            if v.target is not None:
                # this process's path (the cached one may belong to a process gone since), keyed as maps says
                target = replace(v.target, path=opened.path, dev=mf.dev, ino=mf.ino)
            cov.merge(v, target)
            if fresh and target is not None:
                cov.new_targets.append(target)
        cov.scanned_at = time.monotonic()
        return cov

    def scan_all(self) -> dict[int, ProcessCoverage]:
        """Every live process (the daemon's start)."""
        out = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                cov = self.scan_process(int(name))
                if cov is not None:
                    out[cov.pid] = cov
        return out

    def verdicts(self) -> list[FileVerdict]:
        with self._lock:
            return [v for v in self._cache.values() if v.target or v.uncovered]


_child_scanner: Scanner | None = None


def analyse_isolated(f: procmaps.OpenedFile) -> FileVerdict:
    """Entry point of the analysis worker process: the slow finders run there, away from the daemon's GIL
    (a pure-Python code scan of a 245 MB binary would otherwise stall exec-time work) and its address space."""
    global _child_scanner
    if _child_scanner is None:
        _child_scanner = Scanner()
    v, _ = _child_scanner.analyse(f, heavy=True)
    return v


def _has_rw(found: dict[str, Any], prefix: str) -> bool:
    if prefix == "SSL":
        return ("SSL_write" in found or "SSL_write_ex" in found) and ("SSL_read" in found or "SSL_read_ex" in found)
    return "gnutls_record_send" in found and "gnutls_record_recv" in found


def _target(f: procmaps.OpenedFile, stack: Stack, found: dict[str, Any], roles: tuple[str, ...], how: str) -> Target:
    return Target(
        path=f.path,
        dev=f.dev,
        ino=f.ino,
        stack=stack,
        offsets={r: [found[r].offset] for r in roles if r in found},
        how=how,
    )


def _read_container(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            return container_of(fh.read())
    except OSError:
        return ""


def _read_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().rstrip("\n")
    except OSError:
        return ""
