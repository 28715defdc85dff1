"""Which protocol a connection speaks, from its first bytes.

A client connection starts with what the process writes: the HTTP/2 preface
or an HTTP/1.x request line. Anything else is "unknown": the pipeline counts
it and may mute the connection. A connection first seen mid-way (capture
started late) has no start to look at; HTTP/1.x can still be found by its
next request or status line, HTTP/2 cannot (HPACK state is lost for good).
"""

from __future__ import annotations

import re

from llmspyd.protocols.http1 import RESYNC_REQUEST, RESYNC_RESPONSE
from llmspyd.protocols.http2 import PREFACE

HTTP1 = "http/1.1"
H2 = "h2"
UNKNOWN = "unknown"

# Bytes of the first request line we wait for before calling the connection
# unknown. Request lines of LLM APIs are short; 16 KiB allows long query strings.
MAX_DETECT_BYTES = 16 * 1024
# Bytes scanned for a message start in a connection joined mid-way before giving up.
MAX_MIDSTREAM_SCAN = 256 * 1024

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"[\r\n]*" + _TOKEN + rb" [^ \x00-\x20\x7f]+ HTTP/1\.[01]\r?\n")
# a request line that is not complete yet: method, then maybe target, then maybe part of the version
_REQUEST_LINE_PREFIX = re.compile(
    rb"[\r\n]*(?:"
    + _TOKEN
    + rb"(?: [^ \x00-\x20\x7f]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01]\r?)?)?)?)?)?)?)?)?)?)?)?"
)


def detect(first_write: bytes) -> str | None:
    """HTTP1, H2 or UNKNOWN from the start of the write side; None: need more bytes."""
    n = len(first_write)
    if first_write[: len(PREFACE)] == PREFACE[:n]:
        return H2 if n >= len(PREFACE) else None
    if _REQUEST_LINE.match(first_write):
        return HTTP1
    if n < MAX_DETECT_BYTES and _REQUEST_LINE_PREFIX.fullmatch(first_write):
        return None
    return UNKNOWN


def detect_midstream(write: bytes, read: bytes) -> str | None:
    """For a connection joined mid-way: HTTP1 once a request or status line shows, else None/UNKNOWN."""
    if RESYNC_REQUEST.search(write) or RESYNC_RESPONSE.search(read):
        return HTTP1
    if len(write) + len(read) >= MAX_MIDSTREAM_SCAN:
        return UNKNOWN
    return None
