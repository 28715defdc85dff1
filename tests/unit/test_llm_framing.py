"""NDJSON, streamed JSON arrays and the AWS binary event stream: whole, split, damaged."""

from __future__ import annotations

import json
import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from llmspyd.llm.eventstream import EventStreamParser, encode_message, parse_headers
from llmspyd.llm.ndjson import JsonArrayParser, NdjsonParser


def split_feed(parser, data: bytes, cuts: list[int]) -> list:
    bounds = [0] + sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]
    out = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        out += parser.feed(data[a:b], i)
    return out


NDJSON = b'{"a":1}\n{"b":"x\\ny"}\n\nnot json\n{"c":[1,2]}'


def test_ndjson_lines_bad_line_counted_last_line_on_close() -> None:
    p = NdjsonParser()
    vals = [v for v, _ in p.feed(NDJSON, 1)]
    assert vals == [{"a": 1}, {"b": "x\ny"}]
    assert p.bad == 1 and p.pending_bytes() > 0
    assert [v for v, _ in p.close(2)] == [{"c": [1, 2]}]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, len(NDJSON)), max_size=10))
def test_ndjson_split(cuts: list[int]) -> None:
    p = NdjsonParser()
    vals = [v for v, _ in split_feed(p, NDJSON, cuts)] + [v for v, _ in p.close(9)]
    assert vals == [{"a": 1}, {"b": "x\ny"}, {"c": [1, 2]}] and p.bad == 1


ARRAY = b'[{"t": "a [x] {y}", "n": {"m": [1, 2]}}\r\n,\r\n{"t": "q\\"uote\\\\"}\n,\n{"bad": }\n,{"z": []}\n]'


def test_json_array_elements_as_they_close() -> None:
    p = JsonArrayParser()
    vals = [v for v, _ in p.feed(ARRAY, 1)]
    assert vals == [{"t": "a [x] {y}", "n": {"m": [1, 2]}}, {"t": 'q"uote\\'}, {"z": []}]
    assert p.bad == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, len(ARRAY)), max_size=15))
def test_json_array_split(cuts: list[int]) -> None:
    p = JsonArrayParser()
    assert [v for v, _ in split_feed(p, ARRAY, cuts)] == [v for v, _ in JsonArrayParser().feed(ARRAY, 0)]


def test_json_array_time_of_closing_chunk() -> None:
    p = JsonArrayParser()
    assert p.feed(b'[{"a":', 5) == []
    assert p.feed(b" 1}", 9) == [({"a": 1}, 9)]


def _msgs() -> bytes:
    return b"".join(
        encode_message(
            {":event-type": "contentBlockDelta", ":content-type": "application/json", ":message-type": "event"},
            json.dumps({"contentBlockIndex": 0, "delta": {"text": f"t{i}"}}).encode(),
        )
        for i in range(5)
    )


def test_event_stream_roundtrip_and_headers() -> None:
    p = EventStreamParser()
    msgs = p.feed(_msgs(), 1)
    assert [json.loads(m.payload)["delta"]["text"] for m in msgs] == [f"t{i}" for i in range(5)]
    assert msgs[0].event_type == "contentBlockDelta" and msgs[0].message_type == "event"
    assert p.crc_failures == 0 and p.pending_bytes() == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 2000), max_size=20))
def test_event_stream_split(cuts: list[int]) -> None:
    data = _msgs()
    assert len(split_feed(EventStreamParser(), data, cuts)) == 5


def test_bad_message_crc_drops_that_message_only() -> None:
    data = bytearray(_msgs())
    first_len = struct.unpack(">I", data[:4])[0]
    data[first_len - 6] ^= 0xFF  # a payload byte of the first message
    p = EventStreamParser()
    msgs = p.feed(bytes(data), 1)
    assert len(msgs) == 4 and p.crc_failures == 1 and p.broken is None


def test_bad_prelude_crc_stops_the_stream() -> None:
    data = bytearray(_msgs())
    data[1] ^= 0x01  # total length of the first message: its prelude CRC no longer matches
    p = EventStreamParser()
    assert p.feed(bytes(data), 1) == []
    assert p.crc_failures == 1 and p.broken
    assert p.feed(_msgs(), 2) == []  # nothing after a lost frame boundary is trusted


def test_typed_headers() -> None:
    raw = b""
    for name, typ, val in [
        (b":a", 0, b""),
        (b":b", 1, b""),
        (b"c", 2, b"\x05"),
        (b"d", 3, b"\x00\x07"),
        (b"e", 4, b"\x00\x00\x00\x08"),
        (b"f", 5, struct.pack(">q", 9)),
        (b"g", 6, b"\x00\x02hi"),
        (b"h", 8, struct.pack(">q", 1000)),
        (b"i", 9, bytes(range(16))),
    ]:
        raw += bytes([len(name)]) + name + bytes([typ]) + val
    h = parse_headers(raw)
    assert h == {
        ":a": True,
        ":b": False,
        "c": 5,
        "d": 7,
        "e": 8,
        "f": 9,
        "g": b"hi",
        "h": 1000,
        "i": bytes(range(16)).hex(),
    }


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_event_stream_garbage_never_raises(data: bytes) -> None:
    p = EventStreamParser()
    p.feed(data, 1)
    # a garbage prelude almost never has a valid CRC; either way nothing raises
    assert p.crc_failures + p.messages + (1 if p.broken else 0) + (1 if p.pending_bytes() else 0) >= (
        1 if len(data) >= 12 else 0
    )


def test_crc_constant_is_zlib_crc32() -> None:
    m = encode_message({":event-type": "x"}, b"{}")
    assert struct.unpack(">I", m[-4:])[0] == zlib.crc32(m[:-4])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    elements=st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=4), max_size=6),
    indent=st.sampled_from([None, 2]),
    sep=st.sampled_from([",", "\n,", "\r\n,\r\n"]),
    cuts=st.lists(st.integers(1, 5000), max_size=20),
)
def test_json_array_property(elements, indent, sep, cuts) -> None:
    """Any array of objects, however laid out and split, gives back its elements."""
    raw = ("[" + sep.join(json.dumps(e, indent=indent) for e in elements) + "]").encode()
    p = JsonArrayParser()
    assert [v for v, _ in split_feed(p, raw, cuts)] == elements and p.bad == 0


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["", "message_start", "delta"]),
            st.lists(
                st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=10),
                min_size=1,
                max_size=3,
            ),
        ),
        max_size=6,
    ),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(1, 2000), max_size=20),
)
def test_sse_property(events, eol, cuts) -> None:
    """Any events, with any of the three line endings, split anywhere, come back as sent."""
    from llmspyd.llm.sse import SseParser

    raw = "".join(
        (f"event: {name}{eol}" if name else "") + "".join(f"data: {line}{eol}" for line in lines) + eol
        for name, lines in events
    ).encode()
    got = [(e.event, e.data) for e in split_feed(SseParser(), raw, cuts)]
    assert got == [(name or "message", "\n".join(lines)) for name, lines in events]
