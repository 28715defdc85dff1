"""Fuzzing: malformed, truncated and gappy input never raises, keeps the event contract, and recovers."""

from __future__ import annotations

import random

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmspyd.chunks import ConnClosed, Direction, TlsChunk
from llmspyd.pipeline import Pipeline
from llmspyd.protocols.events import MessageBroken, RequestData, ResponseData, ResponseEnd
from llmspyd.protocols.http1 import Http1Connection
from llmspyd.protocols.http2 import Http2Connection
from tests.unit.httpwire import Clock, H2Pair, R, W, body, check_contract, h11_exchange

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_text = st.text(alphabet='abcdefghij {}":,', min_size=0, max_size=120).map(str.encode)


def _h11_recording(n: int, rng: random.Random, *, chunked: bool = True):
    """n exchanges; returns the recording and, per exchange, (request body, response body, R item indexes)."""
    rec, clock = [], Clock()
    client, server = h11.Connection(h11.CLIENT), h11.Connection(h11.SERVER)
    meta = []
    for i in range(n):
        req = b'{"q":%d,"pad":"%s"}' % (i, b"p" * rng.randint(0, 80))
        pieces = [b'data: {"i":%d,"k":%d}\n\n' % (i, k) for k in range(rng.randint(1, 5))]
        use_chunked = chunked and i % 2 == 0
        length = str(sum(map(len, pieces)))
        headers = [("Transfer-Encoding", "chunked")] if use_chunked else [("Content-Length", length)]
        start = len(rec)
        h11_exchange(
            rec,
            clock,
            client,
            server,
            h11.Request(method="POST", target=f"/x/{i}", headers=[("Host", "h"), ("Content-Length", str(len(req)))]),
            [req],
            h11.Response(status_code=200, headers=headers),
            pieces,
        )
        meta.append((req, b"".join(pieces), [j for j in range(start, len(rec)) if rec[j][0] == R]))
    return rec, meta


def _feed(conn, items):
    events = []
    for it in items:
        if it[0] == "gap":
            events += conn.gap(it[1], it[2], it[3])
        else:
            events += conn.receive(*it)
    return events


@FUZZ
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from([W, R]),
            st.one_of(
                st.binary(max_size=60),
                st.sampled_from(
                    [
                        b"GET / HTTP/1.1\r\n",
                        b"HTTP/1.1 200 OK\r\n",
                        b"\r\n",
                        b"Content-Length: 5\r\n",
                        b"Transfer-Encoding: chunked\r\n",
                        b"5\r\nhello\r\n",
                        b"0\r\n\r\n",
                        b"ffffffffffffffffff\r\n",
                        b"Content-Length: -1\r\n",
                        b"Upgrade: websocket\r\nConnection: upgrade\r\n",
                        b"HTTP/1.1 101 Switching\r\n",
                        b"Content-Encoding: gzip\r\n",
                        b"\x1f\x8b\x08\x00garbage",
                    ]
                ),
                st.integers(min_value=1, max_value=10_000),
            ),
        ),
        max_size=40,
    )
)
def test_http1_random_input_never_raises_and_keeps_the_contract(ops):
    conn = Http1Connection()
    events = []
    for ts, (d, x) in enumerate(ops):
        events += conn.gap(d, x, ts) if isinstance(x, int) else conn.receive(d, x, ts)
    events += conn.close(len(ops))
    check_contract(events)


@FUZZ
@given(n=st.integers(2, 5), k=st.integers(0, 3), side=st.sampled_from([W, R]), data=st.data())
def test_http1_gap_anywhere_in_one_exchange_spares_the_following_ones(n, k, side, data):
    k = min(k, n - 2)
    rng = random.Random(n * 31 + k)
    rec, meta = _h11_recording(n, rng)
    # the items of exchange k on the chosen side
    bounds, idx = [], 0
    for i in range(n):
        count = sum(1 for _ in meta[i][2]) + 1  # one W item + its R items
        bounds.append((idx, idx + count))
        idx += count
    lo, hi = bounds[k]
    items = [j for j in range(lo, hi) if rec[j][0] == side]
    j = data.draw(st.sampled_from(items))
    d, payload, ts = rec[j]
    a = data.draw(st.integers(0, len(payload) - 1))
    b = data.draw(st.integers(a + 1, len(payload)))
    ops = [("gap", d, b - a, ts) if i == j else None for i in range(len(rec))]
    feed = []
    for i, (dd, pl, t) in enumerate(rec):
        if i == j:
            if a:
                feed.append((dd, pl[:a], t))
            feed.append(ops[i])
            if b < len(pl):
                feed.append((dd, pl[b:], t))
        else:
            feed.append((dd, pl, t))
    conn = Http1Connection()
    events = _feed(conn, feed) + conn.close(10**9)
    check_contract(events)
    broken = {e.msg for e in events if isinstance(e, MessageBroken)}
    assert k + 1 in broken or not (b - a)  # the damaged exchange is marked
    # every later exchange is read whole (the gap cost at most the damaged one)
    for i in range(k + 1, n):
        req, resp, _ = meta[i]
        msg = i + 1
        assert body(events, msg, RequestData) == req, (i, k)
        assert body(events, msg, ResponseData) == resp, (i, k)
        assert any(isinstance(e, ResponseEnd) and e.msg == msg for e in events)


def _h2_recording():
    p = H2Pair()
    sids = [p.request(f"/s/{i}", b"r" * (i * 50)) for i in range(4)]
    for sid in sids:
        p.respond(sid, 200, [b"x" * 100, b"y" * 10], headers=[("x-h", "v" * sid)])
    return p.rec


H2_REC = _h2_recording()


@FUZZ
@given(data=st.data())
def test_http2_mutations_never_raise(data):
    rec = list(H2_REC)
    for _ in range(data.draw(st.integers(1, 4))):
        j = data.draw(st.integers(0, len(rec) - 1))
        if rec[j][0] == "gap":
            continue
        d, payload, ts = rec[j]
        how = data.draw(st.sampled_from(["flip", "truncate", "insert", "drop", "gap"]))
        if how == "flip" and payload:
            pos = data.draw(st.integers(0, len(payload) - 1))
            payload = payload[:pos] + bytes([payload[pos] ^ data.draw(st.integers(1, 255))]) + payload[pos + 1 :]
        elif how == "truncate":
            payload = payload[: data.draw(st.integers(0, len(payload)))]
        elif how == "insert":
            pos = data.draw(st.integers(0, len(payload)))
            payload = payload[:pos] + data.draw(st.binary(min_size=1, max_size=30)) + payload[pos:]
        elif how == "drop":
            payload = b""
        rec[j] = ("gap", d, 17, ts) if how == "gap" else (d, payload, ts)
    conn = Http2Connection()
    events = _feed(conn, rec) + conn.close(10**9)
    check_contract(events)


def test_http2_untouched_recording_is_clean():
    conn = Http2Connection()
    events = _feed(conn, H2_REC)
    check_contract(events)
    assert not [e for e in events if isinstance(e, MessageBroken)]
    assert sum(isinstance(e, ResponseEnd) for e in events) == 4


@FUZZ
@given(
    chunks=st.lists(
        st.tuples(
            st.integers(1, 3),  # conn
            st.sampled_from([Direction.WRITE, Direction.READ]),
            st.integers(0, 400),  # offset
            st.one_of(
                st.binary(max_size=80),
                st.sampled_from(
                    [
                        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 3\r\n\r\n{}}",
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                        b"\x00\x00\x05\x01\x05\x00\x00\x00\x01\x82\x86\x84\x41\x8a",
                    ]
                ),
            ),
            st.booleans(),  # close after
        ),
        max_size=30,
    ),
)
def test_pipeline_never_lets_an_exception_out(chunks):
    emitted = []
    p = Pipeline(emit=emitted.append, clock_offset_ns=1)
    batch = []
    for ts, (conn, d, off, data, close) in enumerate(chunks):
        batch.append(
            TlsChunk(
                ts_ns=ts, pid=1, tid=1, comm="f", conn=conn, direction=d, offset=off, data=data, call_len=len(data)
            )
        )
        if close:
            batch.append(ConnClosed(ts_ns=ts, pid=1, conn=conn))
        if ts % 3 == 0:
            p.feed(batch)
            batch = []
    p.feed(batch)
    p.flush_idle(10**6, 0)
    p.close()
    c = p.counters
    # the parsers and the real assembler handled everything themselves
    assert c["stage_errors"] == 0 and c["open_connections"] == 0
