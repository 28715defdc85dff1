"""How fast discovery finds and probes TLS code. Prints figures; asserts nothing.

Run as root: .venv/bin/python -m bench.discovery

1. Scan cost per new file: the first analysis of a file (what a never-seen binary costs at its exec),
   then a cache hit, for libssl, libgnutls, node (~100 MB, OpenSSL exported), a Go client built here,
   and the agent binaries of tests/agents when they are installed (Bun / Claude Code: stripped BoringSSL).
2. exec -> probes attached, for programs never seen before, with the real BPF capture running:
   a fresh copy (new inode) of a client whose OpenSSL is linked into the executable, and a fresh copy of
   libssl that curl loads through LD_LIBRARY_PATH (attached before the loader maps it). Measured from the
   kernel's exec timestamp to the attach returning, split into event delivery (kernel -> discovery), and
   discovery's own work (scan + attach). Median and p99 over ROUNDS runs.
"""

from __future__ import annotations

import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from llmspyd.chunks import ProcessExec
from llmspyd.discovery import procmaps
from llmspyd.discovery.execwatch import ExecWatcher
from llmspyd.discovery.scanner import Scanner, analyse_isolated

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 30
# first write of the C client, after its start: late enough that every round completes its request
CLIENT_DELAY_MS = 200
AGENT_GLOBS = (
    "/var/cache/llmspyd-test/agents/*/node_modules/bun/bin/bun.exe",
    "/var/cache/llmspyd-test/agents/*/node_modules/@anthropic-ai/claude-code/bin/claude.exe",
    "/var/cache/llmspyd-test/agents/*/node_modules/@openai/codex*/vendor/*/codex/codex",
)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def build_clients(d: Path) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT))
    from tests.e2e.test_autoattach import C_CLIENT
    from tests.unit import discovery_bins as bins

    c = bins.cc_build(d, "tlsclient", C_CLIENT, bins.static_openssl_libs())
    go = bins.go_build(d, "goclient", bins.GO_TLS_PROGRAM, [])
    return c, go


def bench_scan(go_bin: str) -> None:
    print("scan cost per new file (first analysis; then the cache)")
    files = [
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/usr/lib/x86_64-linux-gnu/libgnutls.so.30",
        shutil.which("node") or "/usr/bin/node",
        go_bin,
    ]
    agents = sorted({os.path.realpath(p) for g in AGENT_GLOBS for p in glob.glob(g)})
    for path in files + agents:
        if not os.path.exists(path):
            continue
        f = procmaps.open_in_root(os.getpid(), os.path.realpath(path))
        if f is None:
            continue
        s = Scanner()
        t0 = time.perf_counter()
        quick, _ = s.analyse(f, heavy=False)  # what the exec-time thread does
        t1 = time.perf_counter()
        v = analyse_isolated(f) if quick.deferred else quick  # the slow finder, when the file needs one
        t2 = time.perf_counter()
        if quick.deferred:
            s.store(f, v)
        t3 = time.perf_counter()
        s.analyse(f)
        t4 = time.perf_counter()
        what = v.target.how if v.target else (v.uncovered.reason if v.uncovered else "no TLS")
        slow = f"  + finder {1e3 * (t2 - t1):8.1f} ms" if quick.deferred else " " * 22
        print(
            f"  {os.path.basename(path):28s} {f.size / 2**20:7.1f} MiB  exec-time {1e3 * (t1 - t0):6.1f} ms{slow}"
            f"  cached {1e6 * (t4 - t3):6.1f} us  {v.stack.name.lower():9s} {what}"
        )


class Timeline:
    """Marks per pid: on_exec (event delivered to discovery) and attach returned, in CLOCK_MONOTONIC ns."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attach_ms: dict[tuple[int, int], float] = {}  # file key -> duration of the attach call
        self.delivered: dict[int, int] = {}
        self.attached: dict[tuple[int, int], int] = {}  # file key -> ns

    def on_exec(self, pid: int) -> None:
        with self.lock:
            self.delivered.setdefault(pid, time.monotonic_ns())

    def on_attached(self, pid: int, target, roles, dt) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            self.attached.setdefault(target.key, time.monotonic_ns())


def bench_exec(c_client: str) -> None:
    sys.path.insert(0, str(ROOT))
    from llmspyd.capture.session import CaptureSession
    from tests.conftest import EventLog
    from tests.tlsserver import TlsServer, client_env, make_certs

    tmp = Path(tempfile.mkdtemp(prefix="llmspy-bench-disc-"))
    certs = make_certs(tmp / "certs")
    srv = TlsServer(certs)
    env = client_env(certs)
    log = EventLog()
    tl = Timeline()
    session = CaptureSession(log, scan=False, poll_ms=20)

    def attach(target):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return session.probes.attach(target)
        finally:
            with tl.lock:
                tl.attach_ms.setdefault(target.key, 1e3 * (time.perf_counter() - t0))

    watcher = ExecWatcher(attach, detach=session.probes.detach, scanner=Scanner(), on_attached=tl.on_attached)
    inner = watcher.on_exec

    def on_exec(pid: int) -> None:
        tl.on_exec(pid)
        inner(pid)

    watcher.on_exec = on_exec  # type: ignore[method-assign]
    session.scanner.close()
    session.scanner = watcher
    session.start()
    watcher.scan_all()
    end = time.monotonic() + 120
    while not watcher.idle() and time.monotonic() < end:
        time.sleep(0.1)
    try:
        for kind in ("exe", "lib"):
            total, delivery, work, attach_call, captured = [], [], [], [], 0
            for i in range(ROUNDS):
                d = tmp / f"{kind}{i}"
                d.mkdir()
                if kind == "exe":
                    exe = d / "client"
                    shutil.copy(c_client, exe)
                    key_path, argv, cenv = exe, [str(exe), str(srv.port), str(CLIENT_DELAY_MS), "100"], env
                else:
                    shutil.copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", d / "libssl.so.3")
                    key_path = d / "libssl.so.3"
                    argv = ["/usr/bin/curl", "-sS", "--http1.1", "-o", "/dev/null", f"{srv.url}/bytes/100"]
                    cenv = dict(env, LD_LIBRARY_PATH=str(d))
                st = os.stat(key_path)
                key = (st.st_dev, st.st_ino)
                subprocess.run(argv, env=cenv, capture_output=True, timeout=60, check=False)
                time.sleep(0.2)
                pid = _pid_of(log, argv[0])
                ev = next(iter(log.events(ProcessExec, pid)), None) if pid > 0 else None
                with tl.lock:
                    att = tl.attached.get(key)
                    dl = tl.delivered.get(ev.pid) if ev else None
                if ev is None or att is None:
                    continue
                total.append((att - ev.ts_ns) / 1e6)
                if dl is not None:
                    delivery.append((dl - ev.ts_ns) / 1e6)
                    work.append((att - dl) / 1e6)
                attach_call.append(tl.attach_ms.get(key, 0.0))
                if log.chunks(ev.pid):
                    captured += 1
            label = {"exe": "fresh executable, OpenSSL inside", "lib": "fresh libssl via LD_LIBRARY_PATH (curl)"}
            print(
                f"exec -> probes attached, {label[kind]}: {len(total)}/{ROUNDS} attached, "
                f"{captured} with TLS data captured"
            )
            for name, xs in (
                ("total", total),
                ("event delivery", delivery),
                ("discovery work", work),
                ("  of which attach", attach_call),
            ):
                if xs:
                    print(
                        f"  {name:16s} median {statistics.median(xs):7.1f} ms   p99 {pct(xs, 99):7.1f} ms"
                        f"   max {max(xs):7.1f} ms"
                    )
        print(f"  discovery counters: {watcher.counters}")
    finally:
        watcher.close()
        session.close()
        srv.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_of(log, filename: str) -> int:  # type: ignore[no-untyped-def]
    evs = [e for e in log.events(ProcessExec) if e.filename == filename]
    return evs[-1].pid if evs else -1


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="llmspy-bench-bins-") as d:
        c_client, go_bin = build_clients(Path(d))
        bench_scan(go_bin)
        print()
        if os.geteuid() != 0:
            print("exec -> attached: skipped (needs root to load the BPF objects)")
            return
        bench_exec(c_client)
    print(f"(load average during the run: {os.getloadavg()})")


if __name__ == "__main__":
    main()
