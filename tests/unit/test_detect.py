"""Protocol detection from the first written bytes (and mid-stream)."""

from __future__ import annotations

import pytest

from llmspyd.protocols.detect import H2, HTTP1, MAX_DETECT_BYTES, UNKNOWN, detect, detect_midstream
from llmspyd.protocols.http2 import PREFACE


def test_h2_preface_needs_all_24_bytes():
    assert [detect(PREFACE[:i]) for i in range(1, len(PREFACE))] == [None] * (len(PREFACE) - 1)
    assert detect(PREFACE) == H2 and detect(PREFACE + b"\x00\x00\x00\x04") == H2


@pytest.mark.parametrize(
    "line",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\n",
        b"GET / HTTP/1.0\r\n",
        b"\r\nPATCH /x HTTP/1.1\r\n",
        b"PROPFIND /dav HTTP/1.1\n",
    ],
)
def test_request_line_is_http1_and_every_prefix_waits(line):
    assert detect(line) == HTTP1
    assert detect(line + b"Host: h\r\n") == HTTP1
    assert {detect(line[:i]) for i in range(1, len(line))} == {None}


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b'{"jsonrpc":"2.0"}',
        b"GET /\r\n",
        b"GET / HTTP/2.0\r\n",
        b"\x00\x00\x12\x04",
    ],
)
def test_other_protocols_are_unknown(data):
    assert detect(data) == UNKNOWN


def test_a_request_line_that_never_ends_is_unknown_at_the_limit():
    assert detect(b"GET /" + b"a" * 100) is None
    assert detect(b"GET /" + b"a" * MAX_DETECT_BYTES) == UNKNOWN


def test_midstream():
    assert detect_midstream(b'...body"}POST /v1/x HTTP/1.1\r\n', b"") == HTTP1
    assert detect_midstream(b"", b"tail\r\n\r\nHTTP/1.1 200 OK\r\n") == HTTP1
    assert detect_midstream(b"\x00\x01binary", b"\x02") is None
    assert detect_midstream(b"\x00" * 300_000, b"") == UNKNOWN
