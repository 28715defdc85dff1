"""The pure layers composed: capture events in, LLM exchange records out.

Per connection: streams (offsets, gaps, time order) -> protocol detection ->
HTTP/1.x or HTTP/2 parser -> the LLM exchange assembler. No I/O: the caller
feeds batches from the ring-buffer reader and receives records through
`emit`; muting (kernel-side) and process facts (/proc) are callables it
injects.

Isolation, after mitmproxy's safecall: an exception in any stage for one
connection is logged and counted, that connection's state is dropped (the
assembler gets a chance to emit what it holds, marked incomplete) and the
rest of the batch and every other connection go on. Nothing propagates to
the reader thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from llmspyd.chunks import CaptureEvent, ConnClosed, ConnKey, Direction, ProcessExec, ProcessExit, TlsChunk
from llmspyd.process import ProcessInfo
from llmspyd.protocols import detect as detect_mod
from llmspyd.protocols.events import ConnectionInfo, HttpEvent
from llmspyd.protocols.http1 import Http1Connection
from llmspyd.protocols.http2 import Http2Connection
from llmspyd.streams import StreamClosed, StreamData, StreamDemux, StreamEvent, StreamGap, StreamOpened

log = structlog.get_logger()


class Assembler(Protocol):
    """What the pipeline needs from the LLM layer (llmspyd.llm.assembler.ExchangeAssembler)."""

    def on_event(self, ev: HttpEvent) -> list[Any]: ...

    def on_close(self, ts_ns: int) -> list[Any]: ...

    def wants_connection(self) -> bool | None: ...


@dataclass(frozen=True, slots=True)
class PipelineLimits:
    # Connections tracked at once. A close the kernel never reported (lost
    # record, killed process) would otherwise leak; beyond this the least
    # recently active connection is closed and its exchanges emitted.
    max_connections: int = 4096
    # Read-side bytes held while waiting for the first written bytes that tell
    # the protocol; a server that talks first is not HTTP anyway.
    max_undetected_read_bytes: int = 64 * 1024
    # A connection silent this long is forgotten (its close record may have been
    # lost). Idle flushing alone keeps it: an HTTP/2 connection reused after a
    # quiet spell must keep its HPACK state. If it speaks again after being
    # forgotten, it is picked up mid-stream.
    forget_after_ns: int = 3600 * 10**9


# connection states
_DETECTING, _ACTIVE, _IGNORED = 0, 1, 2


class _Conn:
    __slots__ = (
        "assembler",
        "first",
        "held",
        "held_read",
        "held_write",
        "idle_flushed",
        "key",
        "last_ts",
        "midstream",
        "parser",
        "protocol",
        "state",
        "why_ignored",
    )

    def __init__(self, key: ConnKey, first: TlsChunk, ts_ns: int) -> None:
        self.key = key
        self.first = first
        self.state = _DETECTING
        self.parser: Http1Connection | Http2Connection | None = None
        self.assembler: Any = None
        self.held: list[StreamData | StreamGap] = []  # items seen before the protocol was known
        self.held_write = bytearray()
        self.held_read = bytearray()
        self.midstream = False
        self.last_ts = ts_ns
        self.protocol = ""
        self.why_ignored = ""
        self.idle_flushed = False  # flush_idle already ran since the last activity


def _default_assembler_factory(ctx: Any) -> Any:
    from llmspyd.llm.assembler import ExchangeAssembler

    return ExchangeAssembler(ctx)


class Pipeline:
    def __init__(
        self,
        *,
        emit: Callable[[Any], None],
        assembler_factory: Callable[[Any], Assembler] | None = None,
        mute: Callable[[ConnKey], None] | None = None,
        process_lookup: Callable[[int, str], ProcessInfo] | None = None,
        limits: PipelineLimits = PipelineLimits(),
        clock_offset_ns: int | None = None,
    ) -> None:
        self._emit_cb = emit
        self._factory = assembler_factory or _default_assembler_factory
        self._mute_cb = mute
        self._process_lookup = process_lookup
        self.limits = limits
        # kernel timestamps are CLOCK_MONOTONIC; records want wall time
        self._clock_offset_ns = clock_offset_ns if clock_offset_ns is not None else time.time_ns() - time.monotonic_ns()
        self._demux = StreamDemux()
        self._conns: dict[ConnKey, _Conn] = {}
        self._by_pid: dict[int, set[ConnKey]] = {}
        self._processes: dict[int, ProcessInfo] = {}
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "connections",
                "http1",
                "h2",
                "unknown_protocol",
                "midstream",
                "parse_errors",
                "muted",
                "exchanges",
                "stage_errors",
                "emit_errors",
                "ignored_bytes",
                "evicted",
                "idle_flushed",
                "forgotten",
                "exit_closed",
                "exec_closed",
                "h1_tunnels",
            ),
            0,
        )

    # -- public API -----------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        out = dict(self._counters)
        out.update(self._demux.counters)
        out["open_connections"] = len(self._conns)
        return out

    def feed(self, events: Iterable[CaptureEvent]) -> None:
        """One batch from the ring-buffer reader, in ring order."""
        run: list[TlsChunk | ConnClosed] = []
        for ev in events:
            if isinstance(ev, (TlsChunk, ConnClosed)):
                run.append(ev)
                continue
            # process events are barriers: data before an exit belongs to the dying process
            if run:
                self._stream_events(self._demux.feed(run))
                run = []
            if isinstance(ev, ProcessExit):
                self._close_pid(ev.pid, ev.ts_ns, "exit")
                self._processes.pop(ev.pid, None)
            elif isinstance(ev, ProcessExec):
                # a new program image: the old TLS objects are gone with the old address space
                self._close_pid(ev.pid, ev.ts_ns, "exec")
                self._processes.pop(ev.pid, None)
        if run:
            self._stream_events(self._demux.feed(run))

    def flush_idle(self, now_ns: int, idle_ns: int) -> None:
        """Connections silent for idle_ns: responses that run until close end, whatever is in
        flight is emitted as broken ("idle"). The connection itself is kept (keep-alive pools
        reuse connections after quiet spells, and HTTP/2 must keep its HPACK state); it is
        forgotten only after `limits.forget_after_ns` of silence. idle_ns=0 flushes all."""
        for key, conn in list(self._conns.items()):
            quiet = now_ns - conn.last_ts
            if quiet >= self.limits.forget_after_ns:
                self._counters["forgotten"] += 1
                self._stream_events(self._demux.close(key, max(now_ns, conn.last_ts), "forgotten"))
                if key in self._conns:
                    self._finish(self._conns[key], max(now_ns, conn.last_ts))
            elif quiet >= idle_ns and not conn.idle_flushed:
                conn.idle_flushed = True
                self._counters["idle_flushed"] += 1
                self._guarded(conn, now_ns, lambda c=conn: self._idle(c, max(now_ns, c.last_ts)))

    def _idle(self, conn: _Conn, ts_ns: int) -> None:
        if conn.state == _DETECTING and conn.held:
            self._try_detect(conn, ts_ns, final=True)
        if conn.state == _ACTIVE and conn.parser is not None:
            events = conn.parser.idle(ts_ns)
            if events:
                self._deliver(conn, events)

    def close(self) -> None:
        """Shut down: every connection ends now and its pending exchanges are emitted."""
        for key, conn in list(self._conns.items()):
            self._stream_events(self._demux.close(key, conn.last_ts, "shutdown"))
            if key in self._conns:
                self._finish(self._conns[key], conn.last_ts)

    # -- stream events ----------------------------------------------------------------------

    def _stream_events(self, events: list[StreamEvent]) -> None:
        for ev in events:
            if isinstance(ev, (StreamData, StreamGap)):
                conn = self._conns.get(ev.key)
                if conn is None:
                    continue
                conn.last_ts = max(conn.last_ts, ev.ts_ns)
                conn.idle_flushed = False
                if conn.state == _IGNORED:
                    if isinstance(ev, StreamData):
                        self._counters["ignored_bytes"] += len(ev.data)
                    continue
                self._guarded(conn, ev.ts_ns, self._item, conn, ev)
            elif isinstance(ev, StreamOpened):
                self._open(ev)
            elif isinstance(ev, StreamClosed):
                conn = self._conns.get(ev.key)
                if conn is not None:
                    self._finish(conn, ev.ts_ns)

    def _open(self, ev: StreamOpened) -> None:
        key = ev.key
        old = self._conns.get(key)
        if old is not None:  # cannot happen (the demux closes first); never leak the old state
            self._finish(old, ev.ts_ns)
        if len(self._conns) >= self.limits.max_connections:
            victim = min(self._conns.values(), key=lambda c: c.last_ts)
            self._counters["evicted"] += 1
            log.warning(
                "connection table full: closing the least recently active",
                pid=victim.key.pid,
                conn=hex(victim.key.conn),
                limit=self.limits.max_connections,
            )
            self._stream_events(self._demux.close(victim.key, ev.ts_ns, "evicted"))
            if victim.key in self._conns:
                self._finish(victim, ev.ts_ns)
        self._conns[key] = _Conn(key, ev.chunk, ev.ts_ns)
        self._by_pid.setdefault(key.pid, set()).add(key)
        self._counters["connections"] += 1

    def _close_pid(self, pid: int, ts_ns: int, why: str) -> None:
        for key in list(self._by_pid.get(pid, ())):
            self._counters[f"{why}_closed"] += 1
            self._stream_events(self._demux.close(key, ts_ns, why))
            conn = self._conns.get(key)
            if conn is not None:
                self._finish(conn, ts_ns)

    # -- per connection ---------------------------------------------------------------------

    def _guarded(self, conn: _Conn, ts_ns: int, fn: Callable[..., None], *args: Any) -> None:
        """safecall: a failure costs this connection, never the batch or the others."""
        try:
            fn(*args)
        except Exception as e:  # isolation is the point
            self._counters["stage_errors"] += 1
            log.exception(
                "pipeline stage failed; dropping the connection's state",
                pid=conn.key.pid,
                conn=hex(conn.key.conn),
                protocol=conn.protocol or "undetected",
                error=f"{type(e).__name__}: {e}",
            )
            self._drop(conn, ts_ns, "stage_error")

    def _item(self, conn: _Conn, ev: StreamData | StreamGap) -> None:
        if conn.state == _ACTIVE:
            self._parse(conn, ev)
            return
        # still detecting
        conn.held.append(ev)
        if isinstance(ev, StreamGap):
            if ev.direction == Direction.WRITE or not conn.held_write:
                conn.midstream = True  # the start of the conversation is not known
        elif ev.direction == Direction.WRITE:
            conn.held_write += ev.data
        else:
            conn.held_read += ev.data
        self._try_detect(conn, ev.ts_ns, final=False)

    def _try_detect(self, conn: _Conn, ts_ns: int, *, final: bool) -> None:
        if conn.midstream:
            proto = detect_mod.detect_midstream(bytes(conn.held_write), bytes(conn.held_read))
        elif conn.held_write:
            proto = detect_mod.detect(bytes(conn.held_write[: detect_mod.MAX_DETECT_BYTES]))
        else:
            proto = None
        if proto is None and (final or len(conn.held_read) > self.limits.max_undetected_read_bytes):
            # the peer talks first or keeps talking while the client's first line never completes:
            # not an HTTP client connection (and the held bytes must stay bounded)
            proto = detect_mod.UNKNOWN
        if proto is None:
            return
        if proto == detect_mod.UNKNOWN:
            self._counters["unknown_protocol"] += 1
            head = bytes(conn.held_write[:4] or conn.held_read[:4])  # a few bytes: enough to tell TLS, SSH, ...
            log.debug(
                "unknown protocol: connection ignored",
                pid=conn.key.pid,
                conn=hex(conn.key.conn),
                comm=conn.first.comm,
                head=head.hex(),
            )
            self._ignore(conn, "unknown_protocol", mute=not final)
            return
        if conn.midstream:
            self._counters["midstream"] += 1
        self._counters["http1" if proto == detect_mod.HTTP1 else "h2"] += 1
        conn.protocol = proto
        conn.parser = Http2Connection() if proto == detect_mod.H2 else Http1Connection(midstream=conn.midstream)
        conn.assembler = self._factory(self._context(conn, proto))
        conn.state = _ACTIVE
        self._deliver(
            conn, [ConnectionInfo(proto, conn.held[0].ts_ns if conn.held else ts_ns, {"midstream": conn.midstream})]
        )
        held, conn.held = conn.held, []
        conn.held_write = bytearray()
        conn.held_read = bytearray()
        for item in held:
            if conn.state != _ACTIVE:
                break
            self._parse(conn, item)

    def _context(self, conn: _Conn, proto: str) -> Any:
        from llmspyd.llm.assembler import ConnContext

        ch = conn.first
        return ConnContext(
            pid=ch.pid,
            comm=ch.comm,
            conn=ch.conn,
            peer=ch.peer,
            fd=ch.fd,
            stack=ch.stack.name.lower(),
            cgroup_id=ch.cgroup_id,
            process=self._process(ch.pid, ch.comm),
            http_version="2" if proto == detect_mod.H2 else "1.1",
            clock_offset_ns=self._clock_offset_ns,
        )

    def _process(self, pid: int, comm: str) -> ProcessInfo | None:
        if self._process_lookup is None:
            return None
        info = self._processes.get(pid)
        if info is None:
            try:
                info = self._process_lookup(pid, comm)
            except Exception as e:  # noqa: BLE001 - process facts are a bonus, never worth a connection
                log.debug("process lookup failed", pid=pid, error=str(e))
                return None
            self._processes[pid] = info
        return info

    def _parse(self, conn: _Conn, ev: StreamData | StreamGap) -> None:
        parser = conn.parser
        assert parser is not None
        if isinstance(ev, StreamData):
            http_events = parser.receive(ev.direction, ev.data, ev.ts_ns)
        else:
            http_events = parser.gap(ev.direction, ev.missing, ev.ts_ns)
        if http_events:
            self._deliver(conn, http_events)
            if conn.assembler is not None and conn.assembler.wants_connection() is False:
                self._counters["muted"] += 1
                self._ignore(conn, "not_llm", mute=True)

    def _deliver(self, conn: _Conn, http_events: list[HttpEvent]) -> None:
        asm = conn.assembler
        for hev in http_events:
            for exchange in asm.on_event(hev):
                self._emit(exchange)

    def _emit(self, exchange: Any) -> None:
        self._counters["exchanges"] += 1
        try:
            self._emit_cb(exchange)
        except Exception as e:  # a sink failure must not stop parsing
            self._counters["emit_errors"] += 1
            log.exception("emit failed", error=f"{type(e).__name__}: {e}")

    def _ignore(self, conn: _Conn, why: str, *, mute: bool) -> None:
        """Stop parsing this connection; bytes that still come are only counted."""
        ts = conn.last_ts
        asm = conn.assembler
        self._release(conn)
        conn.state = _IGNORED
        conn.why_ignored = why
        if asm is not None:
            try:
                for exchange in asm.on_close(ts):
                    self._emit(exchange)
            except Exception as e:  # the connection is being dropped anyway
                self._counters["stage_errors"] += 1
                log.exception("assembler close failed", error=f"{type(e).__name__}: {e}")
        if mute and self._mute_cb is not None:
            try:
                self._mute_cb(conn.key)
            except Exception as e:  # noqa: BLE001 - muting is an optimisation; parsing already stopped
                log.warning("mute failed", pid=conn.key.pid, conn=hex(conn.key.conn), error=str(e))

    def _drop(self, conn: _Conn, ts_ns: int, why: str) -> None:
        """After a stage error: flush what the assembler holds, then ignore the connection."""
        conn.last_ts = max(conn.last_ts, ts_ns)
        self._ignore(conn, why, mute=False)

    def _release(self, conn: _Conn) -> None:
        parser = conn.parser
        if parser is not None:
            # per-connection parser counters add up under h1_/h2_ names (h1_orphan_responses, h2_rst_streams, ...)
            prefix = "h1_" if isinstance(parser, Http1Connection) else "h2_"
            for name, value in parser.counters.items():
                self._counters[prefix + name] = self._counters.get(prefix + name, 0) + value
            self._counters["parse_errors"] += parser.counters.get("parse_errors", 0)
            if isinstance(parser, Http1Connection) and parser.upgraded is not None:
                self._counters["h1_tunnels"] += 1
        conn.parser = None
        conn.assembler = None
        conn.held = []
        conn.held_write = bytearray()
        conn.held_read = bytearray()

    def _finish(self, conn: _Conn, ts_ns: int) -> None:
        """The connection ended: parser close -> assembler close -> emit; forget it."""
        self._conns.pop(conn.key, None)
        keys = self._by_pid.get(conn.key.pid)
        if keys is not None:
            keys.discard(conn.key)
            if not keys:
                del self._by_pid[conn.key.pid]
        if conn.state == _DETECTING and conn.held:
            self._guarded(conn, ts_ns, lambda: self._try_detect(conn, ts_ns, final=True))
        if conn.state == _ACTIVE:
            self._guarded(conn, ts_ns, self._close_active, conn, ts_ns)
        if conn.state == _ACTIVE:  # closed cleanly
            self._release(conn)
        conn.state = _IGNORED

    def _close_active(self, conn: _Conn, ts_ns: int) -> None:
        assert conn.parser is not None
        events = conn.parser.close(ts_ns)
        if events:
            self._deliver(conn, events)
        asm = conn.assembler
        for exchange in asm.on_close(ts_ns):
            self._emit(exchange)
