"""Streams + HTTP parsing throughput (no LLM layer), single core.

    .venv/bin/python -m bench.pipeline_http [--exchanges N]

Realistic agent traffic on one keep-alive connection: each exchange is a
150 KB JSON request written in 16 KiB TLS records and a streamed answer of
~100 SSE events (one TLS read each). Over HTTP/1.1 (chunked response) and
HTTP/2 (bytes produced by real h2 endpoints). The chunks go through
llmspyd.pipeline.Pipeline with an assembler that only counts events, so the
figures are those of streams -> detect -> HTTP parser. Printed: MB/s of
captured plaintext, exchanges/s, HTTP events/s (best of 3, CPU time). No
timed assertions.
"""

from __future__ import annotations

import argparse
import json
import time

import h2.config
import h2.connection

from llmspyd.chunks import ConnClosed, Direction, Stack, TlsChunk
from llmspyd.pipeline import Pipeline

REQUEST_BYTES = 150 * 1024
EVENTS = 100
TLS_RECORD = 16 * 1024
PID, CONN = 1000, 0x5555


class CountingAssembler:
    events = 0
    exchanges = 0

    def __init__(self, ctx) -> None:
        pass

    def on_event(self, ev):
        CountingAssembler.events += 1
        if type(ev).__name__ == "ResponseEnd":
            CountingAssembler.exchanges += 1
        return []

    def on_close(self, ts_ns):
        return []

    def wants_connection(self):
        return True


def _request_body() -> bytes:
    msgs, turn = [], 0
    while len(json.dumps(msgs)) < REQUEST_BYTES:
        msgs.append({"role": "user", "content": f"turn {turn} " + "lorem ipsum " * 90})
        turn += 1
    return json.dumps({"model": "gpt-4o", "stream": True, "messages": msgs}).encode()


def _sse_events() -> list[bytes]:
    return [b'data: {"choices":[{"delta":{"content":"tok%03d "}}]}\n\n' % i for i in range(EVENTS)]


class _Recorder:
    def __init__(self) -> None:
        self.chunks: list[TlsChunk] = []
        self.off = [0, 0]
        self.ts = 0

    def add(self, direction: Direction, data: bytes) -> None:
        for i in range(0, len(data), TLS_RECORD):
            piece = data[i : i + TLS_RECORD]
            self.ts += 1000
            self.chunks.append(
                TlsChunk(
                    ts_ns=self.ts,
                    pid=PID,
                    tid=PID,
                    comm="bench",
                    conn=CONN,
                    direction=direction,
                    offset=self.off[direction],
                    data=piece,
                    call_len=len(piece),
                    stack=Stack.OPENSSL,
                )
            )
            self.off[direction] += len(piece)


def http1_chunks(n: int) -> list[TlsChunk]:
    rec = _Recorder()
    body = _request_body()
    for _ in range(n):
        rec.add(
            Direction.WRITE,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        )
        rec.add(
            Direction.READ, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for ev in _sse_events():
            rec.add(Direction.READ, b"%x\r\n" % len(ev) + ev + b"\r\n")
        rec.add(Direction.READ, b"0\r\n\r\n")
    return rec.chunks


def h2_chunks(n: int) -> list[TlsChunk]:
    rec = _Recorder()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    big = 1 << 24
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: big - 1})
    server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: big - 1})

    def pump() -> None:
        while True:
            moved = False
            for src, dst, d in ((client, server, Direction.WRITE), (server, client, Direction.READ)):
                out = src.data_to_send()
                if out:
                    rec.add(d, out)
                    dst.receive_data(out)
                    moved = True
            if not moved:
                return

    pump()
    # open the connection windows wide once: the bench measures parsing, not flow control
    client.increment_flow_control_window(2**30)
    server.increment_flow_control_window(2**30)
    pump()
    body = _request_body()
    for _ in range(n):
        sid = client.get_next_available_stream_id()
        client.send_headers(
            sid,
            [
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                (":scheme", "https"),
                (":authority", "api.openai.com"),
                ("content-type", "application/json"),
            ],
        )
        for i in range(0, len(body), 16_000):
            client.send_data(sid, body[i : i + 16_000])
        client.end_stream(sid)
        pump()
        server.send_headers(sid, [(":status", "200"), ("content-type", "text/event-stream")])
        for ev in _sse_events():
            server.send_data(sid, ev)
            pump()
        server.end_stream(sid)
        pump()
    return rec.chunks


def run(name: str, chunks: list[TlsChunk], n: int, repeat: int = 3) -> None:
    """Best of `repeat` runs in CPU time (the machine may be busy with other work)."""
    size = sum(len(c.data) for c in chunks)
    best = float("inf")
    for _ in range(repeat):
        CountingAssembler.events = CountingAssembler.exchanges = 0
        p = Pipeline(emit=lambda x: None, assembler_factory=CountingAssembler, clock_offset_ns=1)
        t0 = time.process_time()
        for i in range(0, len(chunks), 64):  # the reader hands over batches
            p.feed(chunks[i : i + 64])
        p.feed([ConnClosed(ts_ns=chunks[-1].ts_ns + 1, pid=PID, conn=CONN)])
        best = min(best, time.process_time() - t0)
        assert CountingAssembler.exchanges == n, (name, CountingAssembler.exchanges)
    print(
        f"{name:8s} {size / best / 1e6:8.1f} MB/s  {n / best:8.1f} exchanges/s"
        f"  {CountingAssembler.events / best:10.0f} events/s"
        f"  ({size / 1e6:.1f} MB in {len(chunks)} chunks, {best * 1e3:.0f} ms CPU)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exchanges", type=int, default=200)
    n = ap.parse_args().exchanges
    print(f"streams + HTTP parsing, {n} exchanges of {REQUEST_BYTES // 1024} KB request + {EVENTS} SSE events")
    run("http/1.1", http1_chunks(n), n)
    run("h2", h2_chunks(n), n)


if __name__ == "__main__":
    main()
