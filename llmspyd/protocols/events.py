"""HTTP events: what the protocol parsers emit and the LLM layer consumes.

One `msg` id names one request/response pair on a connection: a sequence
number on HTTP/1.1, the stream id on HTTP/2. For each msg the order is
RequestHead, RequestData*, RequestEnd, ResponseHead, ResponseData*,
ResponseEnd; `MessageBroken` may replace any tail of that sequence. Bodies
are delivered de-chunked and decompressed (Content-Encoding undone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Headers = list[tuple[str, str]]  # names lower-cased, order kept, values decoded latin-1


@dataclass(slots=True)
class RequestHead:
    """Fires when the request line and headers (or HEADERS frames) are complete."""

    msg: int
    ts_ns: int
    method: str
    target: str  # path and query, as sent
    headers: Headers
    http_version: str  # "1.1", "1.0" or "2"
    authority: str = ""  # Host header or :authority


@dataclass(slots=True)
class RequestData:
    msg: int
    ts_ns: int
    data: bytes


@dataclass(slots=True)
class RequestEnd:
    msg: int
    ts_ns: int
    trailers: Headers = field(default_factory=list)  # chunked / HTTP/2 trailer fields, if any


@dataclass(slots=True)
class ResponseHead:
    """Fires on the final (non-1xx) status line and headers."""

    msg: int
    ts_ns: int
    status: int
    headers: Headers
    reason: str = ""


@dataclass(slots=True)
class ResponseData:
    """A piece of the response body, with the time its last byte arrived."""

    msg: int
    ts_ns: int
    data: bytes


@dataclass(slots=True)
class ResponseEnd:
    msg: int
    ts_ns: int
    trailers: Headers = field(default_factory=list)  # chunked / HTTP/2 trailer fields, if any


@dataclass(slots=True)
class MessageBroken:
    """The exchange cannot be completed: no more events follow for `msg`.

    Fires on a parse error, a gap in the captured bytes, a reset stream, or a
    connection that closed mid-message. What was delivered before stays valid.
    """

    msg: int
    ts_ns: int
    reason: str  # short machine-readable reason, e.g. "gap", "closed", "rst_stream", "parse_error"
    detail: str = ""
    missing_bytes: int = 0  # bytes known to be lost inside this exchange


@dataclass(slots=True)
class ConnectionInfo:
    """Fires once the protocol of the connection is known (after its first bytes)."""

    protocol: str  # "http/1.1", "h2", or "unknown"
    ts_ns: int = 0
    detail: dict = field(default_factory=dict)


HttpEvent = (
    RequestHead | RequestData | RequestEnd | ResponseHead | ResponseData | ResponseEnd | MessageBroken | ConnectionInfo
)
