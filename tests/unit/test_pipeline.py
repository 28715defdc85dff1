"""Pipeline: chunks -> streams -> detect -> HTTP -> assembler, with isolation, muting and lifecycle."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspyd.chunks import ConnClosed, ConnKey, Direction, Peer, ProcessExec, ProcessExit, Stack, TlsChunk
from llmspyd.pipeline import Pipeline, PipelineLimits
from llmspyd.process import ProcessInfo
from llmspyd.protocols.events import ConnectionInfo, MessageBroken, ResponseEnd
from llmspyd.protocols.http1 import Http1Connection
from tests.unit.httpwire import H2Pair, R, W, normalize, replay, split_at

PID = 4242


class Collector:
    """A stand-in LLM layer: keeps every event, 'completes' an exchange per ResponseEnd/MessageBroken."""

    instances: ClassVar[list[Collector]] = []

    def __init__(self, ctx, *, wants=None, explode_on=None):
        self.ctx = ctx
        self.events = []
        self.closed_at = None
        self.wants = wants
        self.explode_on = explode_on
        Collector.instances.append(self)

    def on_event(self, ev):
        if self.explode_on is not None and isinstance(ev, self.explode_on):
            raise RuntimeError("boom")
        self.events.append(ev)
        if isinstance(ev, (ResponseEnd, MessageBroken)):
            return [("exchange", self.ctx.conn, ev.msg, type(ev).__name__)]
        return []

    def on_close(self, ts_ns):
        self.closed_at = ts_ns
        return [("closed", self.ctx.conn)]

    def wants_connection(self):
        return self.wants


@pytest.fixture(autouse=True)
def _reset():
    Collector.instances = []


def chunks(rec, *, conn=0x1000, pid=PID, start=(0, 0)) -> list[TlsChunk]:
    off = list(start)
    out = []
    for d, data, ts in rec:
        out.append(
            TlsChunk(
                ts_ns=ts,
                pid=pid,
                tid=pid,
                comm="agent",
                conn=conn,
                direction=d,
                offset=off[d],
                data=data,
                call_len=len(data),
                stack=Stack.OPENSSL,
                fd=7,
                peer=Peer(2, "127.0.0.1", 443, 50000),
            )
        )
        off[d] += len(data)
    return out


def make(**kw):
    emitted = []
    muted = []
    factory = kw.pop("factory", lambda ctx: Collector(ctx))
    p = Pipeline(assembler_factory=factory, emit=emitted.append, mute=muted.append, clock_offset_ns=1, **kw)
    return p, emitted, muted


H1 = [
    (W, b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 2\r\n\r\n{}", 100),
    (R, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200),
    (W, b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n", 300),
    (R, b"HTTP/1.0 200 OK\r\n\r\nuntil close", 400),
]


def test_http1_events_reach_the_assembler_unchanged_and_context_is_filled():
    p, emitted, _ = make(process_lookup=lambda pid, comm: ProcessInfo(pid=pid, comm=comm, exe="/usr/bin/agent"))
    p.feed(chunks(H1))
    p.feed([ConnClosed(ts_ns=500, pid=PID, conn=0x1000)])
    (asm,) = Collector.instances
    assert isinstance(asm.events[0], ConnectionInfo) and asm.events[0].protocol == "http/1.1"
    direct = replay(Http1Connection(), H1, close_ts=500)
    assert normalize(asm.events[1:]) == normalize(direct)
    assert emitted == [
        ("exchange", 0x1000, 1, "ResponseEnd"),
        ("exchange", 0x1000, 2, "ResponseEnd"),
        ("closed", 0x1000),
    ]
    ctx = asm.ctx
    assert (ctx.pid, ctx.comm, ctx.conn, ctx.fd, ctx.stack, ctx.http_version) == (
        PID,
        "agent",
        0x1000,
        7,
        "openssl",
        "1.1",
    )
    assert ctx.peer.port == 443 and ctx.process.exe == "/usr/bin/agent" and ctx.clock_offset_ns == 1
    c = p.counters
    assert c["connections"] == 1 and c["http1"] == 1 and c["exchanges"] == 3 and c["open_connections"] == 0


def test_h2_connection_through_the_pipeline():
    h2p = H2Pair()
    sid = h2p.request("/v1/messages", b'{"stream":true}')
    h2p.respond(sid, 200, [b"event: x\ndata: {}\n\n"])
    p, emitted, _ = make()
    p.feed(chunks(h2p.rec))
    (asm,) = Collector.instances
    assert asm.events[0].protocol == "h2" and asm.ctx.http_version == "2"
    assert ("exchange", 0x1000, sid, "ResponseEnd") in emitted
    assert p.counters["h2"] == 1


def test_one_byte_chunks_and_any_batching_give_the_same_events():
    whole, _, _ = make()
    whole.feed(chunks(H1))
    reference = normalize(Collector.instances[0].events)
    Collector.instances = []
    split = [(d, data[i : i + 1], ts) for d, data, ts in H1 for i in range(len(data))]
    p, _, _ = make()
    cs = chunks(split)
    for i in range(0, len(cs), 7):
        p.feed(cs[i : i + 7])
    assert normalize(Collector.instances[0].events) == reference


def test_unknown_protocol_is_counted_muted_and_ignored():
    p, emitted, muted = make()
    p.feed(chunks([(W, b"\x00\x01binary protocol\r\n", 1), (R, b"whatever", 2), (W, b"more", 3)]))
    assert Collector.instances == [] and emitted == []
    assert muted == [ConnKey(PID, 0x1000)]
    c = p.counters
    assert c["unknown_protocol"] == 1 and c["ignored_bytes"] == len(b"whatever") + 4


def test_read_first_then_nothing_written_is_unknown_at_the_limit():
    p, _, muted = make(limits=PipelineLimits(max_undetected_read_bytes=10))
    p.feed(chunks([(R, b"220 smtp.example ESMTP ready\r\n", 1)]))
    assert p.counters["unknown_protocol"] == 1 and muted


def test_non_llm_connection_is_muted_once_the_assembler_says_so():
    p, emitted, muted = make(factory=lambda ctx: Collector(ctx, wants=False))
    p.feed(chunks(H1[:2]))
    assert muted == [ConnKey(PID, 0x1000)] and p.counters["muted"] == 1
    assert ("closed", 0x1000) in emitted  # the assembler was flushed before being dropped
    n = len(Collector.instances[0].events)
    p.feed(chunks(H1[2:], start=(len(H1[0][1]), len(H1[1][1]))))
    assert len(Collector.instances[0].events) == n and p.counters["ignored_bytes"] > 0


def test_a_stage_error_costs_one_connection_only():
    def factory(ctx):
        return Collector(ctx, explode_on=ResponseEnd if ctx.conn == 0xBAD else None)

    p, emitted, _ = make(factory=factory)
    p.feed(chunks(H1, conn=0xBAD) + chunks(H1, conn=0x600D))
    c = p.counters
    assert c["stage_errors"] == 1
    assert len(Collector.instances) == 2
    assert ("closed", 0xBAD) in emitted  # pending flushed via on_close after the failure
    # (the second response runs until close: not ended yet)
    assert [e for e in emitted if e[1] == 0x600D] == [("exchange", 0x600D, 1, "ResponseEnd")]
    p.feed([ConnClosed(ts_ns=650, pid=PID, conn=0x600D)])
    assert ("exchange", 0x600D, 2, "ResponseEnd") in emitted
    # the failed connection stays ignored until it closes, then its key is free again
    p.feed([ConnClosed(ts_ns=600, pid=PID, conn=0xBAD)])
    p.feed(chunks(H1[:1], conn=0xBAD))
    assert len(Collector.instances) == 3


def test_a_failing_sink_does_not_stop_parsing():
    calls = []

    def emit(x):
        calls.append(x)
        raise OSError("disk full")

    p = Pipeline(assembler_factory=lambda ctx: Collector(ctx), emit=emit, clock_offset_ns=1)
    p.feed(chunks(H1))
    p.feed([ConnClosed(ts_ns=500, pid=PID, conn=0x1000)])
    assert len(calls) == 3 and p.counters["emit_errors"] == 3 and p.counters["stage_errors"] == 0


def test_process_exit_closes_its_connections_and_ends_until_close_responses():
    p, emitted, _ = make()
    p.feed(chunks(H1, conn=1) + chunks(H1[:1], conn=2) + chunks(H1[:1], pid=777, conn=3))
    p.feed([ProcessExit(ts_ns=999, pid=PID)])
    assert ("exchange", 1, 2, "ResponseEnd") in emitted  # the HTTP/1.0 body ended with the process
    assert ("exchange", 2, 1, "MessageBroken") in emitted  # request without response: broken "closed"
    assert p.counters["open_connections"] == 1 and p.counters["exit_closed"] == 2
    brk = [e for e in Collector.instances[1].events if isinstance(e, MessageBroken)]
    assert brk[0].reason == "closed"


def test_exec_closes_the_old_image_connections():
    p, _, _ = make()
    p.feed(chunks(H1[:1], conn=5) + [ProcessExec(ts_ns=50, pid=PID, ppid=1, uid=0, comm="x", filename="/bin/x")])
    assert p.counters["exec_closed"] == 1 and p.counters["open_connections"] == 0


def test_flush_idle_ends_until_close_responses_and_forgets_only_much_later():
    p, emitted, _ = make(limits=PipelineLimits(forget_after_ns=1_000_000))
    p.feed(chunks(H1, conn=1))  # last activity at 400; the HTTP/1.0 response runs until close
    p.feed(
        [
            TlsChunk(
                ts_ns=10_000,
                pid=PID,
                tid=PID,
                comm="a",
                conn=2,
                direction=Direction.WRITE,
                offset=0,
                data=H1[0][1],
                call_len=len(H1[0][1]),
            )
        ]
    )
    p.flush_idle(now_ns=5_000, idle_ns=1_000)
    assert ("exchange", 1, 2, "ResponseEnd") in emitted  # ended by the idle timeout
    assert not [e for e in emitted if e[1] == 2]  # conn 2 is not idle yet
    assert p.counters["open_connections"] == 2 and p.counters["idle_flushed"] == 1
    p.flush_idle(now_ns=5_001, idle_ns=1_000)
    assert p.counters["idle_flushed"] == 1  # once per quiet spell
    p.flush_idle(now_ns=2_000_000, idle_ns=1_000)
    assert ("closed", 1) in emitted and ("closed", 2) in emitted and p.counters["forgotten"] == 2


def test_idle_http1_connection_is_kept_and_parses_the_next_exchange():
    p, emitted, _ = make()
    p.feed(chunks(H1[:1]))  # request sent, the response is slow
    p.flush_idle(now_ns=10_000, idle_ns=1_000)
    assert ("exchange", 0x1000, 1, "MessageBroken") in emitted
    assert [e.reason for e in Collector.instances[0].events if isinstance(e, MessageBroken)] == ["idle"]
    # the late response is framed silently; the next exchange on the same connection parses
    p.feed(
        chunks(
            [H1[1], (W, H1[2][1], 20_000), (R, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!", 20_001)],
            start=(len(H1[0][1]), 0),
        )
    )
    assert ("exchange", 0x1000, 2, "ResponseEnd") in emitted and len(Collector.instances) == 1


def test_idle_h2_connection_keeps_hpack_state():
    h2p = H2Pair()
    a = h2p.request("/a", b"1", extra=[("x-session", "s" * 40)])
    p, emitted, _ = make()
    p.feed(chunks(h2p.rec))
    mark = len(h2p.rec)
    p.flush_idle(now_ns=10**12, idle_ns=1)
    assert ("exchange", 0x1000, a, "MessageBroken") in emitted
    h2p.respond(a, 200, [b"late"])
    b = h2p.request("/b", b"2", extra=[("x-session", "s" * 40)])  # indexed from the HPACK table
    h2p.respond(b, 200, [b"ok"])
    w_off = sum(len(x) for d, x, _ in h2p.rec[:mark] if d == W)
    r_off = sum(len(x) for d, x, _ in h2p.rec[:mark] if d == R)
    later = [(d, x, 10**12 + ts) for d, x, ts in h2p.rec[mark:]]
    p.feed(chunks(later, start=(w_off, r_off)))
    assert ("exchange", 0x1000, b, "ResponseEnd") in emitted
    head_b = next(e for e in Collector.instances[0].events if type(e).__name__ == "RequestHead" and e.msg == b)
    assert ("x-session", "s" * 40) in head_b.headers


def test_reused_address_starts_a_new_connection():
    p, _, _ = make()
    p.feed(chunks(H1[:2]))
    p.feed(chunks([(W, b"GET /again HTTP/1.1\r\n\r\n", 1000)]))  # offset 0 again on the same key
    first, second = Collector.instances
    assert first.closed_at == 1000 and second.events[1].target == "/again"
    assert p.counters["reused"] == 1 and p.counters["connections"] == 2


def test_gap_reaches_the_assembler_as_broken_with_missing_bytes():
    p, _, _ = make()
    cs = chunks(H1)
    cs[1].offset += 0  # response intact
    cs[0].data = cs[0].data[:40]  # the request record lost its tail: the next write jumps
    p.feed(cs)
    evs = Collector.instances[0].events
    brk = [e for e in evs if isinstance(e, MessageBroken)]
    assert brk and brk[0].msg == 1 and brk[0].reason == "gap" and brk[0].missing_bytes == len(H1[0][1]) - 40
    assert p.counters["gaps"] == 1
    assert [e.target for e in evs if type(e).__name__ == "RequestHead"] == ["/v1/models"]


def test_midstream_join_is_http1_after_resync():
    p, _, _ = make()
    late = chunks(H1, start=(5000, 7000))
    p.feed(late)
    asm = Collector.instances[0]
    assert asm.events[0].detail == {"midstream": True}
    assert p.counters["midstream"] == 1 and p.counters["http1"] == 1


def test_connection_table_limit_evicts_the_least_recent():
    p, emitted, _ = make(limits=PipelineLimits(max_connections=2))
    p.feed(chunks(H1[:1], conn=1))
    p.feed([TlsChunk(ts_ns=150, pid=PID, tid=PID, comm="a", conn=2, direction=W, offset=0, data=H1[0][1], call_len=0)])
    p.feed([TlsChunk(ts_ns=160, pid=PID, tid=PID, comm="a", conn=3, direction=W, offset=0, data=H1[0][1], call_len=0)])
    assert p.counters["evicted"] == 1 and ("closed", 1) in emitted and p.counters["open_connections"] == 2


def test_close_flushes_everything():
    p, emitted, _ = make()
    p.feed(chunks(H1, conn=1) + chunks([(W, b"GET / HTT", 1)], conn=2))
    p.close()
    assert ("closed", 1) in emitted and p.counters["open_connections"] == 0
    # conn 2 never finished its request line: undecided at close -> unknown, not a crash
    assert p.counters["unknown_protocol"] == 1


def test_real_assembler_openai_chat_over_http1():
    """Through D's ExchangeAssembler: one OpenAI chat completion becomes one complete record."""
    req = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}]}).encode()
    resp = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
        }
    ).encode()
    rec = [
        (
            W,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(req) + req,
            1_000_000,
        ),
        (
            R,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(resp) + resp,
            2_000_000,
        ),
    ]
    emitted = []
    p = Pipeline(emit=emitted.append, clock_offset_ns=1)
    p.feed(chunks(rec))
    p.feed([ConnClosed(ts_ns=3_000_000, pid=PID, conn=0x1000)])
    (ex,) = emitted
    assert ex.provider == "openai" and ex.model == "gpt-4o-mini" and ex.complete
    assert ex.response.text == "Hi!" and ex.usage.input_tokens == 9 and ex.usage.output_tokens == 2
    assert ex.process.pid == PID


def test_real_assembler_anthropic_stream_over_h2():
    def ev(kind, **fields):
        return kind, {"type": kind, **fields}

    events = [
        ev(
            "message_start",
            message={
                "id": "msg_1",
                "model": "claude-x",
                "role": "assistant",
                "content": [],
                "usage": {"input_tokens": 5, "output_tokens": 0},
            },
        ),
        ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hel"}),
        ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "lo"}),
        ev("content_block_stop", index=0),
        ev("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 2}),
        ev("message_stop"),
    ]
    h2p = H2Pair()
    body = json.dumps(
        {"model": "claude-x", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    sid = h2p.request("/v1/messages", body, extra=[("x-api-key", "k"), ("anthropic-version", "2023-06-01")])
    h2p.respond(
        sid,
        200,
        [f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events],
        headers=[("content-type", "text/event-stream")],
    )
    emitted = []
    p = Pipeline(emit=emitted.append, clock_offset_ns=1)
    p.feed(chunks(h2p.rec))
    (ex,) = emitted
    assert ex.provider == "anthropic" and ex.stream and ex.complete
    assert ex.response.text == "Hello" and ex.usage.output_tokens == 2 and ex.ttft_ms is not None


def test_undecided_write_with_a_chatty_peer_stays_bounded():
    p, _, muted = make(limits=PipelineLimits(max_undetected_read_bytes=100))
    p.feed(chunks([(W, b"GET /never-ending-line", 1)] + [(R, b"x" * 60, 2 + i) for i in range(3)]))
    assert p.counters["unknown_protocol"] == 1 and muted


def _h2_rec():
    h2p = H2Pair()
    sids = [h2p.request(f"/s{i}", b"q" * (100 * i)) for i in range(3)]
    for sid in sids:
        h2p.respond(sid, 200, [b"event %d\n\n" % k for k in range(3)])
    return h2p.rec


H2_REC = _h2_rec()


@settings(max_examples=40, deadline=None)
@given(
    cuts1=st.lists(st.integers(1, 400), max_size=15),
    cuts2=st.lists(st.integers(1, 3000), max_size=25),
    batch=st.integers(1, 20),
    seed=st.integers(0, 10**6),
)
def test_two_connections_any_cuts_any_batches_same_events(cuts1, cuts2, batch, seed):
    """Chunks cut anywhere, two connections interleaved, any batch size: each assembler sees the same events."""
    import random

    def run(c1, c2, b):
        Collector.instances = []
        p, _, _ = make()
        rng = random.Random(seed)
        a, h = list(c1), list(c2)
        merged = []
        while a or h:  # interleave the connections randomly, keeping each one's order
            src = a if (a and (not h or rng.random() < 0.5)) else h
            merged.append(src.pop(0))
        for i in range(0, len(merged), b):
            p.feed(merged[i : i + b])
        p.close()
        return {asm.ctx.conn: normalize(asm.events) for asm in Collector.instances}

    reference = run(chunks(H1, conn=1), chunks(H2_REC, conn=2), 1000)
    got = run(chunks(split_at(H1, cuts1), conn=1), chunks(split_at(H2_REC, cuts2), conn=2), batch)
    assert got == reference


def test_a_failing_process_lookup_costs_nothing():
    def lookup(pid, comm):
        raise PermissionError("/proc")

    p, emitted, _ = make(process_lookup=lookup)
    p.feed(chunks(H1[:2]))
    assert Collector.instances[0].ctx.process is None and ("exchange", 0x1000, 1, "ResponseEnd") in emitted
    assert p.counters["stage_errors"] == 0
