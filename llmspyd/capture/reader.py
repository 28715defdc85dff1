"""Ring buffer → llmspyd.chunks events: record decoding and the reader thread.

decode() turns one record (layout: bpf/llmspy.h, mirrored in llmspyd/bpf/abi.py)
into a CaptureEvent. It uses precompiled struct formats rather than the ctypes
mirror because it runs once per record; tests/unit/test_reader.py checks that
both agree on every field.

RingReader wakes Python once per poll, not per record: it decodes everything
available and hands the sink one list. A bad record or a failing sink is logged
and counted, never fatal.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from llmspyd.bpf import abi
from llmspyd.bpf.libbpf import BpfMap, RingBuffer
from llmspyd.chunks import (
    CaptureEvent,
    ConnClosed,
    Direction,
    Peer,
    ProcessExec,
    ProcessExit,
    Stack,
    TlsChunk,
)

log = logging.getLogger(__name__)

# struct llmspy_hdr: version, kind, size, ts_ns, pid, tid
_HDR = struct.Struct("<HHIQII")
# struct llmspy_tls_data after hdr: conn, offset, cgroup_id, call_len, data_len, fd, flags, direction, stack,
# family, peer_port, local_port, peer_addr[16], comm[16], _pad[2]
_TLS = struct.Struct(f"<QQQIIiHBBHHH16s{abi.COMM_LEN}s2x")
# data[] follows the fixed part: llmspy.h pads it so that it starts at sizeof(struct llmspy_tls_data)
TLS_DATA_OFFSET = _HDR.size + _TLS.size
_CLOSE = struct.Struct("<QB")
_EXEC = struct.Struct(f"<IIQ{abi.COMM_LEN}s{abi.PATH_LEN}s")
_EXIT = struct.Struct("<i")

# the smallest valid record of each kind: the whole fixed struct, tail padding included
_SIZES = {
    abi.Kind.TLS_DATA: ctypes.sizeof(abi.TlsData),
    abi.Kind.CONN_CLOSE: ctypes.sizeof(abi.ConnClose),
    abi.Kind.EXEC: ctypes.sizeof(abi.Exec),
    abi.Kind.EXIT: ctypes.sizeof(abi.Exit),
}

_AF_INET = int(socket.AF_INET)
_AF_INET6 = int(socket.AF_INET6)

# Bound one batch so that a flood cannot grow it without limit while the sink waits (records, then bytes).
MAX_BATCH_RECORDS = 4096
MAX_BATCH_BYTES = 32 << 20
# batches stop() still drains before giving up on a ring that keeps filling
MAX_STOP_DRAIN_BATCHES = 16

# decode error reasons (keys of the counters)
ERR_SHORT = "short_record"
ERR_VERSION = "bad_version"
ERR_KIND = "unknown_kind"
ERR_SIZE = "bad_size"
ERR_FIELD = "bad_field"

_module_errors: collections.Counter[str] = collections.Counter()


def decode_error_counts() -> dict[str, int]:
    """Decode failures, by reason, of decode() calls made without an explicit counter."""
    return dict(_module_errors)


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


def _peer(family: int, addr: bytes, port: int, local_port: int) -> Peer | None:
    if family == _AF_INET:
        return Peer(_AF_INET, socket.inet_ntop(socket.AF_INET, addr[:4]), port, local_port)
    if family == _AF_INET6:
        return Peer(_AF_INET6, socket.inet_ntop(socket.AF_INET6, addr), port, local_port)
    return None


# plain ints and lookup tables: enum construction and enum attribute access cost microseconds per record
_K_TLS = int(abi.Kind.TLS_DATA)
_K_CLOSE = int(abi.Kind.CONN_CLOSE)
_K_EXEC = int(abi.Kind.EXEC)
_K_EXIT = int(abi.Kind.EXIT)
_MIN_SIZE = {int(k): v for k, v in _SIZES.items()}
_DIRECTIONS = {int(d): d for d in Direction}
_STACKS = {int(s): s for s in Stack}
_HDR_SIZE = _HDR.size
_ABI_VERSION = abi.ABI_VERSION
_F_FIRST, _F_LAST, _F_TRUNCATED, _F_FAULT = abi.F_FIRST, abi.F_LAST, abi.F_TRUNCATED, abi.F_FAULT


def decode(record: memoryview | bytes, errors: collections.Counter[str] | None = None) -> CaptureEvent | None:
    """One ring buffer record -> event; None (and errors[reason] += 1) for a record we cannot trust."""
    errs = _module_errors if errors is None else errors
    n = len(record)
    if n < _HDR_SIZE:
        errs[ERR_SHORT] += 1
        return None
    version, kind, size, ts_ns, pid, tid = _HDR.unpack_from(record, 0)
    if version != _ABI_VERSION:
        errs[ERR_VERSION] += 1
        return None
    need = _MIN_SIZE.get(kind)
    if need is None:
        errs[ERR_KIND] += 1
        return None
    if n < need:
        errs[ERR_SHORT] += 1
        return None
    if size > n or size < need:  # hdr.size disagrees with what the ring delivered
        errs[ERR_SIZE] += 1
        return None
    if kind == _K_TLS:
        (conn, offset, cgroup_id, call_len, data_len, fd, flags, direction, stack, family, peer_port,
         local_port, peer_addr, comm) = _TLS.unpack_from(record, _HDR_SIZE)  # fmt: skip
        if TLS_DATA_OFFSET + data_len > size:
            errs[ERR_SHORT] += 1
            return None
        d = _DIRECTIONS.get(direction)
        st = _STACKS.get(stack)
        if d is None or st is None:
            errs[ERR_FIELD] += 1
            return None
        return TlsChunk(
            ts_ns,
            pid,
            tid,
            _cstr(comm),
            conn,
            d,
            offset,
            bytes(record[TLS_DATA_OFFSET : TLS_DATA_OFFSET + data_len]),
            call_len,
            st,
            bool(flags & _F_FIRST),
            bool(flags & _F_LAST),
            bool(flags & _F_TRUNCATED),
            bool(flags & _F_FAULT),
            fd,
            _peer(family, peer_addr, peer_port, local_port) if family else None,
            cgroup_id,
        )
    if kind == _K_CLOSE:
        conn, stack = _CLOSE.unpack_from(record, _HDR_SIZE)
        st = _STACKS.get(stack)
        if st is None:
            errs[ERR_FIELD] += 1
            return None
        return ConnClosed(ts_ns, pid, conn, st)
    if kind == _K_EXEC:
        ppid, uid, cgroup_id, comm, filename = _EXEC.unpack_from(record, _HDR_SIZE)
        return ProcessExec(ts_ns, pid, ppid, uid, _cstr(comm), _cstr(filename), cgroup_id)
    (exit_code,) = _EXIT.unpack_from(record, _HDR_SIZE)
    return ProcessExit(ts_ns, pid, exit_code)


class RingReader:
    """A thread that polls the ring buffer and hands decoded events, in batches, to `sink`.

    `counters`: records and bytes seen, events decoded, decode_errors, sink_errors,
    batches, poll_errors. `last_poll_monotonic` is when the loop last came around
    (for a watchdog). The sink runs on the reader thread: while it works, the
    kernel keeps filling the ring, so it should be quick.
    """

    def __init__(
        self,
        ringbuf_map: BpfMap,
        sink: Callable[[list[CaptureEvent]], None],
        *,
        poll_ms: int = 100,
        name: str = "llmspy-ring",
    ) -> None:
        self._map = ringbuf_map
        self._sink = sink
        self.poll_ms = poll_ms
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rb: RingBuffer | None = None
        self._batch: list[CaptureEvent] = []
        self._batch_bytes = 0
        self.decode_error_reasons: collections.Counter[str] = collections.Counter()
        self.counters: dict[str, int] = dict.fromkeys(
            ("records", "bytes", "events", "decode_errors", "sink_errors", "batches", "poll_errors"), 0
        )
        self.last_poll_monotonic = time.monotonic()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def native_id(self) -> int | None:
        """Kernel thread id of the reader thread (to raise its priority), None before start()."""
        return self._thread.native_id if self._thread is not None else None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("RingReader already started")
        # created here, not in the thread, so that a bad map fails the caller
        self._rb = RingBuffer(self._map.fd, self._on_record)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop after draining what is already in the ring; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("ring reader did not stop within %.1fs", timeout)
                return  # leave the ring to the thread; freeing it under a poll would crash
            self._thread = None
        if self._rb is not None:
            self._rb.close()
            self._rb = None

    def _on_record(self, record: memoryview) -> bool | None:
        c = self.counters
        c["records"] += 1
        c["bytes"] += len(record)
        self._batch_bytes += len(record)
        try:
            ev = decode(record, self.decode_error_reasons)
        except Exception:  # decode is defensive; this is for what it did not foresee
            log.exception("decoding a ring buffer record failed")
            ev = None
            self.decode_error_reasons["exception"] += 1
        if ev is None:
            c["decode_errors"] += 1
        else:
            self._batch.append(ev)
        if len(self._batch) >= MAX_BATCH_RECORDS or self._batch_bytes >= MAX_BATCH_BYTES:
            return RingBuffer.STOP
        return None

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        self._batch_bytes = 0
        if not batch:
            return
        self.counters["batches"] += 1
        self.counters["events"] += len(batch)
        try:
            self._sink(batch)
        except Exception:
            self.counters["sink_errors"] += 1
            log.exception("ring reader sink failed on a batch of %d events", len(batch))

    def _run(self) -> None:
        rb = self._rb
        assert rb is not None
        full = False
        drain_rounds = 0
        while True:
            stopping = self._stop.is_set()
            try:
                # after a full batch more is waiting: take it without sleeping
                if full or stopping:
                    rb.consume()
                elif rb.poll(self.poll_ms) == 0:
                    # the kernel may submit without waking us (common.bpf.h wakeup_bytes): collect those too
                    rb.consume()
            except Exception:
                self.counters["poll_errors"] += 1
                log.exception("ring buffer poll failed")
                self._stop.wait(self.poll_ms / 1000)  # do not spin on a persistent error
            self.last_poll_monotonic = time.monotonic()
            full = len(self._batch) >= MAX_BATCH_RECORDS or self._batch_bytes >= MAX_BATCH_BYTES
            self._flush()
            if stopping:
                drain_rounds += 1
                # under a flood the ring never empties: stop draining after a bounded number of batches
                if not full or drain_rounds >= MAX_STOP_DRAIN_BATCHES:
                    return
