"""HTTP/1.x observer parser: framing, keep-alive, pipelining, encodings, upgrades, gaps, resync."""

from __future__ import annotations

import gzip
import zlib

import brotli
import h11
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspyd.protocols.events import (
    ConnectionInfo,
    MessageBroken,
    RequestData,
    RequestEnd,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseHead,
)
from llmspyd.protocols.http1 import MAX_HEAD_BYTES, Http1Connection
from tests.unit.httpwire import Clock, R, W, body, bytewise, h11_exchange, kinds, normalize, replay, split_at, tr

FULL = ["RequestHead", "RequestData", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"]


def h11_pair():
    return h11.Connection(h11.CLIENT), h11.Connection(h11.SERVER)


def flat(per: dict) -> list:
    return [e for evs in per.values() for e in evs]


def test_keep_alive_content_length_chunked_and_trailers():
    rec, clock = [], Clock()
    client, server = h11_pair()
    bodies = []
    for i in range(5):
        req_body = [b'{"model":"m","n":%d,' % i, b'"messages":[]}']
        chunked = i % 2 == 1
        req_headers = [("Host", "api.example"), ("Content-Type", "application/json")]
        length = str(len(b"".join(req_body)))
        req_headers.append(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", length))
        resp_body = [b'data: {"d":%d}\n\n' % j for j in range(4)]
        resp_headers = [("Content-Type", "text/event-stream")]
        if i % 2 == 0:
            resp_headers.append(("Transfer-Encoding", "chunked"))
        else:
            resp_headers.append(("Content-Length", str(len(b"".join(resp_body)))))
        h11_exchange(
            rec,
            clock,
            client,
            server,
            h11.Request(method="POST", target=f"/v1/chat/completions?i={i}", headers=req_headers),
            req_body,
            h11.Response(status_code=200, headers=resp_headers),
            resp_body,
            trailers=[("X-Usage", f"{i}")] if i % 2 == 0 else None,
        )
        bodies.append((b"".join(req_body), b"".join(resp_body)))
    per = tr(Http1Connection, rec)
    assert sorted(per) == [1, 2, 3, 4, 5]
    for i, (req_b, resp_b) in enumerate(bodies):
        evs = per[i + 1]
        assert kinds(evs) == FULL
        head = evs[0]
        assert head.method == "POST" and head.target == f"/v1/chat/completions?i={i}"
        assert head.authority == "api.example" and head.http_version == "1.1"
        assert ("content-type", "application/json") in head.headers
        assert evs[1].data == req_b and evs[4].data == resp_b
        assert evs[3].status == 200 and evs[3].reason == "" or evs[3].reason
        assert evs[5].trailers == ([("x-usage", str(i))] if i % 2 == 0 else [])
        # timestamps: the head is stamped with its first byte, the end with its last
        assert evs[0].ts_ns <= evs[2].ts_ns < evs[3].ts_ns <= evs[5].ts_ns


def test_pipelined_requests_are_matched_in_order():
    reqs = b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(3))
    resps = b"".join(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nr%d" % i for i in range(3))
    per = tr(Http1Connection, [(W, reqs, 10), (R, resps, 20)])
    for i in range(3):
        evs = per[i + 1]
        assert kinds(evs) == ["RequestHead", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"]
        assert evs[0].target == f"/{i}" and evs[3].data == b"r%d" % i


def test_100_continue_is_interim_and_not_a_response():
    rec = [
        (W, b"POST /up HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n", 1),
        (R, b"HTTP/1.1 100 Continue\r\n\r\n", 2),
        (W, b"abcd", 3),
        (R, b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", 4),
    ]
    per = tr(Http1Connection, rec)
    assert kinds(per[1]) == FULL
    assert per[1][3].status == 201 and per[1][3].ts_ns == 4


def test_response_without_length_ends_at_close():
    rec = [(W, b"GET / HTTP/1.0\r\n\r\n", 1), (R, b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\npart1", 2), (R, b"part2", 3)]
    per = tr(Http1Connection, rec, close_ts=9)
    assert kinds(per[1])[-1] == "ResponseEnd" and per[1][-1].ts_ns == 9
    assert body(flat(per), 1, ResponseData) == b"part1part2"


def test_head_204_304_have_no_body_even_with_content_length():
    rec = [
        (
            W,
            (
                b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
                b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n"
            ),
            1,
        ),
        (R, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 2),
        (R, b"HTTP/1.1 204 No Content\r\n\r\n", 3),
        (R, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n", 4),
        (W, b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n", 5),
        (R, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nZ", 6),
    ]
    per = tr(Http1Connection, rec)
    for m in (1, 2, 3):
        assert kinds(per[m]) == ["RequestHead", "RequestEnd", "ResponseHead", "ResponseEnd"]
    assert body(flat(per), 4, ResponseData) == b"Z"


def _encoded(coding: str, raw: bytes) -> bytes:
    if coding == "gzip":
        return gzip.compress(raw)
    if coding == "deflate":
        return zlib.compress(raw)
    if coding == "raw-deflate":
        c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return c.compress(raw) + c.flush()
    if coding == "br":
        return brotli.compress(raw)
    if coding == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    raise AssertionError(coding)


def test_content_encodings_are_undone_on_both_sides():
    raw = b'{"choices":[{"message":{"content":"' + b"hello world " * 200 + b'"}}]}'
    for coding in ("gzip", "deflate", "raw-deflate", "br", "zstd"):
        name = "deflate" if coding == "raw-deflate" else coding
        enc = _encoded(coding, raw)
        rec = [
            (
                W,
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
                % (name.encode(), len(enc))
                + enc,
                1,
            ),
            (R, b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % name.encode(), 2),
        ]
        for i in range(0, len(enc), 50):
            rec.append((R, b"%x\r\n" % len(enc[i : i + 50]) + enc[i : i + 50] + b"\r\n", 3 + i))
        rec.append((R, b"0\r\n\r\n", 10_000))
        per = tr(Http1Connection, rec)
        assert body(flat(per), 1, RequestData) == raw, coding
        assert body(flat(per), 1, ResponseData) == raw, coding
        assert kinds(per[1])[-1] == "ResponseEnd"


def test_stacked_encodings_are_undone_in_reverse():
    raw = b"x" * 5000
    enc = brotli.compress(gzip.compress(raw))
    rec = [
        (W, b"GET / HTTP/1.1\r\n\r\n", 1),
        (R, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip, br\r\nContent-Length: %d\r\n\r\n" % len(enc) + enc, 2),
    ]
    assert body(flat(tr(Http1Connection, rec)), 1, ResponseData) == raw


def test_corrupt_encoding_breaks_the_message_and_keeps_the_next():
    good = gzip.compress(b"hello " * 100)
    bad = good[:12] + b"\xff" * 8 + good[20:]
    rec = [
        (W, b"GET /1 HTTP/1.1\r\n\r\n", 1),
        (R, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bad) + bad, 2),
        (W, b"GET /2 HTTP/1.1\r\n\r\n", 3),
        (R, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(good) + good, 4),
    ]
    # how much decodes before the error depends on the cuts, so no tr() here
    for feed in (rec, bytewise(rec)):
        per = normalize(replay(Http1Connection(), feed))
        assert isinstance(per[1][-1], MessageBroken) and per[1][-1].reason == "decode_error"
        assert body(flat(per), 2, ResponseData) == b"hello " * 100


def test_unsupported_encoding_is_reported_not_passed_as_text():
    rec = [
        (W, b"GET / HTTP/1.1\r\n\r\n", 1),
        (R, b"HTTP/1.1 200 OK\r\nContent-Encoding: compress\r\nContent-Length: 3\r\n\r\nabc", 2),
    ]
    per = tr(Http1Connection, rec)
    assert per[1][-1].reason == "decode_error" and "compress" in per[1][-1].detail


def test_websocket_upgrade_is_noted_and_the_rest_passed_over():
    rec = [
        (W, b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1),
        (R, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi", 2),
        (W, b"\x81\x85abcdefghi GET / HTTP/1.1\r\n\r\n", 3),
    ]
    conn = Http1Connection()
    events = replay(conn, rec, close_ts=5)
    assert [type(e).__name__ for e in events] == [
        "RequestHead",
        "RequestEnd",
        "ResponseHead",
        "ResponseEnd",
        "ConnectionInfo",
    ]
    info = events[-1]
    assert isinstance(info, ConnectionInfo) and info.protocol == "upgrade" and info.detail["upgrade"] == "websocket"
    assert conn.upgraded == "websocket" and conn.counters["tunnel_bytes"] > 0
    assert normalize(replay(Http1Connection(), bytewise(rec), close_ts=5)) == normalize(events)


def test_refused_upgrade_keeps_parsing_http():
    rec = [
        (W, b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n", 1),
        (W, b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n", 2),  # pipelined before the answer: held
        (R, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA", 3),
        (R, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB", 4),
    ]
    per = tr(Http1Connection, rec)
    assert per[2][0].target == "/next" and body(flat(per), 2, ResponseData) == b"B"


def test_connect_tunnel():
    rec = [
        (W, b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n", 1),
        (R, b"HTTP/1.1 200 Connection established\r\n\r\n", 2),
        (W, b"\x16\x03\x01 tls bytes", 3),
    ]
    conn = Http1Connection()
    events = replay(conn, rec)
    assert conn.upgraded == "connect" and kinds(events)[-1] == "ConnectionInfo"


def test_gap_in_request_body_breaks_it_and_the_next_exchange_parses():
    conn = Http1Connection()
    ev = conn.receive(W, b"POST /a HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123456789", 1)
    ev += conn.gap(W, 50, 2)
    ev += conn.receive(W, b"x" * 40 + b"POST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nok", 3)
    ev += conn.receive(R, b"HTTP/1.1 400 Bad\r\nContent-Length: 1\r\n\r\n!", 4)
    ev += conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", 5)
    broken = [e for e in ev if isinstance(e, MessageBroken)]
    assert [(b.msg, b.reason, b.missing_bytes) for b in broken] == [(1, "gap", 50)]
    assert body(ev, 1, RequestData) == b"0123456789"  # delivered before the gap: kept
    assert kinds(ev, 2) == FULL and body(ev, 2, ResponseData) == b"hi"
    assert conn.counters["gap_bytes"] == 50 and conn.counters["resync_skipped_bytes"] == 40


def test_gap_in_the_middle_of_a_chunk_size_line():
    conn = Http1Connection()
    ev = conn.receive(W, b"GET /1 HTTP/1.1\r\n\r\n", 1)
    ev += conn.receive(R, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1", 2)
    ev += conn.gap(R, 7, 3)
    ev += conn.receive(R, b"\r\n0\r\n\r\n", 4)
    ev += conn.receive(W, b"GET /2 HTTP/1.1\r\n\r\n", 5)
    ev += conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", 6)
    assert body(ev, 1, ResponseData) == b"hello"
    assert ev[[i for i, e in enumerate(ev) if getattr(e, "msg", 0) == 1][-1]].reason == "gap"
    assert kinds(ev, 2)[-1] == "ResponseEnd" and body(ev, 2, ResponseData) == b"abc"


def test_response_lost_whole_in_a_gap_does_not_shift_matching():
    conn = Http1Connection()
    ev = conn.receive(W, b"GET /1 HTTP/1.1\r\n\r\n", 1)
    ev += conn.gap(R, 500, 2)  # response 1 lost entirely
    ev += conn.receive(W, b"GET /2 HTTP/1.1\r\n\r\n", 3)
    ev += conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nr2", 4)
    assert [(e.msg, e.reason) for e in ev if isinstance(e, MessageBroken)] == [(1, "gap")]
    assert body(ev, 2, ResponseData) == b"r2"


def test_request_lost_whole_in_a_gap_is_accounted_and_its_response_skipped():
    conn = Http1Connection()
    ev = conn.gap(W, 300, 1)
    ev += conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nr1", 2)
    ev += conn.receive(W, b"GET /2 HTTP/1.1\r\n\r\n", 3)
    ev += conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nr2", 4)
    assert [(e.msg, e.reason, e.missing_bytes) for e in ev if isinstance(e, MessageBroken)] == [(1, "gap", 300)]
    assert kinds(ev, 2) == ["RequestHead", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"]
    assert body(ev, 2, ResponseData) == b"r2" and conn.counters["orphan_responses"] == 0


def test_response_without_any_request_is_an_orphan():
    conn = Http1Connection()
    ev = conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nr1", 2)
    ev += conn.receive(W, b"GET /2 HTTP/1.1\r\n\r\n", 3)
    ev += conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nr2", 4)
    assert conn.counters["orphan_responses"] == 1
    assert kinds(ev) == ["RequestHead", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"]
    assert ev[0].msg == 1 and body(ev, 1, ResponseData) == b"r2"


def test_garbage_request_is_a_parse_error_then_resync():
    conn = Http1Connection()
    ev = conn.receive(W, b"BROKEN LINE WITHOUT VERSION\r\nX: y\r\n\r\n", 1)
    ev += conn.receive(R, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 2)
    ev += conn.receive(W, b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n", 3)
    ev += conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!", 4)
    assert [(e.msg, e.reason) for e in ev if isinstance(e, MessageBroken)] == [(1, "parse_error")]
    assert kinds(ev, 2) == ["RequestHead", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"]
    assert conn.counters["parse_errors"] == 1


def test_bad_header_and_conflicting_lengths_are_parse_errors():
    for head in (
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    ):
        conn = Http1Connection()
        ev = conn.receive(W, head, 1)
        assert isinstance(ev[-1], MessageBroken) and ev[-1].reason == "parse_error", head


def test_endless_head_hits_the_limit():
    conn = Http1Connection()
    ev = conn.receive(W, b"GET / HTTP/1.1\r\n" + b"X-A: " + b"a" * (MAX_HEAD_BYTES + 10), 1)
    assert isinstance(ev[-1], MessageBroken) and ev[-1].reason == "limit"


def test_early_response_ends_the_request_first():
    conn = Http1Connection()
    ev = conn.receive(W, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234", 1)
    ev += conn.receive(R, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n", 2)
    ev += conn.receive(W, b"56789", 3)
    assert kinds(ev) == ["RequestHead", "RequestData", "RequestEnd", "ResponseHead", "ResponseEnd"]
    assert conn.counters["request_bytes_after_response"] == 5


def test_close_mid_message_and_without_response():
    conn = Http1Connection()
    ev = conn.receive(W, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", 1)
    ev += conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 2)
    ev += conn.close(3)
    assert [(e.msg, e.reason) for e in ev if isinstance(e, MessageBroken)] == [(1, "closed"), (2, "closed")]


def test_midstream_join_resyncs_on_both_sides():
    conn = Http1Connection(midstream=True)
    ev = conn.receive(W, b'"tail of an old body"}GET /x HTTP/1.1\r\nHost: h\r\n\r\n', 1)
    ev += conn.receive(R, b"old response tail\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!", 2)
    assert isinstance(ev[0], RequestHead) and ev[0].target == "/x"
    assert body(ev, 1, ResponseData) == b"!"


_json = st.binary(min_size=0, max_size=200)


@settings(max_examples=60, deadline=None)
@given(
    exchanges=st.lists(
        st.tuples(
            st.sampled_from(["GET", "POST", "HEAD"]),
            _json,
            st.lists(_json, max_size=4),
            st.booleans(),
            st.sampled_from([200, 201, 404, 500]),
        ),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=20),
)
def test_h11_serialized_exchanges_any_split(exchanges, cuts):
    """Whatever h11 serializes is read back exactly, however the bytes are cut."""
    rec, clock = [], Clock()
    client, server = h11_pair()
    expected = []
    for method, req_body, resp_pieces, chunked, status in exchanges:
        req_body = req_body if method == "POST" else b""
        headers = [("Host", "h")]
        if method == "POST":
            headers.append(("Content-Length", str(len(req_body))))
        resp_headers = (
            [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(sum(map(len, resp_pieces))))]
        )
        pieces = [p for p in resp_pieces if p] if method != "HEAD" else []
        h11_exchange(
            rec,
            clock,
            client,
            server,
            h11.Request(method=method, target="/t", headers=headers),
            [req_body] if req_body else [],
            h11.Response(status_code=status, headers=resp_headers),
            pieces,
        )
        expected.append((method, req_body, b"".join(pieces), status))
    events = replay(Http1Connection(), split_at(rec, cuts))
    for i, (method, req_body, resp_body, status) in enumerate(expected, start=1):
        assert kinds(events, i)[0] == "RequestHead" and kinds(events, i)[-1] == "ResponseEnd"
        assert body(events, i, RequestData) == req_body
        assert body(events, i, ResponseData) == resp_body
        assert [e.status for e in events if isinstance(e, ResponseHead) and e.msg == i] == [status]
    assert not [e for e in events if isinstance(e, (MessageBroken,))]
    assert sum(isinstance(e, RequestEnd) for e in events) == sum(isinstance(e, ResponseEnd) for e in events)


def test_error_details_never_quote_captured_bytes():
    """A mangled Authorization line or a ?key= request line must not leak into records via `detail`."""
    for head in (
        b"POST / HTTP/1.1\r\nAuthorization Bearer sk-SECRET\r\n\r\n",
        b"GET /v1/models?key=AIzaSECRET HTTP/9\r\n\r\n",
    ):
        ev = Http1Connection().receive(W, head, 1)
        assert isinstance(ev[-1], MessageBroken) and "SECRET" not in ev[-1].detail


def test_transfer_encoding_gzip_chunked_response():
    enc = gzip.compress(b"streamed " * 50)
    rec = [
        (W, b"GET / HTTP/1.1\r\n\r\n", 1),
        (
            R,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n%x\r\n" % len(enc) + enc + b"\r\n0\r\n\r\n",
            2,
        ),
    ]
    assert body(flat(tr(Http1Connection, rec)), 1, ResponseData) == b"streamed " * 50


def test_response_record_before_its_late_request_record_still_matches():
    """Two threads' records can reach the ring out of order: the response waits for its request."""
    conn = Http1Connection()
    ev = conn.receive(R, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 20)
    assert ev == []
    ev += conn.receive(W, b"POST /v1/x HTTP/1.1\r\nContent-Length: 3\r\n\r\n", 10)
    ev += conn.receive(W, b"abc", 11)
    assert kinds(ev) == FULL and body(ev, 1, ResponseData) == b"ok"
    assert conn.counters["orphan_responses"] == 0


def test_a_response_nobody_asked_for_is_counted_at_close():
    conn = Http1Connection()
    ev = conn.receive(R, b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n", 5)
    ev += conn.close(6)
    assert ev == [] and conn.counters["orphan_responses"] == 1
