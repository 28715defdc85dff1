"""LLM layer throughput on a realistic agent mix, single core.

    .venv/bin/python -m bench.pipeline_llm [--exchanges N]

Each exchange: a ~150 KB Chat Completions request (an agent resending its
history) and a streamed ~2 KB answer in ~100 SSE events with a final usage
chunk, over HTTP/1.1 keep-alive (chunked response). Two figures:
  assembler  HTTP events -> LlmExchange (this package alone)
  pipeline   TLS chunks -> streams -> HTTP/1.1 -> assembler (llmspyd.pipeline)
Printed as exchanges/s and MB/s of captured plaintext; no assertions.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

from llmspyd.chunks import Direction, Peer, Stack, TlsChunk
from llmspyd.llm.assembler import ConnContext, ExchangeAssembler
from llmspyd.llm.conversations import ConversationTracker
from llmspyd.protocols.events import RequestData, RequestEnd, RequestHead, ResponseData, ResponseEnd, ResponseHead

REQUEST_BYTES = 150 * 1024
ANSWER_CHARS = 2000
EVENTS = 100
TLS_RECORD = 16 * 1024  # an SSL_write of a big body is split in 16 KiB records by most clients


def request_body(i: int) -> bytes:
    msgs = [{"role": "system", "content": "You are a coding agent. " * 40}]
    turn = 0
    while len(json.dumps(msgs)) < REQUEST_BYTES:
        msgs.append(
            {"role": "user", "content": f"Turn {turn}: please look at file src/mod{turn}.py " + "lorem ipsum " * 90}
        )
        msgs.append(
            {"role": "assistant", "content": "Here is the change:\n```python\n" + "x = compute(y)\n" * 60 + "```"}
        )
        turn += 1
    return json.dumps(
        {
            "model": "gpt-4o",
            "messages": msgs,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": f"session-{i}",
        }
    ).encode()


def sse_events() -> list[bytes]:
    piece = ANSWER_CHARS // EVENTS
    out = []
    for _ in range(EVENTS):
        out.append(
            b"data: "
            + json.dumps(
                {
                    "id": "chatcmpl-b",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "gpt-4o",
                    "choices": [{"index": 0, "delta": {"content": "w" * piece}, "finish_reason": None}],
                }
            ).encode()
            + b"\n\n"
        )
    out.append(
        b'data: {"id":"chatcmpl-b","choices":[],"usage":{"prompt_tokens":40000,"completion_tokens":500,'
        b'"total_tokens":40500}}\n\n'
    )
    out.append(b"data: [DONE]\n\n")
    return out


def http_events(n: int, body: bytes, events: list[bytes]) -> list:
    evs: list = []
    t = 1_000_000
    for msg in range(1, n + 1):
        evs.append(
            RequestHead(
                msg,
                t,
                "POST",
                "/v1/chat/completions",
                [("content-type", "application/json"), ("authorization", "Bearer sk-x")],
                "1.1",
                "api.openai.com",
            )
        )
        for off in range(0, len(body), TLS_RECORD):
            evs.append(RequestData(msg, t, body[off : off + TLS_RECORD]))
        evs.append(RequestEnd(msg, t))
        t += 1000
        evs.append(ResponseHead(msg, t, 200, [("content-type", "text/event-stream")]))
        for e in events:
            t += 1000
            evs.append(ResponseData(msg, t, e))
        evs.append(ResponseEnd(msg, t))
    return evs


def tls_chunks(n: int, body: bytes, events: list[bytes]) -> list[TlsChunk]:
    peer = Peer(socket.AF_INET, "127.0.0.1", 443, 40000)
    out: list[TlsChunk] = []
    offs = {Direction.WRITE: 0, Direction.READ: 0}
    t = 1_000_000

    def emit(d: Direction, data: bytes) -> None:
        nonlocal t
        t += 1000
        out.append(
            TlsChunk(
                ts_ns=t,
                pid=4242,
                tid=4242,
                comm="agent",
                conn=0xABC,
                direction=d,
                offset=offs[d],
                data=data,
                call_len=len(data),
                stack=Stack.OPENSSL,
                fd=5,
                peer=peer,
            )
        )
        offs[d] += len(data)

    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-x\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    for _ in range(n):
        emit(Direction.WRITE, head)
        for off in range(0, len(body), TLS_RECORD):
            emit(Direction.WRITE, body[off : off + TLS_RECORD])
        emit(
            Direction.READ, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for e in events:
            emit(Direction.READ, b"%x\r\n%s\r\n" % (len(e), e))
        emit(Direction.READ, b"0\r\n\r\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exchanges", type=int, default=300)
    args = ap.parse_args()
    n = args.exchanges
    body = request_body(0)
    events = sse_events()
    wire = n * (len(body) + sum(len(e) for e in events))
    print(
        f"mix: {n} exchanges, request {len(body) / 1024:.0f} KB, response {sum(len(e) for e in events) / 1024:.1f} KB "
        f"in {len(events)} SSE events ({ANSWER_CHARS} chars of text)"
    )

    evs = http_events(n, body, events)
    asm = ExchangeAssembler(ConnContext(pid=4242, comm="agent", conn=0xABC, clock_offset_ns=1), ConversationTracker())
    t0 = time.perf_counter()
    out = []
    done = 0
    for ev in evs:
        recs = asm.on_event(ev)
        done += len(recs)
        if recs and len(out) < 20:  # keep a few for the JSON figure; a daemon hands records on, it does not hoard them
            out += recs
    dt = time.perf_counter() - t0
    assert done == n and len(out[0].response.text) == ANSWER_CHARS
    print(f"assembler: {n / dt:8.0f} exchanges/s  {wire / dt / 1e6:7.1f} MB/s")

    t0 = time.perf_counter()
    for rec in out:
        rec.model_dump_json()
    dj = time.perf_counter() - t0
    print(f"record JSON: {len(out) / dj:8.0f} records/s (model_dump_json, raw bodies included)")

    try:
        from llmspyd.pipeline import Pipeline
    except ImportError as e:
        print(f"pipeline: not available ({e})")
        return
    chunks = tls_chunks(n, body, events)
    got = [0]

    def emit(rec: object) -> None:
        got[0] += 1

    pipe = Pipeline(
        emit=emit, clock_offset_ns=1, assembler_factory=lambda ctx: ExchangeAssembler(ctx, ConversationTracker())
    )
    t0 = time.perf_counter()
    for i in range(0, len(chunks), 64):  # ring-buffer batches
        pipe.feed(chunks[i : i + 64])
    dt = time.perf_counter() - t0
    print(
        f"pipeline:  {got[0] / dt:8.0f} exchanges/s  {wire / dt / 1e6:7.1f} MB/s  ({got[0]} of {n} exchanges emitted)"
    )


if __name__ == "__main__":
    main()
