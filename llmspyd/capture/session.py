"""One running capture: BPF objects loaded, probes attached, the ring read, events handed to a sink.

Used by `llmspy sniff`, the e2e test fixture and the benchmark; the daemon (llmspyd.app) composes the same
pieces with the full discovery scanner.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from llmspyd.bpf.abi import Verdict
from llmspyd.bpf.libbpf import num_possible_cpus
from llmspyd.bpf.loader import ObjectSet, objects_dir, pidns_knobs
from llmspyd.bpf.probes import OpenSslScanner, ProbeManager
from llmspyd.capture.reader import RingReader
from llmspyd.chunks import CaptureEvent, ProcessExec

log = logging.getLogger(__name__)

# objects for OpenSSL capture; process.bpf.o first: it owns the shared maps
OPENSSL_OBJECTS = ("process.bpf.o", "tls_openssl.bpf.o")
# 8 MiB ring: at ~250 B per small record, tens of thousands of records of slack between two reader polls
DEFAULT_RING_BYTES = 8 << 20
# the kernel wants a ring of a power of two pages
MIN_RING_BYTES = 4096
# The reader must get the CPU before the busy processes it traces, or the ring overflows while it waits to
# run: with both cores driving TLS (bench.capture, 16 KiB writes), nice 0 lost ~9k records at 66-85 MB/s,
# nice -10 lost none at 100 MB/s, using 6-8% of a CPU.
READER_NICE = -10


def all_objects() -> list[str]:
    """Every shipped object, process.bpf.o first (the first object to declare a shared map owns it)."""
    names = sorted(p.name for p in objects_dir().glob("*.bpf.o"))
    return sorted(names, key=lambda n: n != "process.bpf.o")


def check_ring_size(n: int) -> int:
    if n < MIN_RING_BYTES or n & (n - 1):
        raise ValueError(f"ring size {n} must be a power of two of at least {MIN_RING_BYTES} bytes")
    return n


def raise_priority(reader: RingReader, nice: int = READER_NICE) -> None:
    """Give the reader thread (only) a higher priority; without CAP_SYS_NICE it keeps its own."""
    tid = reader.native_id
    if tid is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as e:
        log.info("cannot raise the ring reader's priority: %s", e)


class CaptureSession:
    """Load, attach, read. `sink` gets batches of events on the reader thread.

    wakeup_bytes 0 wakes the reader per record (lowest latency); N lets records wait in the ring until N
    bytes are there or the reader's poll timer fires (cheapest for the traced processes).
    default_verdict SKIP traces only processes given TRACE with probes.set_pid_verdict / set_cgroup_verdict.
    follow_exec False: probe only what start() and explicit scans found (benchmarks).
    uprobe_multi False: one classic perf-event uprobe per offset instead of one uprobe_multi link per program
    and file (kernels before 6.6 get the classic ones anyway).
    full_discovery: every stack (llmspyd.discovery.execwatch, all objects) instead of OpenSSL only; then
    `self.watcher` is the ExecWatcher, and `self.scanner` is still there for explicit OpenSSL files.
    """

    def __init__(
        self,
        sink: Callable[[list[CaptureEvent]], None],
        *,
        objects: Sequence[str] | None = None,
        ring_bytes: int = DEFAULT_RING_BYTES,
        max_call_bytes: int = 0,
        wakeup_bytes: int | None = None,
        poll_ms: int = 100,
        self_tgid: int | None = None,
        default_verdict: int = Verdict.TRACE,
        scan: bool = True,
        follow_exec: bool = True,
        full_discovery: bool = False,
        uprobe_multi: bool = True,
    ) -> None:
        self._sink = sink
        if objects is None:
            objects = all_objects() if full_discovery else OPENSSL_OBJECTS
        self.ring_bytes = check_ring_size(ring_bytes)
        if wakeup_bytes is None:
            wakeup_bytes = ring_bytes // 4
        d = objects_dir()
        self.objects = ObjectSet(
            [d / name for name in objects],
            rodata={
                "self_tgid": os.getpid() if self_tgid is None else self_tgid,
                "max_call_bytes": max_call_bytes,
                "wakeup_bytes": wakeup_bytes,
                "default_verdict": int(default_verdict),
                **pidns_knobs(),  # ids as this pid namespace sees them (in a container)
            },
            uprobe_multi=uprobe_multi,
            max_entries={"rb": ring_bytes, "scratch": num_possible_cpus()},
        )
        self.probes = ProbeManager(self.objects)
        self.scanner = OpenSslScanner(self.probes)
        self.watcher = None
        if full_discovery:
            from llmspyd.discovery.execwatch import ExecWatcher

            self.watcher = ExecWatcher.for_probes(self.probes)
        self.reader = RingReader(self.objects.map("rb"), self._on_batch, poll_ms=poll_ms)
        self._scan = scan
        self._follow_exec = follow_exec

    def start(self) -> CaptureSession:
        try:
            self.probes.attach_global()
            self.reader.start()
            raise_priority(self.reader)
            if self._scan and self.watcher is not None:
                log.info("probing %d file(s)", self.watcher.scan_all())
            elif self._scan:
                log.info("attached to %d OpenSSL file(s)", self.scanner.scan_all())
        except BaseException:
            self.close()
            raise
        return self

    def _on_batch(self, events: list[CaptureEvent]) -> None:
        for ev in events if self._follow_exec else ():
            if self.watcher is not None:
                self.watcher.on_event(ev)
            elif isinstance(ev, ProcessExec):
                self.scanner.on_exec(ev.pid)
        self._sink(events)

    def stats(self) -> dict[str, int]:
        return self.probes.stats()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        self.scanner.close()
        self.probes.close()
        self.reader.stop()
        self.objects.close()

    def __enter__(self) -> CaptureSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
