"""HTTP/2 observer parser on bytes produced by real h2 endpoints talking to each other."""

from __future__ import annotations

import gzip

import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspyd.protocols.events import MessageBroken, RequestData, RequestHead, ResponseData, ResponseHead
from llmspyd.protocols.http2 import MAX_CONTINUATION_FRAMES, PREFACE, Http2Connection
from tests.unit.httpwire import H2Pair, R, W, body, kinds, normalize, replay, split_at, tr

FULL = ["RequestHead", "RequestData", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"]


def flat(per: dict) -> list:
    return [e for evs in per.values() for e in evs]


def test_one_streamed_exchange():
    p = H2Pair()
    sid = p.request("/v1/messages", b'{"model":"claude","stream":true}', extra=[("x-api-key", "sk-secret")])
    p.respond(
        sid,
        200,
        [b"event: a\ndata: {}\n\n", b"event: b\ndata: {}\n\n"],
        headers=[("content-type", "text/event-stream")],
    )
    per = tr(Http2Connection, p.rec)
    evs = per[sid]
    assert kinds(evs) == FULL
    head = evs[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.authority, head.http_version) == ("POST", "/v1/messages", "api.example", "2")
    assert ("x-api-key", "sk-secret") in head.headers and not any(n.startswith(":") for n, _ in head.headers)
    assert evs[1].data == b'{"model":"claude","stream":true}'
    assert isinstance(evs[3], ResponseHead) and evs[3].status == 200
    assert evs[4].data == b"event: a\ndata: {}\n\nevent: b\ndata: {}\n\n"
    assert evs[0].ts_ns <= evs[2].ts_ns < evs[3].ts_ns < evs[5].ts_ns


def test_many_concurrent_streams_interleaved():
    p = H2Pair()
    sids = [p.request(f"/s/{i}", b"req%d" % i) for i in range(25)]
    for i in range(3):  # responses interleaved across streams
        for sid in sids:
            if i == 0:
                p.server.send_headers(sid, [(":status", "200")])
            p.server.send_data(sid, b"r%d-%d;" % (sid, i), end_stream=i == 2)
            p.flush()
    per = tr(Http2Connection, p.rec)
    assert sorted(k for k in per if isinstance(k, int)) == sids
    for i, sid in enumerate(sids):
        assert kinds(per[sid]) == FULL
        assert per[sid][0].target == f"/s/{i}"
        assert per[sid][4].data == b"r%d-0;r%d-1;r%d-2;" % (sid, sid, sid)


def test_big_hpack_tables_with_evictions_stay_in_sync():
    p = H2Pair(server_settings={1: 65536}, client_settings={1: 65536})
    sids = []
    for i in range(60):
        extra = [(f"x-h{j}", f"value-{i}-{j}-" + "v" * 50) for j in range(i % 7)] + [("x-same", "constant")]
        sid = p.request("/p", b"b", extra=extra)
        p.respond(sid, 200, [b"ok"], headers=[(f"x-r{i}", "r" * (i * 10)), ("x-same", "constant")])
        sids.append((sid, extra, i))
    per = tr(Http2Connection, p.rec)
    for sid, extra, i in sids:
        head = per[sid][0]
        for name, value in extra:
            assert (name, value) in head.headers
        assert (f"x-r{i}", "r" * (i * 10)) in per[sid][3].headers


def test_trailers_padding_and_gzip():
    p = H2Pair()
    sid = p.request("/grpc-ish", b"x")
    raw = b'{"text":"' + b"hello " * 500 + b'"}'
    enc = gzip.compress(raw)
    p.respond(
        sid,
        200,
        [enc[:100], enc[100:]],
        headers=[("content-encoding", "gzip")],
        trailers=[("grpc-status", "0"), ("x-usage", "12")],
        pad=17,
    )
    per = tr(Http2Connection, p.rec)
    assert body(flat(per), sid, ResponseData) == raw
    assert per[sid][-1].trailers == [("grpc-status", "0"), ("x-usage", "12")]


def test_interim_100_then_final_response():
    p = H2Pair()
    sid = p.request("/up", b"data", extra=[("expect", "100-continue")])
    p.server.send_headers(sid, [(":status", "100")])
    p.respond(sid, 201, [b"made"])
    per = tr(Http2Connection, p.rec)
    assert [e.status for e in per[sid] if isinstance(e, ResponseHead)] == [201]


def test_rst_stream_breaks_only_that_stream():
    p = H2Pair()
    a = p.request("/a", b"1")
    b = p.request("/b", b"2")
    p.server.send_headers(a, [(":status", "200")])
    p.server.send_data(a, b"partial")
    p.flush()
    p.server.reset_stream(a, ErrorCodes.INTERNAL_ERROR)
    p.flush()
    p.respond(b, 200, [b"fine"])
    per = tr(Http2Connection, p.rec)
    last = per[a][-1]
    assert isinstance(last, MessageBroken) and last.reason == "rst_stream" and "INTERNAL_ERROR" in last.detail
    assert body(flat(per), a, ResponseData) == b"partial"
    assert kinds(per[b]) == FULL


def test_client_cancel_mid_response():
    p = H2Pair()
    a = p.request("/a", b"1")
    p.server.send_headers(a, [(":status", "200")])
    p.flush()
    p.client.reset_stream(a, ErrorCodes.CANCEL)
    p.flush()
    per = tr(Http2Connection, p.rec)
    assert per[a][-1].reason == "rst_stream" and "client" in per[a][-1].detail and "CANCEL" in per[a][-1].detail


def test_goaway_breaks_unprocessed_streams():
    p = H2Pair()
    a = p.request("/a", b"1")
    b = p.request("/b", b"2")
    p.respond(a, 200, [b"A", b"!"])
    p.server.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=a)
    p.flush()
    conn = Http2Connection()
    per = tr(Http2Connection, p.rec)
    assert per[b][-1].reason == "goaway"
    assert kinds(per[a]) == FULL and body(flat(per), a, ResponseData) == b"A!"
    replay(conn, p.rec)
    assert conn.goaway == ("server", a, "NO_ERROR") and conn.counters["goaways"] == 1


def _continuation_bytes(enc: hpack.Encoder, sid: int, headers: list, pieces: int, *, pad: int = 0) -> bytes:
    block = enc.encode(headers)
    step = len(block) // pieces + 1
    parts = [block[i : i + step] for i in range(0, len(block), step)]
    first = HeadersFrame(sid, data=parts[0], flags=["END_STREAM"] + (["END_HEADERS"] if len(parts) == 1 else []))
    if pad:
        first.flags.add("PADDED")
        first.pad_length = pad
    out = first.serialize()
    for i, part in enumerate(parts[1:], start=1):
        out += ContinuationFrame(sid, data=part, flags=["END_HEADERS"] if i == len(parts) - 1 else []).serialize()
    return out


def test_continuation_and_padded_headers():
    enc = hpack.Encoder()
    hdrs = [
        (":method", "GET"),
        (":path", "/c"),
        (":scheme", "https"),
        (":authority", "h"),
        *[(f"x-{i}", "y" * 40) for i in range(50)],
    ]
    wire = PREFACE + _continuation_bytes(enc, 1, hdrs, 5, pad=9)
    renc = hpack.Encoder()
    resp = HeadersFrame(1, data=renc.encode([(":status", "200")]), flags=["END_HEADERS"]).serialize()
    resp += DataFrame(1, data=b"done", flags=["END_STREAM", "PADDED"], pad_length=30).serialize()
    per = tr(Http2Connection, [(W, wire, 1), (R, resp, 2)])
    head = per[1][0]
    assert head.target == "/c" and len(head.headers) == 50
    assert kinds(per[1]) == ["RequestHead", "RequestEnd", "ResponseHead", "ResponseData", "ResponseEnd"]


def test_continuation_flood_is_capped():
    enc = hpack.Encoder()
    hdrs = [(":method", "GET"), (":path", "/c"), *[(f"x-{i}", "z" * 30) for i in range(400)]]
    wire = PREFACE + _continuation_bytes(enc, 1, hdrs, MAX_CONTINUATION_FRAMES + 10)
    conn = Http2Connection()
    ev = conn.receive(W, wire, 1)
    assert conn.dead and conn.counters["unrecoverable"] == 1
    assert ev == []  # no stream had started: nothing to break, but it is counted


def test_gap_breaks_every_open_stream_and_kills_the_connection():
    p = H2Pair()
    a = p.request("/a", b"1")
    b = p.request("/b", b"2")
    p.server.send_headers(a, [(":status", "200")])
    p.flush()
    conn = Http2Connection()
    ev = replay(conn, p.rec)
    ev += conn.gap(R, 1234, 99)
    broken = sorted((e.msg, e.reason, e.missing_bytes) for e in ev if isinstance(e, MessageBroken))
    assert broken == [(a, "gap", 1234), (b, "gap", 1234)]
    assert conn.dead and conn.counters["unrecoverable"] == 1
    assert conn.receive(R, b"\x00\x00\x04\x00\x01\x00\x00\x00\x01okay", 100) == []
    assert conn.counters["dead_bytes"] == 13


def test_bad_hpack_is_unrecoverable_not_a_crash():
    wire = PREFACE + HeadersFrame(1, data=b"\xff\xff\xff\xff\x7f", flags=["END_HEADERS"]).serialize()
    conn = Http2Connection()
    assert conn.receive(W, wire, 1) == []
    assert conn.dead and conn.counters["parse_errors"] == 1


def test_missing_preface():
    conn = Http2Connection()
    conn.receive(W, b"PRI * HTTP/1.1\r\n", 1)
    assert conn.dead


def test_close_breaks_open_streams():
    p = H2Pair()
    a = p.request("/a", b"1")
    conn = Http2Connection()
    ev = replay(conn, p.rec, close_ts=50)
    assert kinds(ev, a) == ["RequestHead", "RequestData", "RequestEnd", "MessageBroken"]
    assert ev[-1].reason == "closed"


def test_request_body_split_over_data_frames_and_request_trailers():
    p = H2Pair()
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, [(":method", "POST"), (":path", "/u"), (":scheme", "https"), (":authority", "h")])
    for i in range(5):
        p.client.send_data(sid, b"part%d," % i)
    p.client.send_headers(sid, [("x-checksum", "abc")], end_stream=True)
    p.flush()
    p.respond(sid, 200, [b"k"])
    per = tr(Http2Connection, p.rec)
    assert body(flat(per), sid, RequestData) == b"part0,part1,part2,part3,part4,"
    assert [e.trailers for e in per[sid] if type(e).__name__ == "RequestEnd"] == [[("x-checksum", "abc")]]


def _rich_recording():
    """Concurrency, CONTINUATION (h2 splits a 40 KB header block), padding, trailers, a reset."""
    p = H2Pair(server_settings={1: 8192})
    a = p.request("/a", b"A" * 3000, extra=[("x-big", "v" * 40_000)])
    b = p.request("/b", b"B")
    c = p.request("/c", b"C")
    p.server.send_headers(b, [(":status", "200"), ("content-encoding", "gzip")])
    p.flush()
    enc = gzip.compress(b"bee " * 300)
    p.server.send_data(b, enc[:50], pad_length=10)
    p.respond(a, 200, [b"x" * 10_000, b"y" * 10_000], trailers=[("x-t", "1")])
    p.server.send_data(b, enc[50:], end_stream=True)
    p.server.reset_stream(c, ErrorCodes.REFUSED_STREAM)
    p.flush()
    return p.rec, (a, b, c)


RICH, RICH_SIDS = _rich_recording()


def test_rich_recording_events():
    a, b, c = RICH_SIDS
    per = tr(Http2Connection, RICH)
    assert ("x-big", "v" * 40_000) in per[a][0].headers and per[a][-1].trailers == [("x-t", "1")]
    assert body(flat(per), b, ResponseData) == b"bee " * 300
    assert per[c][-1].reason == "rst_stream" and "REFUSED_STREAM" in per[c][-1].detail


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=sum(len(d) for _, d, _ in RICH) - 1), max_size=40))
def test_rich_recording_any_split_gives_the_same_events(cuts):
    reference = normalize(replay(Http2Connection(), RICH))
    assert normalize(replay(Http2Connection(), split_at(RICH, cuts))) == reference


def _cut(rec, item: int, a: int, b: int):
    """The recording with bytes [a, b) of item `item` replaced by a gap."""
    d, data, ts = rec[item]
    out = [("data", x) for x in rec[:item]]
    if a:
        out.append(("data", (d, data[:a], ts)))
    out.append(("gap", (d, b - a, ts)))
    if b < len(data):
        out.append(("data", (d, data[b:], ts)))
    out += [("data", x) for x in rec[item + 1 :]]
    return out


def _feed_cut(ops):
    conn = Http2Connection()
    ev = []
    for kind, args in ops:
        ev += conn.gap(*args) if kind == "gap" else conn.receive(*args)
    return conn, ev


def test_gap_inside_a_data_frame_costs_only_that_stream():
    p = H2Pair()
    a = p.request("/a", b"a" * 10_000)  # one big DATA frame on the write side
    item = len(p.rec) - 1 if p.rec[-1][0] == W else next(i for i in range(len(p.rec) - 1, -1, -1) if p.rec[i][0] == W)
    b = p.request("/b", b"b", extra=[("x-same", "indexed")])
    p.respond(a, 200, [b"ra"])
    p.respond(b, 200, [b"rb"])
    c = p.request("/c", b"c", extra=[("x-same", "indexed")])  # HPACK must still be in sync
    p.respond(c, 200, [b"rc"])
    data = p.rec[item][1]
    start = data.rfind(b"a" * 100)  # inside the payload of /a's DATA frame
    conn, ev = _feed_cut(_cut(p.rec, item, start - 500, start - 100))
    assert not conn.dead and conn.counters["gaps_inside_data"] == 1
    assert [(e.msg, e.reason, e.missing_bytes) for e in ev if isinstance(e, MessageBroken)] == [(a, "gap", 400)]
    for sid, want in ((b, b"rb"), (c, b"rc")):
        assert kinds(ev, sid)[-1] == "ResponseEnd" and body(ev, sid, ResponseData) == want
    head_c = next(e for e in ev if isinstance(e, RequestHead) and e.msg == c)
    assert ("x-same", "indexed") in head_c.headers


def test_gap_across_a_frame_boundary_is_unrecoverable():
    p = H2Pair()
    p.request("/a", b"a" * 100)
    p.request("/b", b"b")
    w_items = [i for i, (d, _, _) in enumerate(p.rec) if d == W]
    item = w_items[-1]  # /b's HEADERS + DATA: a gap over its start takes HPACK bytes
    conn, _ = _feed_cut(_cut(p.rec, item, 0, 5))
    assert conn.dead and conn.counters["unrecoverable"] == 1


def test_response_frames_before_their_late_request_record():
    """The server's bytes for a stream can reach the ring before the client's HEADERS record."""
    p = H2Pair()
    a = p.request("/a", b"ask")
    p.respond(a, 200, [b"answer"], headers=[("x-r", "1")])
    # move the client's HEADERS+DATA record after the server's response records
    w = max(i for i, (d, _, _) in enumerate(p.rec) if d == W)
    reordered = [x for i, x in enumerate(p.rec) if i != w] + [p.rec[w]]
    conn = Http2Connection()
    ev = replay(conn, reordered)
    assert kinds(ev, a) == FULL and body(ev, a, ResponseData) == b"answer"
    assert ("x-r", "1") in next(e for e in ev if isinstance(e, ResponseHead)).headers
    assert conn.counters["early_responses_replayed"] == 1


def test_early_frames_of_a_stream_that_never_opens_are_dropped_and_counted():
    p = H2Pair()
    a = p.request("/a", b"ask")
    p.respond(a, 200, [b"answer"])
    w = max(i for i, (d, _, _) in enumerate(p.rec) if d == W)
    conn = Http2Connection()
    ev = replay(conn, [x for i, x in enumerate(p.rec) if i != w], close_ts=10**9)
    assert ev == [] and conn.counters["early_frames_dropped"] >= 2


def test_table_size_update_before_its_settings_is_seen(monkeypatch):
    """A block may use a table size whose SETTINGS we have not seen yet (records out of order)."""
    p = H2Pair(client_settings={1: 65536})
    a = p.request("/a", b"1")
    p.respond(a, 200, [b"x"], headers=[("x-big", "b" * 3000), ("x-big2", "c" * 3000)])
    b = p.request("/b", b"2")
    p.respond(b, 200, [b"y"], headers=[("x-big", "b" * 3000), ("x-big2", "c" * 3000)])
    assert p.server.encoder.header_table_size == 65536  # the server's encoder really uses the bigger table
    monkeypatch.setattr(Http2Connection, "_settings", lambda self, side, frame: None)  # as if never seen
    per = tr(Http2Connection, p.rec)
    assert ("x-big2", "c" * 3000) in per[b][3].headers
