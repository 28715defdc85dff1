"""TLS chunks -> per-connection, time-ordered byte streams with explicit gaps.

The capture layer hands over `TlsChunk`s, each carrying the byte `offset` of
its data in its direction. This module turns them into, per connection, one
sequence of `StreamData` / `StreamGap` items in time order across the two
directions, so the protocol layer sees the request before the response it
caused. Rules:

- contiguous data (offset == expected) is passed on;
- an offset jump is a gap: a `StreamGap` with the missing byte count comes
  first, bytes on either side of it are never glued together;
- bytes already seen (offset < expected, e.g. a duplicate record) are trimmed
  and counted as overlap;
- an offset back to 0 on a known connection means the TLS object's address was
  reused: the old connection is closed ("reused") and a new one opens;
- a connection first seen at offset > 0 (capture started mid-connection) opens
  with a gap of that many bytes.

Time order: within one `feed()` batch, the two directions of a connection are
merged by timestamp while each direction keeps its byte order. Records of one
connection that straddle batches keep arrival order (the ring buffer is close
to time order already; this merge only fixes small cross-CPU skew).

Pure: no clock, no I/O, no logging.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from llmspyd.chunks import ConnClosed, ConnKey, Direction, TlsChunk

# Close reasons carried by StreamClosed.
CLOSED = "closed"  # ConnClosed from the kernel: the TLS object was freed
REUSED = "reused"  # the TLS object's address came back with offset 0: a new connection


@dataclass(slots=True)
class StreamOpened:
    """A connection key was seen for the first time (or again after reuse).

    `chunk` is the first chunk: it carries the context (comm, fd, peer, stack,
    cgroup) the later layers attach to the connection.
    """

    key: ConnKey
    ts_ns: int
    chunk: TlsChunk


@dataclass(slots=True)
class StreamData:
    key: ConnKey
    direction: Direction
    data: bytes
    ts_ns: int


@dataclass(slots=True)
class StreamGap:
    """`missing` bytes of this direction were not captured at this point."""

    key: ConnKey
    direction: Direction
    missing: int
    ts_ns: int


@dataclass(slots=True)
class StreamClosed:
    """Both directions of the connection end; nothing more follows for this key
    (a later StreamOpened with the same key is a new connection)."""

    key: ConnKey
    ts_ns: int
    reason: str


StreamEvent = StreamOpened | StreamData | StreamGap | StreamClosed
StreamItem = StreamData | StreamGap


@dataclass(slots=True)
class _ConnState:
    next_offset: list[int] = field(default_factory=lambda: [0, 0])
    # items of the current batch not yet handed out, per direction, in byte order
    pending: tuple[list[StreamItem], list[StreamItem]] = field(default_factory=lambda: ([], []))
    last_ts: int = 0


def merge_by_time(writes: list[StreamItem], reads: list[StreamItem]) -> list[StreamItem]:
    """Interleave the two directions by timestamp, keeping each one's own order.

    A stable two-way merge: on equal timestamps the write side goes first
    (a request is written before its response can be read).
    """
    if not reads:
        return writes
    if not writes:
        return reads
    out: list[StreamItem] = []
    i = j = 0
    nw, nr = len(writes), len(reads)
    while i < nw and j < nr:
        if reads[j].ts_ns < writes[i].ts_ns:
            out.append(reads[j])
            j += 1
        else:
            out.append(writes[i])
            i += 1
    out.extend(writes[i:])
    out.extend(reads[j:])
    return out


class StreamDemux:
    """Per-connection byte-stream bookkeeping over a flow of capture events."""

    def __init__(self) -> None:
        self._conns: dict[ConnKey, _ConnState] = {}
        self.counters: dict[str, int] = {
            "gaps": 0,
            "gap_bytes": 0,
            "overlap_bytes": 0,
            "reused": 0,
            "fault_records": 0,
        }

    def __contains__(self, key: ConnKey) -> bool:
        return key in self._conns

    def __len__(self) -> int:
        return len(self._conns)

    def last_ts(self, key: ConnKey) -> int:
        st = self._conns.get(key)
        return st.last_ts if st else 0

    def keys(self) -> list[ConnKey]:
        return list(self._conns)

    def feed(self, events: Iterable[TlsChunk | ConnClosed]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        touched: dict[ConnKey, _ConnState] = {}  # keys with pending items, in first-seen order
        for ev in events:
            if isinstance(ev, TlsChunk):
                self._chunk(ev, out, touched)
            elif isinstance(ev, ConnClosed):
                key = ev.key
                st = self._conns.pop(key, None)
                if st is None:
                    continue
                self._flush(key, st, out)
                touched.pop(key, None)
                out.append(StreamClosed(key, ev.ts_ns, CLOSED))
        for key, st in touched.items():
            self._flush(key, st, out)
        return out

    def close(self, key: ConnKey, ts_ns: int, reason: str) -> list[StreamEvent]:
        """End a connection on the daemon's own initiative (idle, process exit, eviction)."""
        st = self._conns.pop(key, None)
        if st is None:
            return []
        out: list[StreamEvent] = []
        self._flush(key, st, out)
        out.append(StreamClosed(key, ts_ns, reason))
        return out

    def _chunk(self, ch: TlsChunk, out: list[StreamEvent], touched: dict[ConnKey, _ConnState]) -> None:
        key = ch.key
        d = int(ch.direction)
        st = self._conns.get(key)
        if st is not None and ch.offset == 0 and st.next_offset[d] > 0 and (ch.data or ch.fault):
            # same TLS object address, byte count restarted: the old connection is gone
            self.counters["reused"] += 1
            self._flush(key, st, out)
            touched.pop(key, None)
            del self._conns[key]
            out.append(StreamClosed(key, ch.ts_ns, REUSED))
            st = None
        if st is None:
            st = _ConnState()
            self._conns[key] = st
            out.append(StreamOpened(key, ch.ts_ns, ch))
        st.last_ts = max(st.last_ts, ch.ts_ns)
        touched[key] = st
        pending = st.pending[d]
        expected = st.next_offset[d]
        direction = ch.direction
        if ch.fault:
            self.counters["fault_records"] += 1
            if ch.first and ch.last and ch.call_len > 0 and ch.offset >= expected:
                # the whole call is known to be lost: say so now rather than at the next record
                missing = ch.offset - expected + ch.call_len
                self._gap(pending, key, direction, missing, ch.ts_ns)
                st.next_offset[d] = ch.offset + ch.call_len
            return
        data = ch.data
        if not data:
            return
        off = ch.offset
        if off > expected:
            self._gap(pending, key, direction, off - expected, ch.ts_ns)
        elif off < expected:
            dup = expected - off
            if dup >= len(data):
                self.counters["overlap_bytes"] += len(data)
                return
            self.counters["overlap_bytes"] += dup
            data = data[dup:]
            off = expected
        pending.append(StreamData(key, direction, data, ch.ts_ns))
        st.next_offset[d] = off + len(data)

    def _gap(self, pending: list[StreamItem], key: ConnKey, direction: Direction, missing: int, ts_ns: int) -> None:
        self.counters["gaps"] += 1
        self.counters["gap_bytes"] += missing
        pending.append(StreamGap(key, direction, missing, ts_ns))

    @staticmethod
    def _flush(key: ConnKey, st: _ConnState, out: list[StreamEvent]) -> None:
        w, r = st.pending
        if w or r:
            out.extend(merge_by_time(w, r))
            st.pending = ([], [])
