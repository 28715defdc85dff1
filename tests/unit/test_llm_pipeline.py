"""The recordings through the whole pure pipeline: TLS chunks -> streams -> HTTP/1.1 or HTTP/2 -> records.

Each recorded exchange is serialized as the bytes a client and server would
exchange (HTTP/1.1 keep-alive with a chunked response, one TLS read per
server flush; or HTTP/2 frames built with the h2 library) and fed to
llmspyd.pipeline.Pipeline. The records must carry what the recording's
expected record says; only capture-dependent fields (ids, timings,
connection, headers) are left out of the comparison.
"""

from __future__ import annotations

import copy
import socket
from typing import Any

import h2.config
import h2.connection
import pytest

from llmspyd.chunks import ConnClosed, Direction, Peer, Stack, TlsChunk
from llmspyd.llm.assembler import ExchangeAssembler
from llmspyd.llm.conversations import ConversationTracker
from tests.unit.llm_cases import Case, load_cases

pipeline = pytest.importorskip("llmspyd.pipeline")

CASES = load_cases()
HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


class Wire:
    def __init__(self) -> None:
        self.chunks: list[Any] = []
        self.off = {Direction.WRITE: 0, Direction.READ: 0}
        self.t = 1_000_000_000

    def send(self, d: Direction, data: bytes) -> None:
        if not data:
            return
        self.t += 1_000_000
        self.chunks.append(
            TlsChunk(
                ts_ns=self.t,
                pid=77,
                tid=77,
                comm="agent",
                conn=0xC0FFEE,
                direction=d,
                offset=self.off[d],
                data=data,
                call_len=len(data),
                stack=Stack.OPENSSL,
                fd=9,
                peer=Peer(socket.AF_INET, "127.0.0.1", 443, 40404),
            )
        )
        self.off[d] += len(data)

    def pieces(self, case: Case) -> list[bytes]:
        out, pos = [], 0
        for n in case.meta["response_chunks"]:
            out.append(case.response[pos : pos + n])
            pos += n
        return out


def http1(wire: Wire, case: Case) -> None:
    m = case.meta
    head = f"{m['method']} {m['target']} HTTP/1.1\r\nhost: {m['authority']}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in m["request_headers"] if k not in HOP)
    head += f"content-length: {len(case.request)}\r\n\r\n"
    wire.send(Direction.WRITE, head.encode("latin-1") + case.request)
    rhead = f"HTTP/1.1 {m['status']} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in m["response_headers"] if k not in HOP)
    wire.send(Direction.READ, (rhead + "transfer-encoding: chunked\r\n\r\n").encode("latin-1"))
    for p in wire.pieces(case):
        wire.send(Direction.READ, b"%x\r\n%s\r\n" % (len(p), p))
    wire.send(Direction.READ, b"0\r\n\r\n")


def http2(wire: Wire, cases: list[Case]) -> None:
    """All cases as concurrent streams on one connection, responses interleaved piece by piece."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    for case in cases:
        m = case.meta
        sid = client.get_next_available_stream_id()
        path = m["target"]
        hdrs = [(":method", m["method"]), (":scheme", "https"), (":authority", m["authority"]), (":path", path)]
        hdrs += [(k, v) for k, v in m["request_headers"] if k not in HOP]
        client.send_headers(sid, hdrs)
        client.send_data(sid, case.request, end_stream=True)
    data = client.data_to_send()
    wire.send(Direction.WRITE, data)
    server.receive_data(data)
    wire.send(Direction.READ, server.data_to_send())
    sids = [1 + 2 * i for i in range(len(cases))]
    for sid, case in zip(sids, cases):
        m = case.meta
        server.send_headers(
            sid, [(":status", str(m["status"]))] + [(k, v) for k, v in m["response_headers"] if k not in HOP]
        )
    wire.send(Direction.READ, server.data_to_send())
    pieces = [wire.pieces(c) for c in cases]
    for i in range(max(len(p) for p in pieces)):
        for sid, p in zip(sids, pieces):
            if i < len(p):
                server.send_data(sid, p[i], end_stream=i == len(p) - 1)
        wire.send(Direction.READ, server.data_to_send())


def comparable(rec: dict[str, Any]) -> dict[str, Any]:
    rec = copy.deepcopy(rec)
    for k in ("id", "conversation_id", "process", "connection", "timing", "latency_ms", "ttft_ms"):
        rec.pop(k)
    rec["request"].pop("headers")
    if rec["response"]:
        rec["response"].pop("headers")
        rec["response"].pop("reason")
    return rec


def run(chunks: list[Any]) -> list[dict[str, Any]]:
    got: list[Any] = []
    pipe = pipeline.Pipeline(
        emit=got.append, clock_offset_ns=1, assembler_factory=lambda ctx: ExchangeAssembler(ctx, ConversationTracker())
    )
    for i in range(0, len(chunks), 7):
        pipe.feed(chunks[i : i + 7])
    pipe.feed([ConnClosed(chunks[-1].ts_ns + 1, 77, 0xC0FFEE)])
    pipe.close()
    return [r.model_dump(mode="json") for r in got]


def test_all_recordings_over_http1_keep_alive() -> None:
    wire = Wire()
    for case in CASES:
        http1(wire, case)
    recs = run(wire.chunks)
    assert [r["api"] for r in recs] == [c.expected()["api"] for c in CASES]
    for rec, case in zip(recs, CASES):
        assert comparable(rec) == comparable(case.expected()), case.name
        assert rec["connection"]["http_version"] == "1.1" and rec["process"]["pid"] == 77


def test_streams_multiplexed_over_http2() -> None:
    picked = [c for c in CASES if c.meta["http_version"] == "2"] + [
        c
        for c in CASES
        if c.name in ("openai_chat_stream", "anthropic_messages_stream_thinking", "bedrock_converse_stream")
    ]
    wire = Wire()
    http2(wire, picked)
    recs = {(r["request"]["path"], r["request"]["body"]): r for r in run(wire.chunks)}
    assert len(recs) == len(picked)
    for case in picked:
        exp = case.expected()
        rec = recs[(exp["request"]["path"], exp["request"]["body"])]
        assert comparable(rec) == comparable(exp), case.name
        assert rec["connection"]["http_version"] == "2"
