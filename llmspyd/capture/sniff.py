"""`llmspy sniff`: print captured TLS plaintext live, for a person or (--json) one object per chunk.

Runs on its own: loads the probes, attaches to every TLS stack discovery finds (OpenSSL, GnuTLS, Go,
BoringSSL; --openssl-only for OpenSSL alone) now and in processes started later, prints, and on exit reports
what the kernel counted as lost. A --pid filter is applied in the
kernel (other processes cost only the probe trap); --exe and --comm are applied here.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import IO, Any

from llmspyd.chunks import CaptureEvent, ConnClosed, Direction, Peer, ProcessExec, ProcessExit, TlsChunk

log = logging.getLogger(__name__)

# bytes of each chunk shown in the human format unless --full: enough for headers and the start of a body
PREVIEW_BYTES = 2048
# how often lost-data counters are checked and reported while running
LOSS_CHECK_SECONDS = 1.0
# counters that mean bytes or events were not delivered
LOSS_COUNTERS = ("lost_records", "lost_bytes", "truncated_calls", "truncated_bytes", "fault_records", "lost_events")


def conn_key(pid: int, conn: int) -> str:
    """The connection key as printed: process and TLS object address."""
    return f"{pid}:{conn:x}"


def _peer_str(peer: Peer | None) -> str | None:
    if peer is None:
        return None
    host = f"[{peer.addr}]" if ":" in peer.addr else peer.addr
    return f"{host}:{peer.port}"


def _flags(c: TlsChunk) -> list[str]:
    return [name for name, on in (("first", c.first), ("last", c.last), ("truncated", c.truncated), ("fault", c.fault)) if on]


def chunk_json(c: TlsChunk) -> dict[str, Any]:
    return {
        "ts": c.ts_ns,
        "pid": c.pid,
        "tid": c.tid,
        "comm": c.comm,
        "conn": conn_key(c.pid, c.conn),
        "direction": "write" if c.direction == Direction.WRITE else "read",
        "offset": c.offset,
        "len": len(c.data),
        "call_len": c.call_len,
        "fd": c.fd,
        "peer": _peer_str(c.peer),
        "local_port": c.peer.local_port if c.peer else None,
        "stack": c.stack.name.lower(),
        "flags": _flags(c),
        "data": base64.b64encode(c.data).decode("ascii"),
    }


def printable(data: bytes) -> str:
    """Bytes as text a person can read: UTF-8 where it decodes, escapes for control bytes, newlines kept."""
    text = data.decode("utf-8", "backslashreplace")
    out = []
    for ch in text:
        if ch == "\n" or ch == "\t" or ch >= " " and ch != "\x7f":
            out.append(ch)
        elif ch == "\r":
            continue  # CRLF reads as LF
        else:
            out.append(f"\\x{ord(ch):02x}")
    return "".join(out)


class _Clock:
    """CLOCK_MONOTONIC ns (what the kernel stamps) -> wall time for display."""

    def __init__(self) -> None:
        self.offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)

    def fmt(self, ts_ns: int) -> str:
        return datetime.fromtimestamp(ts_ns / 1e9 + self.offset).strftime("%H:%M:%S.%f")[:-3]


def chunk_text(c: TlsChunk, clock: _Clock, full: bool = False) -> str:
    arrow = ">>" if c.direction == Direction.WRITE else "<<"
    where = f" fd={c.fd}" if c.fd >= 0 else ""
    peer = _peer_str(c.peer)
    where += f" {'to' if c.direction == Direction.WRITE else 'from'} {peer}" if peer else ""
    flags = ",".join(f for f in _flags(c) if f in ("truncated", "fault"))
    part = "" if c.first and c.last else f" part@{c.offset}"
    head = (
        f"{clock.fmt(c.ts_ns)} {c.comm}[{c.pid}/{c.tid}] {arrow} conn {conn_key(c.pid, c.conn)}{where} "
        f"{c.direction.name.lower()} {len(c.data)}B off={c.offset}{part}" + (f" [{flags}]" if flags else "")
    )
    data = c.data if full else c.data[:PREVIEW_BYTES]
    body = printable(data)
    if len(data) < len(c.data):
        body += f"\n... ({len(c.data) - len(data)} more bytes; --full shows all)"
    return head + "\n" + body.rstrip("\n") + "\n"


class ProcessFilter:
    """--exe / --comm in user space (the --pid filter is in the kernel)."""

    def __init__(self, exes: list[str], comms: list[str]) -> None:
        self.exes = [os.path.realpath(e) if "/" in e else e for e in exes]
        self.comms = [c[:15] for c in comms]
        self._exe_of: dict[int, str] = {}

    @property
    def active(self) -> bool:
        return bool(self.exes or self.comms)

    def forget(self, pid: int) -> None:
        self._exe_of.pop(pid, None)

    def note_exec(self, pid: int, filename: str) -> None:
        # a short-lived process is gone before its chunks are printed: remember what it executed
        self._exe_of[pid] = os.path.realpath(filename) if filename.startswith("/") else filename

    def _exe(self, pid: int) -> str:
        exe = self._exe_of.get(pid)
        if exe is None:
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                exe = ""
            self._exe_of[pid] = exe
        return exe

    def wants(self, pid: int, comm: str) -> bool:
        if not self.active:
            return True
        if comm in self.comms:
            return True
        if self.exes:
            exe = self._exe(pid)
            return any(exe == e or os.path.basename(exe) == e for e in self.exes)
        return False


class Printer:
    """The capture sink: filters and prints a batch of events."""

    def __init__(self, out: IO[str], *, as_json: bool, full: bool, filt: ProcessFilter, pids: set[int]) -> None:
        self.out = out
        self.as_json = as_json
        self.full = full
        self.filt = filt
        self.pids = pids
        self.clock = _Clock()
        self.chunks = 0
        self.lock = threading.Lock()

    def _wanted(self, pid: int, comm: str) -> bool:
        return (not self.pids or pid in self.pids) and self.filt.wants(pid, comm)

    def __call__(self, batch: list[CaptureEvent]) -> None:
        lines: list[str] = []
        for ev in batch:
            if isinstance(ev, TlsChunk):
                if not self._wanted(ev.pid, ev.comm):
                    continue
                self.chunks += 1
                lines.append(json.dumps(chunk_json(ev)) + "\n" if self.as_json else chunk_text(ev, self.clock, self.full))
            elif isinstance(ev, ConnClosed):
                if not self.as_json and (not self.pids or ev.pid in self.pids) and not self.filt.active:
                    lines.append(f"{self.clock.fmt(ev.ts_ns)} [{ev.pid}] conn {conn_key(ev.pid, ev.conn)} closed\n")
            elif isinstance(ev, ProcessExec):
                self.filt.note_exec(ev.pid, ev.filename)
            elif isinstance(ev, ProcessExit):  # its chunks came before it in the ring
                self.filt.forget(ev.pid)
        if lines:
            with self.lock:
                try:
                    self.out.write("".join(lines))
                    self.out.flush()
                except BrokenPipeError:
                    os.kill(os.getpid(), signal.SIGTERM)

    def note(self, text: str) -> None:
        """A line for the person watching, on stderr so --json output stays clean."""
        print(f"llmspy sniff: {text}", file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmspyd.capture.session import DEFAULT_RING_BYTES

    p.add_argument("--json", action="store_true", help="one JSON object per captured chunk (data in base64)")
    p.add_argument("--pid", type=int, action="append", default=[], help="only this process (repeatable; in the kernel)")
    p.add_argument("--exe", action="append", default=[], help="only processes of this executable: path or file name")
    p.add_argument("--comm", action="append", default=[], help="only processes with this command name")
    p.add_argument("--ring-size", type=_size, default=DEFAULT_RING_BYTES,
                   help="ring buffer bytes, a power of two (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-bytes", type=_size, default=0,
                   help="capture at most this many bytes per TLS call, 0 = all (default: 0)")  # fmt: skip
    p.add_argument("--lib", action="append", default=[], help="also probe this OpenSSL library or executable")
    p.add_argument("--openssl-only", action="store_true",
                   help="probe OpenSSL only (libssl and executables exporting SSL_*), not GnuTLS, Go, BoringSSL")  # fmt: skip
    p.add_argument("--full", action="store_true", help="print whole chunks, not the first %d bytes" % PREVIEW_BYTES)
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")


def _size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().removesuffix("ib").removesuffix("b")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def run(args: argparse.Namespace) -> int:
    from llmspyd.bpf.abi import Verdict
    from llmspyd.capture.session import CaptureSession

    logging.basicConfig(level=logging.WARNING, format="llmspy sniff: %(message)s")
    printer = Printer(sys.stdout, as_json=args.json, full=args.full, filt=ProcessFilter(args.exe, args.comm),
                      pids=set(args.pid))  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        session = CaptureSession(
            printer,
            ring_bytes=args.ring_size,
            max_call_bytes=args.max_bytes,
            default_verdict=Verdict.SKIP if args.pid else Verdict.TRACE,
            full_discovery=not args.openssl_only,
        )
    except (OSError, ValueError) as e:
        printer.note(f"cannot load the probes: {e}")
        return 1
    try:
        for pid in args.pid:
            session.probes.set_pid_verdict(pid, Verdict.TRACE)
        session.start()
        for path in args.lib:
            if not session.scanner.scan_file(path):
                printer.note(f"{path}: no OpenSSL functions to probe")
        files = session.probes.attached()
        printer.note(f"probing {len(files)} file(s): " + ", ".join(a.target.path for a in files.values()))
        printer.note("capturing; Ctrl-C to stop")
        deadline = time.monotonic() + args.duration if args.duration else None
        reported = {k: 0 for k in LOSS_COUNTERS}
        while not stop.wait(LOSS_CHECK_SECONDS):
            reported = _report_loss(session.stats(), reported, printer.note)
            if deadline is not None and time.monotonic() >= deadline:
                break
        session.reader.stop()  # drain what is in the ring before the summary
        st = session.stats()
        _report_loss(st, reported, printer.note)
        printer.note(
            f"{printer.chunks} chunk(s) shown; kernel: {st.get('calls', 0)} calls, {st.get('records', 0)} records, "
            + ", ".join(f"{k}={st.get(k, 0)}" for k in LOSS_COUNTERS)
        )
    finally:
        session.close()
    return 0


def _report_loss(st: dict[str, int], reported: dict[str, int], note: Callable[[str], None]) -> dict[str, int]:
    grown = {k: st.get(k, 0) - reported.get(k, 0) for k in LOSS_COUNTERS if st.get(k, 0) > reported.get(k, 0)}
    if grown:
        note("NOT captured since last report: " + ", ".join(f"{k} +{v}" for k, v in grown.items()))
    return {k: st.get(k, 0) for k in LOSS_COUNTERS}


def register(commands: dict) -> None:
    """Hook for llmspyd.cli: adds `llmspy sniff`."""
    commands["sniff"] = (add_arguments, run, "print captured TLS plaintext live (loads the probes itself)")
