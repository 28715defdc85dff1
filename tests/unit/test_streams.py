"""streams: offsets -> contiguous data, explicit gaps, reuse, time order across directions."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from llmspyd.chunks import ConnClosed, ConnKey, Direction, TlsChunk
from llmspyd.streams import (
    CLOSED,
    REUSED,
    StreamClosed,
    StreamData,
    StreamDemux,
    StreamGap,
    StreamOpened,
)

W, R = Direction.WRITE, Direction.READ
KEY = ConnKey(10, 0xABC)


def chunk(
    direction: Direction, offset: int, data: bytes, ts: int, *, conn: int = 0xABC, pid: int = 10, **kw
) -> TlsChunk:
    return TlsChunk(
        ts_ns=ts,
        pid=pid,
        tid=pid,
        comm="agent",
        conn=conn,
        direction=direction,
        offset=offset,
        data=data,
        call_len=kw.pop("call_len", len(data)),
        **kw,
    )


def items(events):
    return [
        (type(e).__name__, getattr(e, "direction", None), getattr(e, "data", getattr(e, "missing", None)))
        for e in events
        if isinstance(e, (StreamData, StreamGap))
    ]


def test_contiguous_data_passes_through_and_opens_once():
    d = StreamDemux()
    out = d.feed([chunk(W, 0, b"GET /", 1), chunk(W, 5, b" HTTP/1.1\r\n", 2)])
    assert isinstance(out[0], StreamOpened) and out[0].key == KEY and out[0].chunk.comm == "agent"
    assert items(out) == [("StreamData", W, b"GET /"), ("StreamData", W, b" HTTP/1.1\r\n")]
    out = d.feed([chunk(W, 16, b"\r\n", 3)])
    assert not any(isinstance(e, StreamOpened) for e in out)
    assert items(out) == [("StreamData", W, b"\r\n")]


def test_offset_jump_is_an_explicit_gap_with_missing_count():
    d = StreamDemux()
    out = d.feed([chunk(R, 0, b"abc", 1), chunk(R, 10, b"xyz", 2)])
    assert items(out) == [("StreamData", R, b"abc"), ("StreamGap", R, 7), ("StreamData", R, b"xyz")]
    assert d.counters["gaps"] == 1 and d.counters["gap_bytes"] == 7
    # the next contiguous record continues after the gap
    assert items(d.feed([chunk(R, 13, b"!", 3)])) == [("StreamData", R, b"!")]


def test_late_join_opens_with_a_gap():
    d = StreamDemux()
    out = d.feed([chunk(W, 500, b"tail", 1)])
    assert items(out) == [("StreamGap", W, 500), ("StreamData", W, b"tail")]


def test_duplicate_bytes_are_trimmed_and_counted():
    d = StreamDemux()
    out = d.feed([chunk(W, 0, b"hello", 1), chunk(W, 3, b"lo world", 2), chunk(W, 4, b"o", 3)])
    assert items(out) == [("StreamData", W, b"hello"), ("StreamData", W, b" world")]
    assert d.counters["overlap_bytes"] == 3


def test_offset_back_to_zero_is_a_new_connection():
    d = StreamDemux()
    out = d.feed([chunk(W, 0, b"old", 1), chunk(R, 0, b"resp", 2), chunk(W, 0, b"new", 3)])
    kinds = [type(e).__name__ for e in out]
    assert kinds == ["StreamOpened", "StreamData", "StreamData", "StreamClosed", "StreamOpened", "StreamData"]
    assert out[3].reason == REUSED
    assert out[5].data == b"new"
    assert d.counters["reused"] == 1
    # the new connection's read offset starts from 0 again
    assert items(d.feed([chunk(R, 0, b"r2", 4)])) == [("StreamData", R, b"r2")]


def test_conn_closed_ends_both_directions_and_forgets_the_key():
    d = StreamDemux()
    out = d.feed([chunk(W, 0, b"a", 1), ConnClosed(ts_ns=5, pid=10, conn=0xABC)])
    assert isinstance(out[-1], StreamClosed) and out[-1].reason == CLOSED
    assert KEY not in d
    out = d.feed([chunk(W, 0, b"b", 6)])
    assert isinstance(out[0], StreamOpened)
    # a close for an unknown key is ignored
    assert d.feed([ConnClosed(ts_ns=7, pid=99, conn=1)]) == []


def test_fault_record_becomes_a_gap_of_its_call():
    d = StreamDemux()
    out = d.feed([chunk(W, 0, b"ab", 1), chunk(W, 2, b"", 2, call_len=40, fault=True), chunk(W, 42, b"cd", 3)])
    assert items(out) == [("StreamData", W, b"ab"), ("StreamGap", W, 40), ("StreamData", W, b"cd")]
    assert d.counters["fault_records"] == 1


def test_directions_are_merged_by_time_within_a_batch():
    d = StreamDemux()
    # a read record that arrives before the write that happened earlier (cross-CPU skew)
    out = d.feed([chunk(R, 0, b"resp", 20), chunk(W, 0, b"req1", 10), chunk(W, 4, b"req2", 30)])
    assert items(out) == [("StreamData", W, b"req1"), ("StreamData", R, b"resp"), ("StreamData", W, b"req2")]


def test_connections_are_independent():
    d = StreamDemux()
    out = d.feed([chunk(W, 0, b"a", 1, conn=1), chunk(W, 0, b"b", 2, conn=2), chunk(W, 1, b"c", 3, conn=1)])
    by_key: dict = {}
    for e in out:
        if isinstance(e, StreamData):
            by_key.setdefault(e.key.conn, b"")
            by_key[e.key.conn] += e.data
    assert by_key == {1: b"ac", 2: b"b"}


def test_close_on_daemon_initiative():
    d = StreamDemux()
    d.feed([chunk(W, 0, b"a", 1)])
    out = d.close(KEY, 99, "idle")
    assert out == [StreamClosed(KEY, 99, "idle")]
    assert d.close(KEY, 100, "idle") == []


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=10),
    drop=st.sets(st.integers(min_value=0, max_value=10), max_size=4),
    batch=st.integers(min_value=1, max_value=5),
)
def test_any_split_and_any_loss_keeps_bytes_and_counts_missing(payload, cuts, drop, batch):
    """Reassembled data + gap sizes always equal the original length; kept bytes sit at their true place."""
    bounds = sorted({0, len(payload), *(c for c in cuts if c < len(payload))})
    pieces = [(a, payload[a:b]) for a, b in itertools.pairwise(bounds)]
    sent = [chunk(W, off, data, i) for i, (off, data) in enumerate(pieces) if i not in drop]
    d = StreamDemux()
    out = []
    for i in range(0, len(sent), batch):
        out += d.feed(sent[i : i + batch])
    rebuilt = bytearray()
    for e in out:
        if isinstance(e, StreamData):
            rebuilt += e.data
        elif isinstance(e, StreamGap):
            rebuilt += b"\0" * e.missing
    expected = bytearray(payload)
    for i, (off, data) in enumerate(pieces):
        if i in drop:
            expected[off : off + len(data)] = b"\0" * len(data)
    # trailing lost pieces are unknowable until more bytes come
    last_kept = max((off + len(data) for i, (off, data) in enumerate(pieces) if i not in drop), default=0)
    assert bytes(rebuilt) == bytes(expected[:last_kept])
