"""ExecWatcher on real processes, with a recording attacher in place of the BPF ProbeManager."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmspyd.chunks import ProcessExec, ProcessExit, Stack
from llmspyd.discovery import execwatch, procmaps
from llmspyd.discovery.execwatch import ExecWatcher
from llmspyd.discovery.scanner import Scanner
from llmspyd.discovery.target import Target
from tests.unit import discovery_bins as bins
from tests.unit.ptrace_start import kill, resume, start_stopped

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
CURL = "/usr/bin/curl"
FAST = (0.01, 0.05, 0.2, 0.5)


class Recorder:
    def __init__(self, fail: Callable[[Target], bool] = lambda t: False) -> None:
        self.targets: list[Target] = []
        self.calls = 0
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, t: Target) -> list[str]:
        with self.lock:
            self.calls += 1
            if self.fail(t):
                raise OSError(13, "denied for the test")
            self.targets.append(t)
        return sorted(t.offsets)

    def attached_keys(self) -> set[tuple[int, int]]:
        with self.lock:
            return {t.key for t in self.targets}


def key_of(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture()
def rec() -> Recorder:
    return Recorder()


@pytest.fixture()
def watcher(rec: Recorder) -> Iterator[ExecWatcher]:
    w = ExecWatcher(rec, scanner=Scanner(load_optional=False), rescan_delays=FAST, sweep_interval_s=3600)
    yield w
    w.close()


def test_libssl_probed_before_the_loader_maps_it(watcher: ExecWatcher, rec: Recorder) -> None:
    if not os.path.exists(CURL):
        pytest.skip("curl not installed")
    pid = start_stopped([CURL, "--version"])  # the state at the exec event: exe + ld.so only
    try:
        watcher.on_event(ProcessExec(ts_ns=0, pid=pid, ppid=os.getpid(), uid=0, comm="curl", filename=CURL))
        assert wait_for(lambda: key_of(LIBSSL) in rec.attached_keys())
        assert wait_for(lambda: watcher.counters["predicted"] >= 1)  # counted just after the attach returns
        assert not any("libssl" in m.path for m in procmaps.read_maps(pid))  # still not mapped
        cov = watcher.coverage()[pid]
        assert Stack.OPENSSL in cov.stacks
        # let it run: the loader maps libssl, the rescans find the same inode and attach nothing twice
        resume(pid)
        time.sleep(0.3)
        assert [t.key for t in rec.targets].count(key_of(LIBSSL)) == 1
    finally:
        kill(pid)
    watcher.on_event(ProcessExit(ts_ns=0, pid=pid))
    assert wait_for(lambda: pid not in watcher.coverage())


def test_dlopen_after_exec_caught_by_rescan(watcher: ExecWatcher, rec: Recorder, tmp_path: Path) -> None:
    lib = tmp_path / "libcustomtls.so"  # a TLS library nobody could predict: only the rescans can find it
    shutil.copy(LIBSSL, lib)
    code = (
        "import ctypes, sys, time; time.sleep(0.15); ctypes.CDLL(sys.argv[1]); print('ready', flush=True); "
        "time.sleep(30)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(lib)], stdout=subprocess.PIPE)
    try:
        watcher.on_exec(p.pid)
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        assert wait_for(lambda: key_of(str(lib)) in rec.attached_keys())
    finally:
        p.kill()
        p.wait()


def test_python_libssl_predicted_before_import_ssl(watcher: ExecWatcher, rec: Recorder) -> None:
    """Python loads libssl with dlopen on `import ssl`: probed at exec all the same (DLOPEN_LIKELY)."""
    pid = start_stopped([sys.executable, "-c", "import ssl"])
    try:
        watcher.on_exec(pid)
        assert wait_for(lambda: key_of(LIBSSL) in rec.attached_keys())
        assert wait_for(lambda: watcher.counters["predicted"] >= 1)  # counted just after the attach returns
    finally:
        kill(pid)


def test_scan_all_covers_running_processes_once(watcher: ExecWatcher, rec: Recorder) -> None:
    code = "import ssl, time; print('ready', flush=True); time.sleep(30)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        n = watcher.scan_all()
        assert n >= 1 and key_of(LIBSSL) in rec.attached_keys()
        assert [t.key for t in rec.targets].count(key_of(LIBSSL)) == 1  # per file, not per process
        cov = watcher.coverage()
        for p in procs:
            assert key_of(LIBSSL) in cov[p.pid].targets
        st = watcher.status()
        assert any("libssl.so.3" in f for f in st["files_probed"])
        assert st["processes_with_tls"] >= 2
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_scope_filter(rec: Recorder) -> None:
    seen = []

    def scope(pid: int, exe: str, comm: str, uid: int, cgroup: str) -> bool:
        seen.append((pid, exe, comm, uid))
        return False

    w = ExecWatcher(rec, scanner=Scanner(load_optional=False), scope=scope, rescan_delays=FAST, sweep_interval_s=3600)
    p = subprocess.Popen(
        [sys.executable, "-c", "import ssl, time; print('r', flush=True); time.sleep(30)"], stdout=subprocess.PIPE
    )
    try:
        assert p.stdout is not None and p.stdout.readline()
        w.scan_pid(p.pid)
        assert rec.targets == [] and w.counters["out_of_scope"] == 1
        assert seen and seen[0][0] == p.pid and seen[0][1].startswith("/usr/bin/python") and seen[0][3] == os.getuid()
    finally:
        w.close()
        p.kill()
        p.wait()


def test_attach_failure_is_reported_and_bounded(tmp_path: Path) -> None:
    rec = Recorder(fail=lambda t: True)
    w = ExecWatcher(rec, scanner=Scanner(load_optional=False), rescan_delays=(), sweep_interval_s=3600)
    p = subprocess.Popen(
        [sys.executable, "-c", "import ssl, time; print('r', flush=True); time.sleep(30)"], stdout=subprocess.PIPE
    )
    try:
        assert p.stdout is not None and p.stdout.readline()
        for _ in range(5):
            w.scan_pid(p.pid)
            w._st.coverage.pop(p.pid)  # forget it was seen, as a new process mapping the file would
        assert rec.calls == execwatch.MAX_ATTACH_TRIES
        st = w.status()
        assert st["attach_failures"] and "denied for the test" in next(iter(st["attach_failures"].values()))
        w.scan_pid(p.pid)
        unc = [u for u in w.status()["uncovered"] if u["pid"] == p.pid]
        assert unc and "attach failed" in unc[0]["reasons"][0] and "denied for the test" in unc[0]["reasons"][0]
        assert rec.calls == execwatch.MAX_ATTACH_TRIES
    finally:
        w.close()
        p.kill()
        p.wait()


def test_replaced_library_is_probed_again(watcher: ExecWatcher, rec: Recorder, tmp_path: Path) -> None:
    lib = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, lib)
    code = "import ctypes, sys, time; ctypes.CDLL(sys.argv[1]); print('r', flush=True); time.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", code, str(lib)], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline()
        watcher.scan_pid(p.pid)
        old = key_of(str(lib))
        assert old in rec.attached_keys()
        # an upgrade: new file renamed over the old path; the running process still maps the old (deleted) inode
        new = tmp_path / "new"
        shutil.copy(LIBSSL, new)
        os.rename(new, lib)
        assert key_of(str(lib)) != old
        assert watcher.check_replaced() == 1
        assert key_of(str(lib)) in rec.attached_keys() and watcher.counters["replaced"] == 1
        assert watcher.check_replaced() == 0
    finally:
        p.kill()
        p.wait()


def test_uncovered_process_named_with_reason(tmp_path: Path, rec: Recorder) -> None:
    src = bins.C_RUST_MARKERS.replace("return 0;", "fflush(stdout); for(;;) pause(); return 0;")
    src = "#include <unistd.h>\n" + src
    path = bins.cc_build(tmp_path, "fake-codex", src, [])
    w = ExecWatcher(rec, scanner=Scanner(load_optional=False), rescan_delays=(), sweep_interval_s=3600)
    p = subprocess.Popen([path], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline()
        w.scan_pid(p.pid)
        unc = [u for u in w.status()["uncovered"] if u["pid"] == p.pid]
        assert unc and unc[0]["comm"] == "fake-codex" and "rustls" in unc[0]["reasons"][0]
        assert rec.targets == []
    finally:
        w.close()
        p.kill()
        p.wait()


def test_sweep_drops_dead_pids_and_finds_missed_processes(rec: Recorder) -> None:
    w = ExecWatcher(rec, scanner=Scanner(load_optional=False), rescan_delays=(), sweep_interval_s=0.05)
    p = subprocess.Popen(
        [sys.executable, "-c", "import ssl, time; print('r', flush=True); time.sleep(30)"], stdout=subprocess.PIPE
    )
    try:
        assert p.stdout is not None and p.stdout.readline()
        w.start()  # no exec event at all (as if its record was lost): the sweep finds it
        assert wait_for(lambda: p.pid in w.coverage() and key_of(LIBSSL) in rec.attached_keys())
        p.kill()
        p.wait()
        assert wait_for(lambda: p.pid not in w.coverage())
    finally:
        w.close()


def test_slow_analysis_never_delays_exec_work(tmp_path: Path, rec: Recorder) -> None:
    """A stripped-BoringSSL candidate takes its finder seconds: meanwhile a new process is still probed at once."""
    src = (
        '#include <stdio.h>\n#include <unistd.h>\nconst char *f = "../../ssl/ssl_lib.cc";\n'
        "int main(void){puts(f);fflush(stdout);for(;;)pause();}\n"
    )
    slow_bin = bins.cc_build(tmp_path, "boring-like", src, [])
    release = threading.Event()

    def slow_finder(path, dev, ino):  # type: ignore[no-untyped-def]
        release.wait(10)
        return Target(path, dev, ino, Stack.BORINGSSL, {"SSL_write": [0x1000]}, how="fingerprint")

    w = ExecWatcher(
        rec, scanner=Scanner(boring_finder=slow_finder, load_optional=False), rescan_delays=FAST, sweep_interval_s=3600
    )
    slow = subprocess.Popen([slow_bin], stdout=subprocess.PIPE)
    lib = tmp_path / "libother.so"
    shutil.copy(LIBSSL, lib)
    fast = None
    try:
        assert slow.stdout is not None and slow.stdout.readline()
        w.on_exec(slow.pid)
        time.sleep(0.1)  # the finder is now blocked on the slow thread
        code = "import ctypes, sys, time; ctypes.CDLL(sys.argv[1]); print('r', flush=True); time.sleep(30)"
        fast = subprocess.Popen([sys.executable, "-c", code, str(lib)], stdout=subprocess.PIPE)
        assert fast.stdout is not None and fast.stdout.readline()
        w.on_exec(fast.pid)
        assert wait_for(lambda: key_of(str(lib)) in rec.attached_keys(), 3)
        assert key_of(slow_bin) not in rec.attached_keys() and not w.idle()
        release.set()
        assert wait_for(lambda: key_of(slow_bin) in rec.attached_keys(), 5)
        assert wait_for(lambda: key_of(slow_bin) in w.coverage()[slow.pid].targets)
    finally:
        release.set()
        w.close()
        for p in (slow, fast):
            if p is not None:
                p.kill()
                p.wait()


def test_go_binary_analysed_in_isolated_worker_process(tmp_path: Path, rec: Recorder) -> None:
    """The real Go finder runs in a worker process (no GIL contention with exec work) and its target is attached."""
    import socket

    scanner = Scanner()
    if scanner.go_finder is None:
        pytest.skip("golang finder not importable")
    go_bin = bins.go_build(tmp_path, "go_tls", bins.GO_TLS_PROGRAM, [])
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts the TCP connection and never answers the handshake: the client waits in tls.Dial
    w = ExecWatcher(rec, scanner=scanner, rescan_delays=FAST, sweep_interval_s=3600)
    p = subprocess.Popen([go_bin, f"127.0.0.1:{srv.getsockname()[1]}"], stdout=subprocess.DEVNULL)
    try:
        w.on_exec(p.pid)
        assert w._pool is not None  # isolated: default finders
        assert wait_for(lambda: key_of(go_bin) in rec.attached_keys(), 60)
        t = next(t for t in rec.targets if t.key == key_of(go_bin))
        assert t.stack == Stack.GOTLS and "go_read_ret" in t.offsets and t.how.startswith("symtab")
        assert key_of(go_bin) in w.coverage()[p.pid].targets
        opened = procmaps.open_in_root(os.getpid(), go_bin)
        assert opened is not None and w.scanner.cached(opened) is not None  # the verdict came back to the cache
    finally:
        w.close()
        p.kill()
        p.wait()
        srv.close()


def test_concurrent_ensure_attaches_once(rec: Recorder) -> None:
    """The start-up scan (caller's thread) and the exec worker may meet on one file: one attach call, one record."""
    gate = threading.Event()
    calls = []

    def slow_attach(t: Target) -> list[str]:
        calls.append(t.key)
        gate.wait(5)
        return ["SSL_write"]

    w = ExecWatcher(slow_attach, scanner=Scanner(load_optional=False), rescan_delays=(), sweep_interval_s=3600)
    t = Target(LIBSSL, 1, 2, Stack.OPENSSL, {"SSL_write": [1]}, how="test")
    results = []
    threads = [threading.Thread(target=lambda: results.append(w._ensure(os.getpid(), t, LIBSSL))) for _ in range(4)]
    for th in threads:
        th.start()
    time.sleep(0.2)
    gate.set()
    for th in threads:
        th.join()
    w.close()
    assert calls == [(1, 2)] and sorted(results) == [False, False, False, True]
    assert w.counters["attached"] == 1 and list(w.attached()) == [(1, 2)]


def test_gone_file_detached_once_unused(tmp_path: Path, rec: Recorder) -> None:
    lib = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, lib)
    detached = []
    w = ExecWatcher(
        rec,
        scanner=Scanner(load_optional=False),
        detach=lambda k: detached.append(k) or True,
        rescan_delays=(),
        sweep_interval_s=3600,
    )
    code = "import ctypes, sys, time; ctypes.CDLL(sys.argv[1]); print('r', flush=True); time.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", code, str(lib)], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline()
        w.scan_pid(p.pid)
        old = key_of(str(lib))
        assert old in w.attached()
        assert w.drop_stale() == 0  # present and mapped
        os.unlink(lib)
        assert w.drop_stale() == 0  # gone, but a live process still maps it
    finally:
        p.kill()
        p.wait()
    w._sweep()  # forgets the dead process, then drops the probe of the gone file
    assert detached == [old] and old not in w.attached() and w.counters["detached"] == 1
    w.close()


POOL_CHILD = """
import os, sys, time
from llmspyd.discovery import execwatch
pool = execwatch._new_pool()
pids = set(pool.submit(os.getpid).result() for _ in range(8))
print(" ".join(map(str, sorted(pids))), flush=True)
time.sleep(60)
"""


def test_analysis_workers_exit_when_the_daemon_is_killed() -> None:
    """A daemon killed with SIGKILL must not leave its analysis workers (and their forkserver) behind."""
    p = subprocess.Popen([sys.executable, "-c", POOL_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        workers = [int(x) for x in p.stdout.readline().split()]
        assert workers and all(os.path.exists(f"/proc/{w}") for w in workers)
    finally:
        p.kill()
        p.wait()
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{w}") for w in workers), 10), "workers outlived the daemon"
