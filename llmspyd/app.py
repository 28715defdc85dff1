"""Composition root: builds the parts, wires them, runs them, reloads, stops.

Threads and who does what:

- reader (capture.reader.RingReader): polls the ring buffer, decodes records and
  puts each batch on a bounded queue. Nothing else, so it keeps up with the kernel.
- worker: takes batches, lets discovery see exec events, feeds the pipeline
  (streams → HTTP → LLM records), flushes idle connections; the pipeline's emit
  redacts and writes each record to every sink.
- main: signals (SIGHUP reload, SIGTERM/SIGINT stop), sd_notify (READY once the
  probes are attached, STATUS with live counters, WATCHDOG only while reader and
  worker are alive and progressing) and the status file `llmspy status` reads.

Everything the daemon builds comes from `Parts` factories, so tests can run the
real wiring with fakes for the kernel side.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmspyd import logging as llog
from llmspyd.chunks import CaptureEvent, ProcessExec, ProcessExit, TlsChunk
from llmspyd.process import ProcessInfo, read_process
from llmspyd.scope import Scope
from llmspyd.settings import ConfigError, Settings, load
from llmspyd.sinks import Outputs, Redactor, make_sinks

log = llog.get("llmspyd.app")

# Batches waiting for the worker. When it falls behind, the reader blocks, the ring fills and the kernel
# counts the loss: memory stays bounded and nothing is dropped without a counter.
QUEUE_BATCHES = 64
# A reader or worker that has not come around for this long is hung: stop feeding the watchdog.
STALL_S = 10.0
# Main loop period when no watchdog asks for faster.
TICK_S = 1.0
# How often the worker checks for idle connections.
IDLE_SWEEP_S = 1.0
# The reader is woken when 1/WAKEUP_FRACTION of the ring is full (or at its poll timeout).
WAKEUP_FRACTION = 4


class Notifier(Protocol):
    def notify(self, state: str) -> Any: ...


class _NullNotifier:
    def notify(self, state: str) -> None:
        pass


def systemd_notifier() -> Notifier:
    if not os.environ.get("NOTIFY_SOCKET"):
        return _NullNotifier()
    import sdnotify

    return sdnotify.SystemdNotifier()


@dataclass
class Capture:
    """The kernel side, as the daemon uses it (real: BPF objects, probes, discovery, reader)."""

    reader: Any  # start(), stop(), alive, last_poll_monotonic, counters
    probes: Any  # stats(), attached(), mute(pid, conn), set_pid_verdict(), set_cgroup_verdict(), close()
    discovery: Any  # scan_all(), on_event(exec/exit event), close(); optional: scope attribute, status()
    close: Callable[[], None] = lambda: None


@dataclass
class Parts:
    """Factories the daemon builds itself from. `real_parts()` gives the production ones."""

    capture: Callable[[Settings, Callable[[list[CaptureEvent]], None]], Capture]
    pipeline: Callable[[Settings, Callable[[Any], None], Callable[[Any], None]], Any]
    notifier: Callable[[], Notifier] = systemd_notifier


@dataclass
class Counters:
    exchanges: int = 0
    queue_waits: int = 0  # times the reader waited for the worker: backpressure
    dropped_batches: int = 0  # only at shutdown, when the worker is gone
    dropped_events: int = 0
    pids: set[int] = field(default_factory=set)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        parts: Parts,
        *,
        config_dir: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        dump_chunks: str | None = None,
    ) -> None:
        self.settings = settings
        self.parts = parts
        self.config_dir = config_dir
        self.overrides = overrides or {}
        self.dump_path = dump_chunks
        self.notifier = parts.notifier()
        self.counters = Counters()
        self.started = time.time()
        self.ready = False
        self.reloads = {"ok": 0, "refused": 0}
        self.last_reload_error = ""
        self._queue: queue.Queue[list[CaptureEvent] | None] = queue.Queue(QUEUE_BATCHES)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._emit_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.worker_heartbeat = time.monotonic()
        self._dump = None
        self.capture: Capture | None = None
        self.pipeline: Any = None
        self.outputs: Outputs | None = None
        self.scope = Scope.from_settings(settings.trace)
        self._status_warned = False

    # ---- life cycle

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop cleanly. Returns the exit code."""
        self._install_signals()
        try:
            self.start()
        except Exception as e:
            log.error("start failed", error=str(e), exc_info=True)
            self.notifier.notify(f"STATUS=start failed: {e}")
            self.shutdown()
            return 1
        try:
            self.serve()
        finally:
            self.shutdown()
        return 0

    def start(self) -> None:
        s = self.settings
        self.outputs = self._make_outputs(s)
        log.info("outputs", sinks=[x.name for x in self.outputs.sinks], redaction=_redaction_summary(s))
        if self.dump_path:
            # raw plaintext, credentials included: a debugging aid the operator asked for by name
            log.warning("--dump-chunks: writing raw captured plaintext, secrets included", path=self.dump_path)
            fd = os.open(self.dump_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._dump = os.fdopen(fd, "a", encoding="utf-8")
        self.capture = self.parts.capture(s, self._enqueue)
        self.pipeline = self.parts.pipeline(s, self._emit, self._mute)
        self._worker = threading.Thread(target=self._work, name="llmspy-worker", daemon=True)
        self._worker.start()
        if hasattr(self.capture.discovery, "scope"):
            self.capture.discovery.scope = self._in_scope
        self.capture.reader.start()
        if hasattr(self.capture.reader, "native_id"):
            from llmspyd.capture.session import raise_priority

            raise_priority(self.capture.reader)
        self._apply_scope()
        n = self.capture.discovery.scan_all()
        attached = len(self.capture.probes.attached())
        if not attached:
            log.warning("no TLS library found to probe yet; new processes will be scanned as they start")
        log.info("probes attached", files=attached, new=n)
        self.ready = True
        self.notifier.notify("READY=1")
        self.notifier.notify("STATUS=" + self.status_line())
        self.write_status()

    def serve(self) -> None:
        watchdog_s = _watchdog_interval()
        tick = min(TICK_S, watchdog_s / 4) if watchdog_s else TICK_S
        next_status = 0.0
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
                next_status = 0.0  # show the outcome in STATUS= and the status file at once
            now = time.monotonic()
            if watchdog_s:
                problem = self.health(now)
                if problem is None:
                    self.notifier.notify("WATCHDOG=1")
                else:
                    log.error("not feeding the watchdog", problem=problem)
            if now >= next_status:
                next_status = now + self.settings.daemon.status_interval_s
                self.notifier.notify("STATUS=" + self.status_line())
                self.write_status()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload.set()
        self._wake.set()

    def shutdown(self) -> None:
        """Detach, drain, flush every open exchange, close sinks. Idempotent."""
        self._stop.set()
        self.notifier.notify("STOPPING=1")
        # systemd keeps the watchdog armed while a unit stops: keep feeding it, each step below has its own
        # time limit and TimeoutStopSec bounds the whole
        done = threading.Event()
        watchdog_s = _watchdog_interval()
        if watchdog_s:
            threading.Thread(target=self._feed_watchdog, args=(done, min(TICK_S, watchdog_s / 4)), daemon=True).start()
        try:
            self._shutdown()
        finally:
            done.set()

    def _feed_watchdog(self, done: threading.Event, every: float) -> None:
        while not done.wait(every):
            self.notifier.notify("WATCHDOG=1")

    def _shutdown(self) -> None:
        cap, self.capture = self.capture, None
        if cap is not None:
            try:
                cap.reader.stop()  # drains what is already in the ring
            except Exception:
                log.exception("stopping the reader failed")
        if self._worker is not None:
            self._put(None)
            self._worker.join(30)
            if self._worker.is_alive():
                log.error("worker did not finish within 30 s; open exchanges are lost")
            self._worker = None
        if cap is not None:
            for what, fn in (("probes", cap.probes.close), ("discovery", cap.discovery.close), ("bpf", cap.close)):
                try:
                    fn()
                except Exception:
                    log.exception("closing failed", part=what)
        if self.outputs is not None:
            self.outputs.close()
            self.outputs = None
        if self._dump is not None:
            self._dump.close()
            self._dump = None
        log.info("stopped", exchanges=self.counters.exchanges)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())

    # ---- reader → worker

    def _enqueue(self, batch: list[CaptureEvent]) -> None:
        """Runs on the reader thread: hand over, wait if the worker is behind, never lose silently."""
        while True:
            try:
                self._queue.put(batch, timeout=1.0)
                return
            except queue.Full:
                self.counters.queue_waits += 1
                if self._worker is None or not self._worker.is_alive():
                    self.counters.dropped_batches += 1
                    self.counters.dropped_events += len(batch)
                    return

    def _put(self, item: list[CaptureEvent] | None) -> None:
        while self._worker is not None and self._worker.is_alive():
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        next_sweep = time.monotonic() + IDLE_SWEEP_S
        while True:
            self.worker_heartbeat = time.monotonic()
            try:
                batch = self._queue.get(timeout=0.5)
            except queue.Empty:
                batch = []
            if batch is None:
                break
            if batch:
                try:
                    self._handle(batch)
                except Exception:  # one bad batch must not kill the worker
                    log.exception("pipeline failed on a batch", events=len(batch))
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + IDLE_SWEEP_S
                try:
                    self.pipeline.flush_idle(time.monotonic_ns(), int(self.settings.limits.idle_timeout_s * 1e9))
                except Exception:
                    log.exception("flushing idle connections failed")
        try:
            self.pipeline.flush_idle(time.monotonic_ns(), 0)  # shutting down: everything open is emitted
        except Exception:
            log.exception("final flush failed")

    def _handle(self, batch: list[CaptureEvent]) -> None:
        cap = self.capture
        for ev in batch:
            if isinstance(ev, TlsChunk):
                self.counters.pids.add(ev.pid)
                if self._dump is not None:
                    self._dump.write(json.dumps(chunk_json(ev)) + "\n")
            elif isinstance(ev, ProcessExec):
                self._on_exec(ev)
                if cap is not None:
                    cap.discovery.on_event(ev)
            elif isinstance(ev, ProcessExit):
                self.counters.pids.discard(ev.pid)
                if cap is not None:
                    cap.discovery.on_event(ev)
        if self._dump is not None:
            self._dump.flush()
        self.pipeline.feed(batch)

    def _on_exec(self, ev: ProcessExec) -> None:
        if self.scope.everything or self.capture is None:
            return
        info = read_process(ev.pid, ev.comm)
        info.uid = ev.uid if info.uid < 0 else info.uid
        if self.scope.matches(info):
            self._verdict(ev.pid, True)

    # ---- pipeline → sinks

    def _emit(self, record: Any) -> None:
        with self._emit_lock:
            outputs = self.outputs
            if outputs is None:
                return
            outputs(record)
            self.counters.exchanges += 1

    def _mute(self, key: Any) -> None:
        cap = self.capture
        if cap is not None:
            try:
                cap.probes.mute(key.pid, key.conn)
            except Exception as e:
                log.debug("mute failed", pid=key.pid, error=str(e))

    # ---- scope → kernel verdicts

    def _verdict(self, pid: int, trace: bool) -> None:
        from llmspyd.bpf.abi import Verdict

        try:
            self.capture.probes.set_pid_verdict(pid, Verdict.TRACE if trace else Verdict.SKIP)  # type: ignore[union-attr]
        except Exception as e:
            log.debug("pid verdict failed", pid=pid, error=str(e))

    def _in_scope(self, pid: int, exe: str, comm: str, uid: int, cgroup: str) -> bool:
        """For discovery: is this process worth scanning? Reads self.scope each time, so a reload applies."""
        return self.scope.matches(ProcessInfo(pid=pid, comm=comm, exe=exe, uid=uid, cgroup=cgroup))

    def _apply_scope(self) -> None:
        from llmspyd.bpf.abi import Verdict

        sc = self.scope
        if sc.unknown_users:
            log.warning("unknown users in trace.users", users=sc.unknown_users)
        for pid in sc.excluded:
            self._verdict(pid, False)
        if sc.everything or self.capture is None:
            return
        for d in sc.cgroup_dirs():
            try:
                self.capture.probes.set_cgroup_verdict(os.stat(d).st_ino, Verdict.TRACE)
            except Exception as e:
                log.warning("cannot select cgroup", cgroup=d, error=str(e))
        for name in os.listdir("/proc"):
            if name.isdigit() and self.scope.matches(read_process(int(name))):
                self._verdict(int(name), True)

    # ---- reload

    def reload(self) -> bool:
        """Re-read the configuration; a bad one is refused and the running one stays."""
        self.notifier.notify("RELOADING=1")
        try:
            try:
                new = load(self.config_dir, self.overrides)
            except ConfigError as e:
                self.reloads["refused"] += 1
                self.last_reload_error = str(e)
                log.error("configuration reload refused; the running configuration stays", error=str(e))
                return False
            old = self.settings
            needs_restart = [
                k
                for k, a, b in (
                    ("capture", old.capture, new.capture),
                    ("limits.max_call_bytes", old.limits.max_call_bytes, new.limits.max_call_bytes),
                    ("trace.scope", old.trace.scope, new.trace.scope),
                )
                if a != b
            ]
            if new.output != old.output or new.redaction != old.redaction:
                try:
                    outputs = self._make_outputs(new)
                except Exception as e:
                    self.reloads["refused"] += 1
                    self.last_reload_error = f"outputs: {e}"
                    log.error("configuration reload refused: cannot open outputs", error=str(e))
                    return False
                with self._emit_lock:
                    old_outputs, self.outputs = self.outputs, outputs
                if old_outputs is not None:
                    old_outputs.close()
            llog.setup(new.daemon.log_level)
            self.settings = new
            if new.trace != old.trace:
                self.scope = Scope.from_settings(new.trace)
                self._apply_scope()
                cap = self.capture
                if cap is not None and hasattr(cap.discovery, "reset_scope"):
                    cap.discovery.reset_scope()  # it cached per-pid answers of the old scope
            self.reloads["ok"] += 1
            self.last_reload_error = ""
            log.info("configuration reloaded", sources=new.sources)
            if needs_restart:
                log.warning("changed settings take effect after a restart", keys=needs_restart)
            return True
        finally:
            self.notifier.notify("READY=1")

    # ---- status

    def health(self, now: float | None = None) -> str | None:
        """None when reader and worker are alive and progressing, else what is wrong."""
        now = time.monotonic() if now is None else now
        cap = self.capture
        if cap is None:
            return "not started"
        if not cap.reader.alive:
            return "reader thread is dead"
        if now - cap.reader.last_poll_monotonic > STALL_S:
            return f"reader stuck for {now - cap.reader.last_poll_monotonic:.0f}s"
        if self._worker is None or not self._worker.is_alive():
            return "worker thread is dead"
        if now - self.worker_heartbeat > STALL_S:
            return f"worker stuck for {now - self.worker_heartbeat:.0f}s"
        return None

    def status(self) -> dict[str, Any]:
        cap = self.capture
        bpf: dict[str, int] = {}
        attached: list[dict[str, Any]] = []
        reader: dict[str, int] = {}
        if cap is not None:
            try:
                bpf = dict(cap.probes.stats())
            except Exception as e:
                log.debug("reading BPF stats failed", error=str(e))
            for att in cap.probes.attached().values():
                t = att.target
                attached.append({"path": t.path, "stack": t.stack.name.lower(), "roles": list(att.roles), "how": t.how})
            reader = dict(cap.reader.counters)
        pipeline = dict(getattr(self.pipeline, "counters", {}) or {})
        discovery: dict[str, Any] = {}
        if cap is not None and hasattr(cap.discovery, "status"):
            try:
                discovery = cap.discovery.status()
            except Exception as e:
                log.debug("discovery status failed", error=str(e))
        losses = {
            k: bpf.get(k, 0) for k in ("lost_records", "lost_bytes", "lost_events", "truncated_calls", "truncated_bytes")
        }
        losses["decode_errors"] = reader.get("decode_errors", 0)
        losses["dropped_batches"] = self.counters.dropped_batches
        out = self.outputs
        return {
            "pid": os.getpid(),
            "ready": self.ready,
            "started": self.started,
            "updated": time.time(),
            "health": self.health() or "ok",
            "config": self.settings.sources,
            "reloads": dict(self.reloads),
            "last_reload_error": self.last_reload_error,
            "scope": self.settings.trace.scope,
            "processes_traced": len(self.counters.pids),
            "probes": attached,
            "discovery": discovery,
            "exchanges": self.counters.exchanges,
            "sinks": {s.name: {"errors": out.errors.get(s.name, 0)} for s in out.sinks} if out else {},
            "bpf": bpf,
            "reader": reader,
            "pipeline": {k: v for k, v in pipeline.items() if isinstance(v, (int, float, str))},
            "losses": losses,
            "queue": {"waiting": self._queue.qsize(), "waits": self.counters.queue_waits},
        }

    def status_line(self) -> str:
        st = self.status()
        lost = sum(v for k, v in st["losses"].items() if not k.startswith("truncated"))
        return (
            f"{st['processes_traced']} processes, {len(st['probes'])} files probed, "
            f"{st['exchanges']} exchanges, {st['bpf'].get('bytes', 0)} bytes, "
            f"{lost} lost, {st['losses']['truncated_calls']} truncated"
        )

    def write_status(self) -> None:
        path = self.settings.daemon.status_file
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.status(), f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            if not self._status_warned:
                log.warning("cannot write status file", path=path, error=str(e))
                self._status_warned = True

    def _make_outputs(self, s: Settings) -> Outputs:
        r = s.redaction
        redactor = Redactor(
            secrets=r.secrets, content=r.content, extra_headers=r.extra_headers, extra_params=r.extra_params
        )
        if not r.secrets:
            log.warning("redaction.secrets = false: credentials will be written to the outputs")
        return Outputs(make_sinks(s.output.sinks, s.output.journal_socket), redactor)


def _redaction_summary(s: Settings) -> str:
    r = s.redaction
    if r.content:
        return "metadata only"
    return "secrets" if r.secrets else "OFF"


def _watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings systemd asks for (half its timeout); 0 when not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    wpid = os.environ.get("WATCHDOG_PID")
    if not usec or (wpid and wpid != str(os.getpid())):
        return 0.0
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return 0.0


def chunk_json(c: TlsChunk) -> dict[str, Any]:
    """One captured chunk as a JSON object (--dump-chunks; the shape `llmspy sniff --json` prints)."""
    return {
        "ts_ns": c.ts_ns,
        "pid": c.pid,
        "tid": c.tid,
        "comm": c.comm,
        "conn": c.conn,
        "direction": c.direction.name.lower(),
        "offset": c.offset,
        "len": len(c.data),
        "call_len": c.call_len,
        "stack": c.stack.name.lower(),
        "first": c.first,
        "last": c.last,
        "truncated": c.truncated,
        "fault": c.fault,
        "fd": c.fd,
        "peer": [c.peer.addr, c.peer.port] if c.peer else None,
        "cgroup_id": c.cgroup_id,
        "data": base64.b64encode(c.data).decode(),
    }


# ---- the production parts


def real_capture(settings: Settings, sink: Callable[[list[CaptureEvent]], None]) -> Capture:
    from llmspyd.bpf.abi import Verdict
    from llmspyd.bpf.libbpf import num_possible_cpus
    from llmspyd.bpf.loader import ObjectSet, objects_dir, pidns_knobs
    from llmspyd.bpf.probes import ProbeManager
    from llmspyd.capture.reader import RingReader
    from llmspyd.discovery.execwatch import ExecWatcher

    # process.bpf.o first: the first object to declare a shared map owns it
    paths = sorted(objects_dir().glob("*.bpf.o"), key=lambda p: (p.name != "process.bpf.o", p.name))
    if not paths:
        raise FileNotFoundError(f"no BPF objects in {objects_dir()} (run `make bpf`)")
    ring = settings.capture.ringbuf_bytes
    objects = ObjectSet(
        paths,
        rodata={
            "self_tgid": os.getpid(),
            "max_call_bytes": settings.limits.max_call_bytes,
            "default_verdict": int(Verdict.TRACE if settings.trace.scope == "all" else Verdict.SKIP),
            # let records gather until a quarter of the ring is used or the poll timer fires: a wakeup per
            # record costs the traced process ~10 µs per TLS call (issue 2's measurement)
            "wakeup_bytes": ring // WAKEUP_FRACTION,
            **pidns_knobs(),  # ids as this pid namespace sees them (in a container)
        },
        uprobe_multi=True,
        max_entries={"rb": ring, "scratch": num_possible_cpus()},
    )
    try:
        probes = ProbeManager(objects)
        probes.attach_global()
        discovery = ExecWatcher.for_probes(probes, prewarm_dirs=tuple(settings.trace.prewarm_dirs))
        reader = RingReader(objects.map("rb"), sink, poll_ms=settings.capture.poll_ms)
    except BaseException:
        objects.close()
        raise
    return Capture(reader=reader, probes=probes, discovery=discovery, close=objects.close)


def real_pipeline(settings: Settings, emit: Callable[[Any], None], mute: Callable[[Any], None]) -> Any:
    from llmspyd.llm.assembler import ExchangeAssembler, Limits
    from llmspyd.pipeline import Pipeline, PipelineLimits

    lim = settings.limits
    body_limits = Limits(max_raw_request_bytes=lim.max_body_bytes, max_raw_response_bytes=lim.max_body_bytes)
    return Pipeline(
        emit=emit,
        mute=mute,
        assembler_factory=lambda ctx: ExchangeAssembler(ctx, limits=body_limits),
        process_lookup=read_process,
        limits=PipelineLimits(max_connections=lim.max_connections),
    )


def real_parts() -> Parts:
    return Parts(capture=real_capture, pipeline=real_pipeline)


def run(settings: Settings, **kw: Any) -> int:
    return Daemon(settings, real_parts(), **kw).run()
