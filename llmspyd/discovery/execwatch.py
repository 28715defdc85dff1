"""Exec and exit events -> scans -> probes attached, before a new program's first TLS call.

At the exec event the new image has only its executable and ld.so mapped. So,
in order:

1. the executable is analysed at once (a Go binary or Bun carries its TLS);
2. its DT_NEEDED closure is resolved as ld.so will resolve it (ldso.py) and
   every library found is analysed and probed, so libssl is probed before it
   is even mapped; so are the TLS libraries commonly dlopen()ed (DLOPEN_LIKELY),
   resolved the same way in the process's root;
3. /proc/PID/maps is read again a few times over the first second
   (RESCAN_DELAYS) for libraries opened with dlopen() (Python loads _ssl,
   hence libssl, on first `import ssl`).

Attaching is per file: a file probed once covers every process mapping it.
Files are keyed by inode, so a library replaced at the same path (an upgrade)
is a new file, probed when a process maps it or resolves it, and also found
by the periodic sweep, which checks that each probed path still names the
probed inode.

All work happens on worker threads: `on_event`/`on_exec` only enqueue, so
the pipeline thread that calls them never waits for an attach. Exec-time work
runs on one thread and never waits for a slow analysis (a stripped BoringSSL
fingerprint takes seconds on a 245 MB binary): those go to a second thread,
and their probes are attached when they are done.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from llmspyd.chunks import ProcessExec, ProcessExit, Stack
from llmspyd.discovery import ldso, procmaps
from llmspyd.discovery.scanner import FileVerdict, ProcessCoverage, Scanner, analyse_isolated
from llmspyd.discovery.target import Target, Uncovered
from llmspyd.process import read_process

log = logging.getLogger(__name__)

# after exec: when to read maps again for dlopen()ed libraries (seconds). Dense first: most clients load their
# TLS library within tens of ms; the last catches slow starters (Python imports ssl late)
RESCAN_DELAYS = (0.005, 0.02, 0.06, 0.15, 0.4, 1.0, 2.5)
# TLS libraries programs load with dlopen() rather than link (Python's _ssl, curl plugins, ...): resolved in the
# process's root at exec like DT_NEEDED entries, so a container's own libssl is probed before the dlopen
DLOPEN_LIKELY = ("libssl.so.3", "libssl.so.1.1", "libgnutls.so.30")
# threads for the slow finders (Go, stripped BoringSSL): two, so that a Go client's analysis (~1 s at worst)
# does not queue behind a 245 MB Bun binary's (seconds)
SLOW_WORKERS = 2
# a slow analysis that takes longer than this is given up (the file is reported uncovered): a 245 MB Bun
# binary takes a few seconds here
SLOW_TIMEOUT_S = 120.0
# an exec whose discovery work takes longer is logged with its time breakdown
SLOW_EXEC_LOG_MS = 100
# every process is re-read this often: catches anything an event missed (lost exec records) and replaced files
SWEEP_INTERVAL_S = 10.0
# attach failures are retried this many times (a path may vanish between the scan and the attach)
MAX_ATTACH_TRIES = 3
# uncovered programs remembered after they exit, for `llmspy status` (one entry per executable)
MAX_UNCOVERED_SEEN = 64

Attach = Callable[[Target], list[str]]
Detach = Callable[[tuple[int, int]], bool]
ScopeFn = Callable[[int, str, str, int, str], bool]  # (pid, exe, comm, uid, cgroup) -> trace it?


@dataclass(slots=True)
class Attached:
    target: Target
    roles: list[str]
    ns_path: str = ""  # the file's path inside the namespace of `pid`, for the replaced-file check
    pid: int = 0
    attached_at: float = 0.0


@dataclass(slots=True)
class _State:
    coverage: dict[int, ProcessCoverage] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)  # out of scope
    in_scope: set[int] = field(default_factory=set)  # decided in scope (until its next exec)
    attached: dict[tuple[int, int], Attached] = field(default_factory=dict)
    attaching: set[tuple[int, int]] = field(default_factory=set)  # attach calls in flight
    failed: dict[tuple[int, int], tuple[int, str]] = field(default_factory=dict)  # key -> (tries, error)
    exec_ts: dict[int, float] = field(default_factory=dict)  # pid -> monotonic time of its exec event
    # programs seen with a TLS stack we could not cover, kept after they exit (most agents are short-lived),
    # newest last: exe -> {"comm", "container", "reasons", "last_pid", "seen"}
    uncovered_seen: dict[str, dict[str, Any]] = field(default_factory=dict)


class ExecWatcher:
    """Owns per-pid coverage; calls `attach(target)` (ProbeManager.attach) for each file worth probing."""

    def __init__(
        self,
        attach: Attach,
        *,
        scanner: Scanner | None = None,
        scope: ScopeFn | None = None,
        detach: Detach | None = None,
        rescan_delays: tuple[float, ...] = RESCAN_DELAYS,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        on_attached: Callable[[int, Target, list[str], float], None] | None = None,
        isolate_slow: bool = True,
        prewarm_dirs: tuple[str, ...] = (),
    ) -> None:
        self.prewarm_dirs = prewarm_dirs
        self._attach = attach
        self._detach = detach
        self.scanner = scanner or Scanner()
        self.scope = scope
        self.rescan_delays = rescan_delays
        self.sweep_interval_s = sweep_interval_s
        self.on_attached = on_attached  # (pid, target, roles, seconds since that pid's exec): for the bench
        self._ld = ldso.LdCaches()
        self._st = _State()
        self._lock = threading.RLock()  # guards _st; held by the worker only while it updates state
        self._cond = threading.Condition(threading.Lock())
        # exec/exit events, handled first and in order; rescans wait in a heap by due time behind them, so a
        # burst of rescans (7 per exec) never delays the next exec's scan
        self._events: collections.deque[tuple[str, int]] = collections.deque()
        self._queue: list[tuple[float, int, str, int]] = []  # (due, seq, "rescan", pid)
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._slow_threads: list[threading.Thread] = []
        self._slow: queue.Queue[tuple[int, procmaps.OpenedFile] | None] = queue.Queue()
        self._slow_pending: dict[tuple[int, int], list[int]] = {}  # file key -> pids waiting for its verdict
        # slow finders run in worker processes unless the scanner carries in-process (test) finders
        self._isolate = isolate_slow and not self.scanner.custom_finders
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pool_ok = False
        self._exec_notes: list[
            str
        ] = []  # a worker has answered once: a broken pool after that is a crash, not a setup issue
        self._stop = False
        self.counters = {
            "execs": 0,
            "exits": 0,
            "scans": 0,
            "attached": 0,
            "attach_failed": 0,
            "predicted": 0,
            "replaced": 0,
            "out_of_scope": 0,
            "detached": 0,
            "exec_work_ms": 0.0,
            "exec_work_max_ms": 0.0,
        }

    @classmethod
    def for_probes(cls, probes: Any, **kw: Any) -> ExecWatcher:
        """Wire to a ProbeManager (llmspyd.bpf.probes)."""
        return cls(probes.attach, detach=getattr(probes, "detach", None), **kw)

    # ---- events (any thread; never blocks on a scan) ---------------------------------------------------------
    def on_event(self, ev: object) -> None:
        if isinstance(ev, ProcessExec):
            self.on_exec(ev.pid)
        elif isinstance(ev, ProcessExit):
            self.on_exit(ev.pid)

    def on_exec(self, pid: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._st.exec_ts[pid] = now
        self._push(now, "exec", pid)

    def on_exit(self, pid: int) -> None:
        self._push(time.monotonic(), "exit", pid)

    def _push(self, due: float, kind: str, pid: int) -> None:
        with self._cond:
            self._events.append((kind, pid))
            self._cond.notify()
        self.start()

    # ---- synchronous entry points ------------------------------------------------------------------------------
    def scan_all(self) -> int:
        """Probe the system's TLS libraries and scan every live process (daemon start); returns how many files
        are probed. Starts the worker."""
        self.probe_system_libraries()
        if self.prewarm_dirs:
            threading.Thread(
                target=self.probe_installed, args=(self.prewarm_dirs,), name="llmspy-prewarm", daemon=True
            ).start()
        for name in os.listdir("/proc"):
            if name.isdigit():
                self._scan(int(name), predict=False)
        self.start()
        with self._lock:
            return len(self._st.attached)

    def probe_installed(self, dirs: tuple[str, ...]) -> int:
        """Probe the TLS-carrying executables installed in `dirs` (node, bun, claude, Go tools, ...) before they
        ever run: an exec-time attach costs 15-230 ms here (kernel uprobe registration), longer than a short
        agent takes to send its first request. Runs on its own thread at start; slow finders are deferred to
        their workers as at exec. Returns how many files it probed."""
        me = os.getpid()
        seen: set[tuple[int, int]] = set()
        n = 0
        for d in dirs:
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            for name in names:
                if self._stop:
                    return n
                path = os.path.realpath(os.path.join(d, name))  # npm bins are symlinks into node_modules
                if not _is_elf(path):
                    continue
                f = procmaps.open_in_root(me, path)
                if f is None or f.key in seen:
                    continue
                seen.add(f.key)
                try:
                    v, _ = self.scanner.analyse(f, heavy=False)
                except Exception:  # noqa: BLE001 - one odd file must not stop the others
                    log.debug("prewarm: analysis of %s failed", path, exc_info=True)
                    continue
                if v.target is not None:
                    n += self._ensure(me, replace(v.target, path=f.path), path)
                elif v.deferred:
                    self._defer(me, [f])
        self.counters["prewarmed"] = n
        return n

    def probe_system_libraries(self) -> int:
        """The daemon's own root's TLS libraries (DLOPEN_LIKELY via ld.so.cache): probed before any client
        runs, so the first request of a process started right after the daemon needs no exec-time attach."""
        me = os.getpid()
        resolver = ldso.Resolver(me, self._ld, ldso.elf_ident("/proc/self/exe"))
        n = 0
        for name in DLOPEN_LIKELY:
            found = resolver.resolve(name, "/", [], [])
            lib = procmaps.open_in_root(me, found) if found else None
            if lib is None:
                continue
            v, _ = self.scanner.analyse(lib)
            if v.target is not None:
                n += self._ensure(me, replace(v.target, path=lib.path, dev=lib.dev, ino=lib.ino), found or "")
        return n

    def reset_scope(self) -> None:
        """Forget per-pid scope decisions (after the scope configuration changed); the next scans ask again."""
        with self._lock:
            self._st.skipped.clear()
            self._st.in_scope.clear()
            for cov in self._st.coverage.values():
                cov.seen.clear()  # files of a process now in scope get considered again

    def scan_pid(self, pid: int) -> ProcessCoverage | None:
        self._scan(pid, predict=False)
        with self._lock:
            return self._st.coverage.get(pid)

    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._stop:
                return
            self._thread = threading.Thread(target=self._run, name="llmspy-discovery", daemon=True)
            self._thread.start()
            if self._isolate:
                self._pool = _new_pool()
            for i in range(SLOW_WORKERS):
                t = threading.Thread(target=self._run_slow, name=f"llmspy-discovery-slow{i}", daemon=True)
                t.start()
                self._slow_threads.append(t)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
            threads = (self._thread, *self._slow_threads)
        for _ in self._slow_threads:
            self._slow.put(None)
        for t in threads:
            if t is not None and t is not threading.current_thread():
                t.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def idle(self) -> bool:
        """No work due now (for tests and the bench: wait until the exec work is done)."""
        with self._cond:
            fast_idle = not self._events and (not self._queue or self._queue[0][0] > time.monotonic())
        with self._lock:
            return fast_idle and not self._slow_pending

    def _run_slow(self) -> None:
        while True:
            item = self._slow.get()
            if item is None:
                return
            pid, opened = item
            try:
                self._slow_one(pid, opened)
            except Exception:
                log.exception("slow analysis of %s failed", opened.path)
            finally:
                with self._lock:
                    self._slow_pending.pop(opened.key, None)

    def _slow_analyse(self, opened: procmaps.OpenedFile) -> FileVerdict:
        pool = self._pool
        if pool is None:
            return self.scanner.analyse(opened, heavy=True)[0]
        try:
            v = pool.submit(analyse_isolated, opened).result(timeout=SLOW_TIMEOUT_S)
            self._pool_ok = True
        except concurrent.futures.TimeoutError:
            v = FileVerdict(key=opened.key, path=opened.path, note="analysis timed out")
            v.uncovered = Uncovered(
                opened.path, opened.dev, opened.ino, Stack.UNKNOWN, f"analysis took longer than {SLOW_TIMEOUT_S:.0f} s"
            )
        except concurrent.futures.process.BrokenProcessPool as e:
            pool.shutdown(wait=False, cancel_futures=True)
            if not self._pool_ok:
                # the workers never started (e.g. an unguarded __main__ that multiprocessing re-imports):
                # analyse here from now on
                log.warning("analysis worker processes unavailable (%s): slow finders run in the daemon", e)
                with self._cond:
                    self._pool = None
                return self.scanner.analyse(opened, heavy=True)[0]
            # the worker died on this file (a finder crashed): report the file, start a fresh pool
            with self._cond:
                if self._pool is pool and not self._stop:
                    self._pool = _new_pool()
            v = FileVerdict(key=opened.key, path=opened.path, note="analysis crashed")
            v.uncovered = Uncovered(opened.path, opened.dev, opened.ino, Stack.UNKNOWN, f"analysis crashed: {e}")
        self.scanner.store(opened, v)
        return v

    def _slow_one(self, pid: int, opened: procmaps.OpenedFile) -> None:
        v = self._slow_analyse(opened)
        target = replace(v.target, path=opened.path) if v.target is not None else None
        with self._lock:
            pids = list(self._slow_pending.get(opened.key, [pid]))
            for p in pids:
                cov = self._st.coverage.get(p)
                if cov is not None:
                    cov.merge(v, target)
                    cov.seen.add(opened.key)
        if target is not None:
            self._ensure(pid, target, _ns_path_of(pid, target))

    def _defer(self, pid: int, files: list[procmaps.OpenedFile]) -> None:
        for f in files:
            with self._lock:
                waiting = self._slow_pending.get(f.key)
                if waiting is not None:
                    if pid not in waiting:
                        waiting.append(pid)
                    continue
                self._slow_pending[f.key] = [pid]
            self._slow.put((pid, f))

    # ---- worker ------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_interval_s
        while True:
            item: tuple[str, int] | None = None
            with self._cond:
                while not self._stop and not self._events:
                    now = time.monotonic()
                    due = self._queue[0][0] if self._queue else next_sweep
                    if due <= now or next_sweep <= now:
                        break
                    self._cond.wait(min(due, next_sweep) - now)
                if self._stop:
                    return
                if self._events:
                    item = self._events.popleft()
                elif self._queue and self._queue[0][0] <= time.monotonic():
                    _, _, kind, pid = heapq.heappop(self._queue)
                    item = (kind, pid)
            try:
                if item is None:
                    self._sweep()
                    next_sweep = time.monotonic() + self.sweep_interval_s
                else:
                    kind, pid = item
                    if kind == "exec":
                        t0 = time.perf_counter()
                        self._exec_notes = []
                        self._exec(pid)
                        ms = (time.perf_counter() - t0) * 1e3
                        if ms > SLOW_EXEC_LOG_MS:
                            log.info("exec of pid %d took %.0f ms: %s", pid, ms, "; ".join(self._exec_notes))
                        self.counters["exec_work_ms"] += ms
                        self.counters["exec_work_max_ms"] = max(self.counters["exec_work_max_ms"], ms)
                    elif kind == "rescan":
                        self._scan(pid, predict=False)
                    elif kind == "exit":
                        self._exit(pid)
            except Exception:  # discovery must outlive any one process or file
                log.exception("discovery work item %s failed", item)

    def _note(self, what: str, t0: float, detail: str = "") -> None:
        """Per-exec time breakdown (worker thread only), logged when an exec's work is slow."""
        if threading.current_thread() is self._thread:
            ms = (time.perf_counter() - t0) * 1e3
            self._exec_notes.append(f"{what} {ms:.0f} ms {detail}".rstrip())

    def _exec(self, pid: int) -> None:
        self.counters["execs"] += 1
        with self._lock:
            # exec replaces the image: what the old one mapped is no longer its coverage
            self._forget_coverage(pid)
            self._st.skipped.discard(pid)
            self._st.in_scope.discard(pid)
        self._scan(pid, predict=True)
        t0 = time.monotonic()
        with self._cond:
            for d in self.rescan_delays:
                heapq.heappush(self._queue, (t0 + d, next(self._seq), "rescan", pid))
            self._cond.notify()

    def _exit(self, pid: int) -> None:
        self.counters["exits"] += 1
        with self._lock:
            self._forget_coverage(pid)
            self._st.skipped.discard(pid)
            self._st.in_scope.discard(pid)
            self._st.exec_ts.pop(pid, None)
        with self._cond:  # pending rescans of a dead pid would only find nothing
            if any(q[3] == pid for q in self._queue):
                self._queue = [q for q in self._queue if q[3] != pid]
                heapq.heapify(self._queue)

    def _forget_coverage(self, pid: int) -> None:
        """Drop a pid's coverage (exit or exec); an uncovered program stays listed in uncovered_seen. Lock held."""
        cov = self._st.coverage.pop(pid, None)
        if cov is None or not cov.uncovered or not cov.stacks:
            return
        seen = self._st.uncovered_seen
        key = cov.exe or cov.comm
        seen.pop(key, None)
        seen[key] = {
            "comm": cov.comm,
            "container": cov.container,
            "reasons": sorted({u.reason for u in cov.uncovered.values()}),
            "last_pid": pid,
            "seen": time.time(),
        }
        while len(seen) > MAX_UNCOVERED_SEEN:
            seen.pop(next(iter(seen)))

    def _in_scope(self, pid: int) -> bool:
        if self.scope is None:
            return True
        with self._lock:
            if pid in self._st.skipped:
                return False
            if pid in self._st.in_scope:
                return True
        info = read_process(pid)
        ok = bool(self.scope(pid, info.exe, info.comm, info.uid, info.cgroup))
        with self._lock:
            if ok:
                self._st.in_scope.add(pid)
            else:
                self.counters["out_of_scope"] += 1
                self._st.skipped.add(pid)
        return ok

    def _scan(self, pid: int, *, predict: bool) -> None:
        if pid == self.scanner.self_pid or not self._in_scope(pid):
            return
        self.counters["scans"] += 1
        with self._lock:
            prev = self._st.coverage.get(pid)
        t0 = time.perf_counter()
        cov = self.scanner.scan_process(pid, prev, heavy=False)
        self._note("scan", t0)
        if cov is None:
            return
        if cov.deferred:
            self._defer(pid, cov.deferred)
        with self._lock:
            self._st.coverage[pid] = cov
        for t in list(cov.targets.values()):
            self._ensure(pid, t, _ns_path_of(pid, t))
        if predict:
            t0 = time.perf_counter()
            self._predict(pid, cov)
            self._note("predict", t0)

    def _predict(self, pid: int, cov: ProcessCoverage) -> None:
        """Probe the libraries the loader is about to map (DT_NEEDED closure of the executable)."""
        ns_exe = procmaps.exe_path(pid)
        exe = next((mf for mf in procmaps.executable_files(pid) if mf.is_exe), None)
        if exe is None or not ns_exe:
            return
        opened = procmaps.open_mapped(pid, exe)
        if opened is None:
            return
        verdicts: dict[tuple[int, int], FileVerdict] = {}

        def dynamic_info(f: procmaps.OpenedFile) -> tuple[list[str], list[str], list[str]] | None:
            v, _ = self.scanner.analyse(f, heavy=False)
            if v.deferred:
                self._defer(pid, [f])
            verdicts[f.key] = v
            return (v.needed, v.rpath, v.runpath) if v.is_dynamic else None

        libs = ldso.needed_closure(pid, ns_exe, opened, dynamic_info, self._ld)
        if libs or (opened.key in verdicts and verdicts[opened.key].is_dynamic):
            known = {lib.key for _, lib in libs}
            resolver = ldso.Resolver(pid, self._ld, ldso.elf_ident(opened.path))
            for name in DLOPEN_LIKELY:
                found = resolver.resolve(name, os.path.dirname(ns_exe), [], [])
                lib = procmaps.open_in_root(pid, found) if found else None
                if lib is not None and lib.key not in known:
                    known.add(lib.key)
                    libs.append((found, lib))  # type: ignore[arg-type]
        for ns_path, lib in libs:
            v = verdicts.get(lib.key) or self.scanner.analyse(lib, heavy=False)[0]
            if v.target is None and v.uncovered is None:
                continue
            target = replace(v.target, path=lib.path, dev=lib.dev, ino=lib.ino) if v.target else None
            with self._lock:
                cov.merge(v, target)
                cov.seen.add(lib.key)
            if target is not None and self._ensure(pid, target, ns_path):
                self.counters["predicted"] += 1

    def _ensure(self, pid: int, target: Target, ns_path: str) -> bool:
        """Attach `target` unless it is already; True when attached by this call."""
        with self._lock:
            if target.key in self._st.attached or target.key in self._st.attaching:
                return False  # done, or being done by another thread (start-up scan vs exec worker)
            tries, last = self._st.failed.get(target.key, (0, ""))
            if tries >= MAX_ATTACH_TRIES:
                self._mark_failed(pid, target, last)
                return False
            self._st.attaching.add(target.key)
        try:
            t0 = time.perf_counter()
            roles = self._attach(target)
            self._note("attach", t0, target.path)
            err = "" if roles else "no probe attached (see the daemon log)"
        except Exception as e:  # noqa: BLE001 - the attacher reports; discovery carries on with the other files
            roles, err = [], str(e)
        now = time.monotonic()
        with self._lock:
            self._st.attaching.discard(target.key)
            if not roles:
                self.counters["attach_failed"] += 1
                self._st.failed[target.key] = (tries + 1, err)
                self._mark_failed(pid, target, err)
                return False
            self._st.failed.pop(target.key, None)
            self._st.attached[target.key] = Attached(target, roles, ns_path, pid, now)
            self.counters["attached"] += 1
            exec_ts = self._st.exec_ts.get(pid)
        log.info("probing %s (%s via %s): %s", ns_path or target.path, target.stack.name, target.how, ",".join(roles))
        if self.on_attached is not None:
            self.on_attached(pid, target, roles, now - exec_ts if exec_ts is not None else -1.0)
        return True

    def _mark_failed(self, pid: int, target: Target, err: str) -> None:
        with self._lock:
            cov = self._st.coverage.get(pid)
            if cov is not None:
                cov.uncovered[target.key] = Uncovered(
                    target.path, target.dev, target.ino, target.stack, f"attach failed: {err}"
                )

    # ---- periodic sweep: lost events, dead pids, replaced files -------------------------------------------
    def _sweep(self) -> None:
        live = {int(n) for n in os.listdir("/proc") if n.isdigit()}
        with self._lock:
            for pid in [p for p in self._st.coverage if p not in live]:
                self._forget_coverage(pid)
                self._st.exec_ts.pop(pid, None)
            self._st.skipped &= live
            self._st.in_scope &= live
        self.check_replaced()
        for pid in live:
            self._scan(pid, predict=False)
        self.drop_stale()

    def drop_stale(self) -> int:
        """Detach probes of files that are gone (deleted or replaced at their path) and that no process maps any
        more: a uprobe pins its inode, so a long-running daemon would otherwise keep every upgraded library's
        old file alive. Returns how many were detached."""
        if self._detach is None:
            return 0
        with self._lock:
            atts = list(self._st.attached.items())
            used = {k for c in self._st.coverage.values() for k in (*c.targets, *c.seen)}
        n = 0
        for key, att in atts:
            if key in used or not att.ns_path:
                continue
            if att.target.path.startswith("/proc/"):
                if not os.path.exists(f"/proc/{att.pid}"):
                    continue  # the namespace that named it is gone: cannot tell whether the file is
                now = procmaps.open_in_root(att.pid, att.ns_path)
            else:
                now = procmaps.open_in_root(os.getpid(), att.ns_path)
            if now is not None and now.key == key:
                continue  # still there: keep it probed for the next process
            try:
                self._detach(key)
            except Exception as e:  # noqa: BLE001 - a failed detach leaves the probe; try again next sweep
                log.warning("detaching %s failed: %s", att.ns_path, e)
                continue
            with self._lock:
                self._st.attached.pop(key, None)
            self.counters["detached"] += 1
            log.info("detached %s: the probed file is gone and no process maps it", att.ns_path)
            n += 1
        return n

    def check_replaced(self) -> int:
        """Probe files that replaced a probed file at the same path (new inode); returns how many."""
        with self._lock:
            atts = list(self._st.attached.values())
        n = 0
        for att in atts:
            pid = att.pid
            if not os.path.exists(f"/proc/{pid}"):
                if att.target.path.startswith("/proc/"):
                    continue  # only that (gone) process's namespace knew the path
                pid = os.getpid()  # a host path: look from here
            if not att.ns_path:
                continue
            now = procmaps.open_in_root(pid, att.ns_path)
            if now is None or now.key == att.target.key:
                continue
            with self._lock:
                known = now.key in self._st.attached
            if known:
                continue
            v, _ = self.scanner.analyse(now, heavy=False)
            if v.deferred:
                self._defer(pid, [now])
                continue
            if v.target is not None:
                t = replace(v.target, path=now.path, dev=now.dev, ino=now.ino)
                if self._ensure(pid, t, att.ns_path):
                    self.counters["replaced"] += 1
                    n += 1
        return n

    # ---- health ------------------------------------------------------------------------------------------------
    def coverage(self) -> dict[int, ProcessCoverage]:
        with self._lock:
            return dict(self._st.coverage)

    def attached(self) -> dict[tuple[int, int], Attached]:
        with self._lock:
            return dict(self._st.attached)

    def status(self) -> dict[str, Any]:
        """For `llmspy status` / the health report: what is probed, who is covered, who is not and why."""
        with self._lock:
            covs = list(self._st.coverage.values())
            atts = list(self._st.attached.values())
            failed = dict(self._st.failed)
            seen = dict(self._st.uncovered_seen)
        tls = [c for c in covs if c.stacks]
        return {
            "files_probed": sorted(
                f"{a.ns_path or a.target.path} [{a.target.stack.name.lower()}, {a.target.how}]: {','.join(a.roles)}"
                for a in atts
            ),
            "processes_with_tls": len(tls),
            "covered": sorted(f"{c.pid} {c.comm}" for c in tls if c.targets and not c.uncovered),
            "uncovered": [
                {
                    "pid": c.pid,
                    "comm": c.comm,
                    "exe": c.exe,
                    "container": c.container,
                    "reasons": sorted(u.reason for u in c.uncovered.values()),
                }
                for c in tls
                if c.uncovered
            ],
            "uncovered_seen": [{"exe": exe, **info} for exe, info in seen.items()],
            "attach_failures": {f"{k[0]}:{k[1]}": err for k, (_, err) in failed.items()},
            "counters": dict(self.counters) | dict(self.scanner.counters),
        }


def _new_pool() -> concurrent.futures.ProcessPoolExecutor:
    # forkserver: workers fork from a clean server process, never from this multi-threaded daemon
    ctx = multiprocessing.get_context("forkserver")
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=SLOW_WORKERS, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
    )


# how often an analysis worker checks that the daemon is still there
WORKER_PARENT_CHECK_S = 1.0


def _worker_init(daemon_pid: int) -> None:
    """In each analysis worker: leave Ctrl-C to the daemon, and exit when the daemon is gone.

    Pool workers share the pool's pipes, so a daemon killed with SIGKILL (or crashed) would leave them, and
    the forkserver they hold open, waiting forever; a watcher thread ends them instead."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while True:
            time.sleep(WORKER_PARENT_CHECK_S)
            try:
                os.kill(daemon_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass  # alive, as another user

    threading.Thread(target=watch, name="llmspy-daemon-watch", daemon=True).start()


def _ns_path_of(pid: int, t: Target) -> str:
    """The path of a target inside the process's namespace ("" for map_files paths)."""
    prefix = f"/proc/{pid}/root"
    if t.path.startswith(prefix + "/"):
        return t.path[len(prefix) :]
    return "" if t.path.startswith("/proc/") else t.path  # a host path is the same in both namespaces


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False
