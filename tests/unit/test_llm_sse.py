"""SSE parser against the WHATWG event-stream rules, fed whole, per byte and split at random."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmspyd.llm.sse import MAX_LINE_BYTES, SseEvent, SseParser


def feed(chunks: list[bytes], ts: int = 1) -> list[SseEvent]:
    p = SseParser()
    out = []
    for i, c in enumerate(chunks):
        out += p.feed(c, ts + i)
    return out


def simple(events: list[SseEvent]) -> list[tuple[str, str, str | None]]:
    return [(e.event, e.data, e.id) for e in events]


def per_byte(b: bytes) -> list[bytes]:
    return [b[i : i + 1] for i in range(len(b))]


STREAM = (
    b"\xef\xbb\xbf: comment first\n"
    b'event: message_start\ndata: {"a":1}\n\n'
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"id: 7\rdata:no space\r\r"
    b"event: ping\ndata\n\n"
    b"retry: 1500\nfoo: ignored\ndata:  two spaces\n\n"
    b"data: caf\xc3\xa9 \xe2\x82\xac\n\n"
)
EXPECTED = [
    ("message_start", '{"a":1}', None),
    ("message", "line one\nline two", None),
    ("message", "no space", "7"),
    ("ping", "", "7"),
    ("message", " two spaces", "7"),
    ("message", "café €", "7"),
]


def test_spec_cases_whole() -> None:
    p = SseParser()
    assert simple(p.feed(STREAM, 1)) == EXPECTED
    assert p.retry_ms == 1500 and p.comments == 1


def test_spec_cases_per_byte() -> None:
    assert simple(feed(per_byte(STREAM))) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=30))
def test_spec_cases_random_splits(cuts: list[int]) -> None:
    bounds = [0] + sorted(set(cuts)) + [len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:])]
    assert simple(feed(chunks)) == EXPECTED


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    # "data: a\r" | "\n\r\n": the LF after the CR must not count as a blank line (which would dispatch early)
    p = SseParser()
    assert p.feed(b"data: a\r", 1) == []
    assert p.feed(b"\ndata: b\r", 2) == []
    assert simple(p.feed(b"\n\r\n", 3)) == [("message", "a\nb", None)]


def test_event_time_is_the_chunk_that_completed_it() -> None:
    p = SseParser()
    assert p.feed(b"data: hel", 10) == []
    ev = p.feed(b"lo\n\n", 20)
    assert ev[0].ts_ns == 20 and ev[0].data == "hello"


def test_no_blank_line_no_event_and_pending_counted() -> None:
    p = SseParser()
    assert p.feed(b'data: {"partial": tr', 1) == []
    assert p.pending_bytes() > 0
    assert p.feed(b"ue}\n", 2) == []  # line complete, event not dispatched yet
    assert p.pending_bytes() > 0


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert feed([b"\n\n\r\n: keepalive\n\nevent: x\n\n"]) == []


def test_id_with_nul_is_ignored() -> None:
    assert simple(feed([b"id: a\x00b\ndata: x\n\n"])) == [("message", "x", None)]


def test_overlong_line_is_cut_and_counted() -> None:
    p = SseParser()
    p.feed(b"data: " + b"x" * (MAX_LINE_BYTES + 10), 1)
    assert p.cut_lines == 1
    assert simple(p.feed(b"\ndata: ok\n\n", 2))[-1] == ("message", "ok", None)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 299), max_size=10))
def test_garbage_never_raises_and_split_does_not_matter(data: bytes, cuts: list[int]) -> None:
    whole = simple(feed([data]))
    bounds = [0] + sorted({c for c in cuts if c < len(data)}) + [len(data)]
    assert simple(feed([data[a:b] for a, b in zip(bounds, bounds[1:])])) == whole
