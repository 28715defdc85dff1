"""Sans-IO HTTP/1.x parser for a passively observed connection (both directions).

Why not h11: h11 models an endpoint. To move its server-role state past one
request we would have to `send()` the observed response back into it (every
body byte re-serialized and re-validated), pipelined requests pause its
parser until then, and it has no notion of resuming after bytes are lost. An
observer needs the opposite: two independent readers (requests on the write
side, responses on the read side) that only share the FIFO of requests
awaiting a response, tolerate and report gaps, and re-synchronise at the next
message start. The grammar here is small and strict (RFC 9112); the tests
read back exactly what h11 serializes, however the bytes are cut.

Error details never quote captured bytes: a malformed line may hold a
credential, and details end up in exchange records.

Contract (h11-like): `receive(direction, data, ts)`, `gap(direction, n, ts)`,
`close(ts)` each return the events that became known. Nothing else happens:
no clock, no logging, no I/O.
"""

from __future__ import annotations

import re
from collections import deque

from llmspyd.chunks import Direction
from llmspyd.protocols.errors import LimitExceeded, LlmspyProtocolError, ParseError
from llmspyd.protocols.events import ConnectionInfo, Headers, HttpEvent, RequestHead, ResponseHead
from llmspyd.protocols.msgorder import Msg

# Request/status line plus header fields. h11 defaults to 16 KiB (as node,
# tomcat and IIS do); we only watch, so we are more tolerant, but a head that
# never ends must not grow the buffer without bound.
MAX_HEAD_BYTES = 64 * 1024
# A chunk-size line with extensions; real ones are a few bytes.
MAX_CHUNK_LINE = 4 * 1024
# Client bytes held after an Upgrade/CONNECT request until the server's answer
# says whether they are HTTP (refused) or tunnel bytes (accepted).
MAX_UPGRADE_HOLD = 1024 * 1024
# Response bytes kept while waiting for the request they answer, when that
# request's record comes late (a 150 KB upload answered by a small error fits).
MAX_RESPONSE_WAIT_BYTES = 256 * 1024
# While re-synchronising, the unmatched tail kept across feeds: enough to hold a
# message-start line split between two feeds.
RESYNC_KEEP = 8 * 1024

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([^ \x00-\x1f\x7f]+) HTTP/(1\.[01])\Z")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: ([^\r\n]*))?\Z")
_HEADER_NAME = re.compile(_TOKEN + rb"\Z")
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
# message starts we re-synchronise on after a gap or a parse error. Not anchored
# to a line start: a message follows a Content-Length body with no newline.
# A whole start line is required, so body text rarely matches by accident.
RESYNC_REQUEST = re.compile(rb"(?:GET|POST|PUT|DELETE|PATCH|HEAD|OPTIONS|CONNECT|TRACE) [^ \r\n]+ HTTP/1\.[01]\r?\n")
RESYNC_RESPONSE = re.compile(rb"HTTP/1\.[01] [0-9]{3}(?: [^\r\n]*)?\r?\n")

_METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"CONNECT", b"TRACE")
# what a request start may look like before its whole line is there: a method and a
# space, or the beginning of a method at the end of the data so far
_METHOD_PREFIX = re.compile(
    b"|".join([m + b" " for m in _METHODS] + sorted({m[:i] + rb"\Z" for m in _METHODS for i in range(1, len(m) + 1)}))
)

# reader states
(_START, _HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _TUNNEL, _RESYNC, _HOLD) = range(
    11
)


def parse_fields(lines: list[bytes]) -> Headers:
    """Header or trailer field lines -> [(lower-case name, value)], obs-fold joined."""
    headers: Headers = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not headers:
                raise ParseError("continuation line before any header")
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip(b" \t").decode("latin-1"))
            continue
        name, sep, value = line.partition(b":")
        if not sep or not _HEADER_NAME.match(name):
            # the line itself may hold a credential (a mangled Authorization header): never quote it
            raise ParseError(f"bad header line ({len(line)} bytes)")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return headers


def _split_head(head: bytes) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]


def _header(headers: Headers, name: str) -> str | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def _content_length(headers: Headers) -> int | None:
    values = {v.strip() for n, v in headers if n == "content-length" for v in v.split(",")}
    if not values:
        return None
    if len(values) > 1:
        raise ParseError(f"conflicting content-length {sorted(values)}")
    v = values.pop()
    if not v.isdigit():
        raise ParseError(f"bad content-length {v!r}")
    return int(v)


def _chunked(headers: Headers) -> bool | None:
    """None without Transfer-Encoding, else whether its final coding is chunked."""
    codings = [c.strip().lower() for n, v in headers if n == "transfer-encoding" for c in v.split(",") if c.strip()]
    if not codings:
        return None
    return codings[-1] == "chunked"


class _Reader:
    """One direction's framing state."""

    __slots__ = ("buf", "head_ts", "is_request", "lost_gap", "msg", "remaining", "scan", "state", "trailers")

    def __init__(self, is_request: bool) -> None:
        self.is_request = is_request
        self.buf = bytearray()
        self.state = _START
        self.msg: Msg | None = None  # message being framed (None: orphan response, parsed silently)
        self.remaining = 0
        self.head_ts = 0
        self.scan = 0  # where to resume the search for the end of the head
        self.trailers: Headers = []
        # bytes of a gap that fell between messages: if re-synchronising then skips
        # data, that data was the rest of a request whose start the gap took
        self.lost_gap = 0

    @property
    def mid_message(self) -> bool:
        return self.state in (_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE)


class Http1Connection:
    """Both directions of one HTTP/1.x connection. msg ids count requests from 1."""

    protocol = "http/1.1"

    def __init__(self, *, midstream: bool = False) -> None:
        self._out: list[HttpEvent] = []
        self._req = _Reader(True)
        self._resp = _Reader(False)
        self._pending: deque[Msg] = deque()  # requests awaiting (the start of) their response
        self._next_id = 1
        self._resp_after_gap = False
        self._hold_for: Msg | None = None  # Upgrade/CONNECT request whose answer decides what follows
        self.counters: dict[str, int] = {
            "requests": 0,
            "responses": 0,
            "parse_errors": 0,
            "gaps": 0,
            "gap_bytes": 0,
            "orphan_responses": 0,
            "resync_skipped_bytes": 0,
            "tunnel_bytes": 0,
        }
        self.upgraded: str | None = None  # "websocket", "h2c", "connect", ... once the connection left HTTP
        if midstream:
            # capture started mid-connection: find the next message start on each side
            self._req.state = self._resp.state = _RESYNC
            self._resp_after_gap = True

    # -- public API -----------------------------------------------------------------------

    def receive(self, direction: Direction, data: bytes, ts_ns: int) -> list[HttpEvent]:
        r = self._req if direction == Direction.WRITE else self._resp
        if data:
            if r.state == _TUNNEL:
                self.counters["tunnel_bytes"] += len(data)
            elif r.state == _BODY and not r.buf:
                # fast path for big Content-Length bodies: no copy through the buffer
                n = r.remaining
                piece = data if len(data) <= n else data[:n]
                r.remaining -= len(piece)
                self._data(r, piece, ts_ns)
                if r.remaining == 0:
                    self._end(r, ts_ns)
                if len(data) > n:
                    r.buf += data[n:]
                    self._run(r, ts_ns)
            else:
                r.buf += data
                self._run(r, ts_ns)
        return self._drain()

    def gap(self, direction: Direction, missing: int, ts_ns: int) -> list[HttpEvent]:
        r = self._req if direction == Direction.WRITE else self._resp
        self.counters["gaps"] += 1
        self.counters["gap_bytes"] += missing
        if r.state == _TUNNEL:
            return self._drain()
        if r.state == _HOLD:
            # the held bytes are incomplete now; whatever the server says, re-synchronise
            r.buf.clear()
            r.state = _RESYNC
            return self._drain()
        idle = r.state in (_START, _RESYNC) and not r.buf
        if r.is_request:
            if r.state == _HEAD or (r.state == _START and r.buf):
                # the head was cut: a request existed (a response will come for it) but is unreadable
                msg = self._new_msg(r.head_ts)
                self._pending.append(msg)
                msg.break_(ts_ns, "gap", "request head cut by a capture gap", missing)
            elif r.msg is not None and r.mid_message:
                r.msg.break_(ts_ns, "gap", "request cut by a capture gap", missing)
        else:
            if r.state == _HEAD or (r.state == _START and r.buf):
                msg = self._take_response_slot(r.head_ts)
                if msg is not None:
                    msg.break_(ts_ns, "gap", "response head cut by a capture gap", missing)
            elif r.msg is not None and r.mid_message:
                r.msg.break_(ts_ns, "gap", "response cut by a capture gap", missing)
            # responses may have been lost whole: match the next one by time, not FIFO
            self._resp_after_gap = True
        self._enter_resync(r)
        if idle and r.is_request:
            r.lost_gap = missing
        return self._drain()

    def idle(self, ts_ns: int) -> list[HttpEvent]:
        """Nothing moved for the idle timeout: end a response that runs until close, break what is in flight.

        The framing state is kept: bytes that still come are framed silently for the
        broken messages, and the next message on the connection parses normally.
        """
        r = self._resp
        if r.state == _UNTIL_CLOSE and r.msg is not None:
            r.msg.response_end(ts_ns)
            r.msg = None  # anything more until close is consumed silently
        for reader in (self._req, self._resp):
            if reader.msg is not None and reader.mid_message:
                reader.msg.break_(ts_ns, "idle", "nothing moved within the idle timeout")
        for msg in self._pending:
            # kept in the queue: a late response is still matched (and skipped) correctly
            msg.break_(ts_ns, "idle", "no response within the idle timeout")
        return self._drain()

    def close(self, ts_ns: int) -> list[HttpEvent]:
        """The connection ended: a response without length ends here, anything else is cut."""
        if self._resp.state == _HEAD and _HEAD_END.search(self._resp.buf):
            self.counters["orphan_responses"] += 1  # waited for a request that never came
        for r in (self._req, self._resp):
            if r.state == _UNTIL_CLOSE and r.msg is not None:
                r.msg.response_end(ts_ns)
            elif r.msg is not None and r.mid_message and r.state != _HEAD:
                r.msg.break_(ts_ns, "closed", "connection closed mid-message")
            r.state = _TUNNEL
            r.buf.clear()
            r.msg = None
        while self._pending:
            msg = self._pending.popleft()
            msg.break_(ts_ns, "closed", "connection closed before the response")
        return self._drain()

    # -- internals ------------------------------------------------------------------------

    def _drain(self) -> list[HttpEvent]:
        out = self._out[:]
        self._out.clear()
        return out

    def _new_msg(self, ts_ns: int) -> Msg:
        msg = Msg(self._next_id, self._out, self.counters, ts_ns)
        self._next_id += 1
        return msg

    def _enter_resync(self, r: _Reader) -> None:
        r.lost_gap = 0
        r.buf.clear()
        r.state = _RESYNC
        r.msg = None
        r.scan = 0

    def _should_wait_for_request(self, r: _Reader) -> bool:
        """A complete response head but no request seen, and no sign that one was lost: the
        request's record is probably just late (records of two threads can reach the ring
        buffer out of order). Keep the bytes until it comes, within a bound."""
        if self._pending or self._resp_after_gap or self._req.lost_gap or self._req.state == _RESYNC:
            return False
        return len(r.buf) <= MAX_RESPONSE_WAIT_BYTES  # beyond: give up, it is parsed as an orphan

    def _request_arrived(self, ts: int) -> None:
        """A request was read whole: a response head waiting for it can be read now."""
        r = self._resp
        if r.state == _HEAD and r.buf:
            self._run(r, ts)

    def _take_response_slot(self, ts_ns: int) -> Msg | None:
        """The request a response starting at ts_ns answers; None for an orphan response."""
        pending = self._pending
        if self._resp_after_gap:
            self._resp_after_gap = False
            # responses may have been lost: the answer is to the latest request already sent
            # (LLM clients do not pipeline; with pipelining this may pick too late a request)
            chosen = None
            for m in pending:
                if m.req_ts <= ts_ns:
                    chosen = m
            if chosen is None:
                self.counters["orphan_responses"] += 1
                return None
            while pending[0] is not chosen:
                pending.popleft().break_(ts_ns, "gap", "response lost in a capture gap")
            return pending.popleft()
        if not pending or pending[0].req_ts > ts_ns:
            # a response cannot precede its request: that request was never seen
            lost = self._req.lost_gap
            if lost:
                # ... because a gap on the write side took it whole: the exchange existed, say so
                self._req.lost_gap = 0
                msg = self._new_msg(ts_ns)
                msg.break_(ts_ns, "gap", "request lost in a capture gap", lost)
                return msg
            self.counters["orphan_responses"] += 1
            return None
        return pending.popleft()

    def _run(self, r: _Reader, ts: int) -> None:
        try:
            while self._step(r, ts):
                pass
        except LlmspyProtocolError as e:
            self.counters["parse_errors"] += 1
            if r.msg is not None:
                r.msg.break_(ts, e.reason, str(e))
            elif r.state == _HEAD and r.is_request:
                msg = self._new_msg(r.head_ts)
                self._pending.append(msg)
                msg.break_(ts, e.reason, str(e))
            elif r.state == _HEAD:
                msg = self._take_response_slot(r.head_ts)
                if msg is not None:
                    msg.break_(ts, e.reason, str(e))
            # skip the bad message's start so resync does not find it again
            bad = bytes(r.buf[:1])
            self._enter_resync(r)
            if bad:
                self.counters["resync_skipped_bytes"] += 1

    def _step(self, r: _Reader, ts: int) -> bool:
        """Advance one state; True if it made progress and should be called again."""
        buf = r.buf
        st = r.state
        if st == _START:
            # RFC 9112 2.2: ignore empty lines before a message
            i = 0
            n = len(buf)
            while i < n and buf[i] in (13, 10):
                i += 1
            if i:
                del buf[:i]
            if not buf:
                return False
            r.state = _HEAD
            r.head_ts = ts
            r.scan = 0
            return True
        if st == _HEAD:
            m = _HEAD_END.search(buf, r.scan)
            if m is None:
                if len(buf) > MAX_HEAD_BYTES:
                    raise LimitExceeded(f"message head longer than {MAX_HEAD_BYTES} bytes")
                r.scan = max(0, len(buf) - 3)
                return False
            if not r.is_request and self._should_wait_for_request(r):
                r.scan = m.start()
                return False
            head = bytes(buf[: m.start()])
            del buf[: m.end()]
            if r.is_request:
                self._request_head(r, head, ts)
            else:
                self._response_head(r, head, ts)
            return True
        if st == _BODY:
            if not buf:
                return False
            self._take_body(r, buf, ts)
            if r.remaining == 0:
                self._end(r, ts)
            return True
        if st == _CHUNK_SIZE:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise LimitExceeded("chunk-size line too long")
                return False
            line = bytes(buf[:nl]).rstrip(b"\r")
            del buf[: nl + 1]
            size_s = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE_RE.match(size_s):
                raise ParseError(f"bad chunk size line ({len(line)} bytes)")
            size = int(size_s, 16)
            if size == 0:
                r.state = _TRAILERS
                r.trailers = []
            else:
                r.remaining = size
                r.state = _CHUNK_DATA
            return True
        if st == _CHUNK_DATA:
            if not buf:
                return False
            self._take_body(r, buf, ts)
            if r.remaining == 0:
                if buf[:2] == b"\r\n":  # the usual case: skip a state round trip
                    del buf[:2]
                    r.state = _CHUNK_SIZE
                else:
                    r.state = _CHUNK_CRLF
            return True
        if st == _CHUNK_CRLF:
            if buf[:2] == b"\r\n":
                del buf[:2]
            elif buf[:1] == b"\n":
                del buf[:1]
            elif buf == b"\r" or not buf:
                return False
            else:
                raise ParseError("missing CRLF after chunk data")
            r.state = _CHUNK_SIZE
            return True
        if st == _TRAILERS:
            if buf[:2] == b"\r\n" or buf[:1] == b"\n":
                del buf[: 2 if buf[:1] == b"\r" else 1]
                self._end(r, ts, r.trailers)
                return True
            if len(buf) < 2:
                return False
            m = _HEAD_END.search(buf)
            if m is None:
                if len(buf) > MAX_HEAD_BYTES:
                    raise LimitExceeded("trailer section too long")
                return False
            block = bytes(buf[: m.start()])
            del buf[: m.end()]
            self._end(r, ts, parse_fields(_split_head(block)))
            return True
        if st == _UNTIL_CLOSE:
            if buf:
                data = bytes(buf)
                buf.clear()
                self._data(r, data, ts)
            return False
        if st == _RESYNC:
            pat = RESYNC_REQUEST if r.is_request else RESYNC_RESPONSE
            m = pat.search(buf)
            skip = m.start() if m is not None else max(0, len(buf) - RESYNC_KEEP)
            if r.lost_gap and buf and (skip or not _METHOD_PREFIX.match(buf)):
                # the bytes after the gap are not a request start: the gap took the start of a
                # request. Account for it now, before its response comes, so matching stays right.
                msg = self._new_msg(ts)
                self._pending.append(msg)
                msg.break_(ts, "gap", "request start lost in a capture gap", r.lost_gap)
                r.lost_gap = 0
            if skip:
                self.counters["resync_skipped_bytes"] += skip
                del buf[:skip]
            if m is None:
                return False
            r.lost_gap = 0
            r.state = _START
            return True
        if st == _HOLD:
            if len(buf) > MAX_UPGRADE_HOLD:
                raise LimitExceeded("client bytes after an upgrade request exceed the hold limit")
            return False
        if st == _TUNNEL:
            self.counters["tunnel_bytes"] += len(buf)
            buf.clear()
            return False
        raise AssertionError(f"unknown state {st}")  # pragma: no cover

    def _request_head(self, r: _Reader, head: bytes, ts: int) -> None:
        lines = _split_head(head)
        m = _REQUEST_LINE.match(lines[0])
        if m is None:
            raise ParseError(f"bad request line ({len(lines[0])} bytes)")  # may hold ?key=... : not quoted
        headers = parse_fields(lines[1:])
        method = m.group(1).decode("ascii")
        msg = self._new_msg(r.head_ts)
        self._pending.append(msg)
        r.msg = msg
        if method == "CONNECT" or (
            _header(headers, "upgrade") and "upgrade" in (_header(headers, "connection") or "").lower()
        ):
            self._hold_for = msg
        self.counters["requests"] += 1
        msg.request_head(
            RequestHead(
                msg.id,
                r.head_ts,
                method,
                m.group(2).decode("latin-1"),
                headers,
                m.group(3).decode("ascii"),
                _header(headers, "host") or "",
            )
        )
        chunked = _chunked(headers)
        if chunked is not None:
            if not chunked:
                raise ParseError("request transfer-encoding does not end in chunked")
            r.state = _CHUNK_SIZE
            return
        length = _content_length(headers)
        if length:
            r.remaining = length
            r.state = _BODY
            return
        self._end(r, ts)

    def _response_head(self, r: _Reader, head: bytes, ts: int) -> None:
        lines = _split_head(head)
        m = _STATUS_LINE.match(lines[0])
        if m is None:
            raise ParseError(f"bad status line ({len(lines[0])} bytes)")
        status = int(m.group(2))
        headers = parse_fields(lines[1:])
        if 100 <= status < 200 and status != 101:
            # interim response (100 Continue, 103 Early Hints): the final one follows
            r.state = _START
            return
        msg = self._take_response_slot(r.head_ts)
        r.msg = msg
        self.counters["responses"] += 1
        method = msg.method if msg is not None else ""
        if msg is not None:
            reason = (m.group(3) or b"").decode("latin-1")
            msg.response_head(ResponseHead(msg.id, r.head_ts, status, headers, reason))
        if status == 101 or (method == "CONNECT" and 200 <= status < 300):
            self._hold_for = None  # the held client bytes belong to the new protocol
            self._end(r, ts)
            self._leave_http(msg, status, headers, ts)
            return
        if method == "HEAD" or status in (204, 304):
            self._end(r, ts)
            return
        chunked = _chunked(headers)
        if chunked:
            r.state = _CHUNK_SIZE
            return
        if chunked is None:
            length = _content_length(headers)
            if length is not None:
                if length == 0:
                    self._end(r, ts)
                else:
                    r.remaining = length
                    r.state = _BODY
                return
        r.state = _UNTIL_CLOSE  # RFC 9112 6.3 rule 8: the body ends when the connection does

    def _take_body(self, r: _Reader, buf: bytearray, ts: int) -> None:
        """Pass on up to r.remaining body bytes from the front of buf (Content-Length body or one chunk)."""
        n = min(r.remaining, len(buf))
        data = bytes(buf[:n])
        del buf[:n]
        r.remaining -= n
        self._data(r, data, ts)

    def _data(self, r: _Reader, data: bytes, ts: int) -> None:
        if r.msg is None:
            return
        if r.is_request:
            r.msg.request_data(data, ts)
        else:
            r.msg.response_data(data, ts)

    def _end(self, r: _Reader, ts: int, trailers: Headers | None = None) -> None:
        msg = r.msg
        r.msg = None
        r.state = _START
        if msg is None:
            return
        if r.is_request:
            msg.request_end(ts, trailers)
            if self._hold_for is msg:
                r.state = _HOLD  # until the server accepts (tunnel) or refuses (HTTP again)
            self._request_arrived(ts)
        else:
            msg.response_end(ts, trailers)
            self._release_hold(msg, ts)

    def _release_hold(self, msg: Msg, ts: int) -> None:
        """The answer to an Upgrade/CONNECT request was not a switch: parse the held bytes as HTTP."""
        if self._hold_for is not msg:
            return
        self._hold_for = None
        if self._req.state == _HOLD:
            self._req.state = _START
            self._run(self._req, ts)

    def _leave_http(self, msg: Msg | None, status: int, headers: Headers, ts: int) -> None:
        """101 Switching Protocols or CONNECT 2xx: the rest of the connection is not HTTP/1."""
        kind = "connect" if status != 101 else (_header(headers, "upgrade") or "unknown").lower()
        self.upgraded = kind
        held = len(self._req.buf) if self._req.state == _HOLD else 0
        for r in (self._req, self._resp):
            self.counters["tunnel_bytes"] += len(r.buf)
            r.buf.clear()
            r.state = _TUNNEL
            r.msg = None
        self._out.append(
            ConnectionInfo("upgrade", ts, {"msg": msg.id if msg else 0, "upgrade": kind, "held_bytes": held})
        )
