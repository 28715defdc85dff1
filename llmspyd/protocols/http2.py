"""Sans-IO HTTP/2 parser for a passively observed client connection (both directions).

h2.Connection is an endpoint: it enforces flow control, answers SETTINGS and
refuses what its own side did not send. An observer sees both sides' bytes
and must only read them, so this uses hyperframe for frame layout and one
hpack.Decoder per direction (the dynamic table of each direction is built
by that direction's HEADERS only), nothing more.

Each client stream is one msg (msg id = stream id). The write side carries
the client preface and requests, the read side responses. Timestamps: a
head carries the arrival time of the first byte of its HEADERS frame; data
and ends carry the arrival of their frame's last byte.

Any framing or HPACK error, and a gap that is not wholly inside one DATA
frame, leaves the HPACK tables unknowable: every open stream is broken and
the rest of the connection is only counted. A gap inside a DATA frame costs
only that frame's stream.
"""

from __future__ import annotations

import hpack
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

from llmspyd.chunks import Direction
from llmspyd.protocols.errors import ConnectionUnrecoverable, LimitExceeded, LlmspyProtocolError
from llmspyd.protocols.events import Headers, HttpEvent, RequestHead, ResponseHead
from llmspyd.protocols.msgorder import Msg

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_LEN = 9
# RFC 9113 4.2: a frame may not exceed the receiver's SETTINGS_MAX_FRAME_SIZE,
# 16384 until it says otherwise; 2^24-1 is the protocol's ceiling.
DEFAULT_MAX_FRAME_SIZE = 16_384
# h2 caps CONTINUATION frames at 64 per header block: a block is decodable only
# once complete, so an endless one would grow our buffer without bound (the
# "CONTINUATION flood", CVE-2024-27316). We cap frames like h2 and bytes too,
# since one CONTINUATION may be up to 16 MiB.
MAX_CONTINUATION_FRAMES = 64
MAX_HEADER_BLOCK_BYTES = 1024 * 1024
# hpack's default (64 KiB of decoded headers) raises mid-block on big cookie
# or metadata headers, which would desynchronise our table; we only read, so
# allow more, still bounded.
MAX_HEADER_LIST_SIZE = 1024 * 1024
# HPACK dynamic table size accepted without having seen the SETTINGS that allow it.
# Real peers announce 4 KiB (default) to 64 KiB; bounded so a hostile stream cannot grow it.
MAX_HPACK_TABLE_SIZE = 1024 * 1024
# Streams tracked at once; servers advertise 100-250 concurrent streams. More
# than this is a leak (streams never ended) and must not grow memory forever.
MAX_OPEN_STREAMS = 4096
# Response bytes kept for streams whose request record has not arrived yet.
MAX_EARLY_BYTES = 1024 * 1024

_RST_NO_ERROR = 0
_ERROR_NAMES = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    4: "SETTINGS_TIMEOUT",
    5: "STREAM_CLOSED",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    10: "CONNECT_ERROR",
    11: "ENHANCE_YOUR_CALM",
    12: "INADEQUATE_SECURITY",
    13: "HTTP_1_1_REQUIRED",
}
_SETTINGS_HEADER_TABLE_SIZE = 0x1
_SETTINGS_MAX_FRAME_SIZE = 0x5


class _HeaderBlock:
    """A HEADERS/PUSH_PROMISE block waiting for its CONTINUATION frames."""

    __slots__ = ("end_stream", "fragments", "frames", "push", "size", "stream_id", "ts_ns")

    def __init__(self, stream_id: int, end_stream: bool, fragment: bytes, ts_ns: int, push: bool) -> None:
        self.stream_id = stream_id
        self.end_stream = end_stream
        self.fragments = [fragment]
        self.size = len(fragment)
        self.frames = 1
        self.ts_ns = ts_ns
        self.push = push


class _Side:
    __slots__ = ("block", "buf", "buf_ts", "decoder", "discard", "is_client", "max_frame_size", "preface_left")

    def __init__(self, is_client: bool) -> None:
        self.is_client = is_client
        self.buf = bytearray()
        self.buf_ts = 0  # arrival time of buf[0]
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
        # accept table sizes up front: the SETTINGS that allowed them may be seen after the
        # block that uses them (records out of order); an encoder cannot exceed what its peer allowed
        self.decoder.max_allowed_table_size = MAX_HPACK_TABLE_SIZE
        self.preface_left = len(PREFACE) if is_client else 0
        self.block: _HeaderBlock | None = None
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE  # what the OTHER side accepts, hence may be sent here
        self.discard = 0  # bytes still to skip: the tail of a DATA frame a gap fell into


def _error_name(code: int) -> str:
    return _ERROR_NAMES.get(code, f"0x{code:x}")


class Http2Connection:
    protocol = "h2"

    def __init__(self) -> None:
        self._out: list[HttpEvent] = []
        self._client = _Side(True)
        self._server = _Side(False)
        self._streams: dict[int, Msg] = {}
        self._max_client_sid = 0  # highest stream the client opened
        self._early: dict[int, list[tuple]] = {}  # server frames of streams not opened yet (see _stash)
        self._early_bytes = 0
        self.dead = False  # connection state lost: nothing more is parsed
        self.goaway: tuple[str, int, str] | None = None  # (sender, last_stream_id, error) of the last GOAWAY
        self.counters: dict[str, int] = {
            "frames": 0,
            "streams": 0,
            "rst_streams": 0,
            "goaways": 0,
            "pushes_ignored": 0,
            "gaps": 0,
            "gap_bytes": 0,
            "parse_errors": 0,
            "unrecoverable": 0,
            "dead_bytes": 0,
            "frames_unknown_stream": 0,
        }

    # -- public API -----------------------------------------------------------------------

    def receive(self, direction: Direction, data: bytes, ts_ns: int) -> list[HttpEvent]:
        if not data:
            return []
        if self.dead:
            self.counters["dead_bytes"] += len(data)
            return []
        side = self._client if direction == Direction.WRITE else self._server
        if not side.buf:
            side.buf_ts = ts_ns
        side.buf += data
        try:
            self._parse(side, ts_ns)
        except LlmspyProtocolError as e:
            self.counters["parse_errors"] += 1
            # framing or HPACK can no longer be trusted: the whole connection is lost
            self._die(ts_ns, "parse_error" if isinstance(e, ConnectionUnrecoverable) else e.reason, str(e))
        return self._drain()

    def gap(self, direction: Direction, missing: int, ts_ns: int) -> list[HttpEvent]:
        self.counters["gaps"] += 1
        self.counters["gap_bytes"] += missing
        if self.dead:
            return []
        side = self._client if direction == Direction.WRITE else self._server
        if self._gap_inside_data(side, missing, ts_ns):
            return self._drain()
        self._die(ts_ns, "gap", f"{missing} bytes lost: HTTP/2 framing and HPACK state unknown", missing)
        return self._drain()

    def _gap_inside_data(self, side: _Side, missing: int, ts_ns: int) -> bool:
        """A gap that falls wholly inside one DATA frame whose header we hold costs only that stream.

        The frame length says where the next frame starts, and DATA carries no
        HPACK, so framing and header tables stay exact. Most lost bytes are big
        bodies, so this is the common case.
        """
        buf = side.buf
        if side.block is not None or side.preface_left or side.discard or len(buf) < FRAME_HEADER_LEN:
            return False
        length = int.from_bytes(buf[0:3], "big")
        if buf[3] != 0x0 or len(buf) + missing > FRAME_HEADER_LEN + length:  # not DATA, or the gap runs past it
            return False
        sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        self.counters["gaps_inside_data"] = self.counters.get("gaps_inside_data", 0) + 1
        side.discard = FRAME_HEADER_LEN + length - len(buf) - missing
        buf.clear()
        msg = self._streams.pop(sid, None)
        if msg is not None:
            msg.break_(ts_ns, "gap", "bytes lost inside a DATA frame", missing)
        return True

    def idle(self, ts_ns: int) -> list[HttpEvent]:
        """Nothing moved for the idle timeout: break open streams, keep the connection (HPACK stays in sync)."""
        for msg in self._streams.values():
            msg.break_(ts_ns, "idle", "nothing moved within the idle timeout")
        self._streams.clear()  # late frames of these streams are counted as unknown-stream frames
        return self._drain()

    def close(self, ts_ns: int) -> list[HttpEvent]:
        for sid in list(self._early):
            self._drop_early(sid)  # responses whose request never showed up
        for msg in list(self._streams.values()):
            msg.break_(ts_ns, "closed", "connection closed with the stream open")
        self._streams.clear()
        self.dead = True
        return self._drain()

    # -- internals ------------------------------------------------------------------------

    def _drain(self) -> list[HttpEvent]:
        out = self._out[:]
        self._out.clear()
        return out

    def _die(self, ts_ns: int, reason: str, detail: str, missing: int = 0) -> None:
        self.counters["unrecoverable"] += 1
        for msg in self._streams.values():
            msg.break_(ts_ns, reason, detail, missing)
        self._streams.clear()
        self.dead = True
        self.counters["dead_bytes"] += len(self._client.buf) + len(self._server.buf)
        self._client.buf.clear()
        self._server.buf.clear()

    def _parse(self, side: _Side, ts: int) -> None:
        buf = side.buf
        if side.discard:
            n = min(side.discard, len(buf))
            del buf[:n]
            side.discard -= n
            if side.discard or not buf:
                return
            side.buf_ts = ts
        if side.preface_left:
            n = min(side.preface_left, len(buf))
            start = len(PREFACE) - side.preface_left
            if buf[:n] != PREFACE[start : start + n]:
                raise ConnectionUnrecoverable("client did not start with the HTTP/2 preface")
            del buf[:n]
            side.preface_left -= n
            if not buf:
                return
            side.buf_ts = ts
        pos = 0
        total = len(buf)
        while total - pos >= FRAME_HEADER_LEN:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if length > side.max_frame_size:
                # the peer's SETTINGS may simply not have been seen yet (records out of order):
                # count it rather than give up; the 24-bit length bounds the buffer anyway
                self.counters["oversized_frames"] = self.counters.get("oversized_frames", 0) + 1
                side.max_frame_size = length
            end = pos + FRAME_HEADER_LEN + length
            if end > total:
                break
            raw = memoryview(bytes(buf[pos:end]))
            start_ts = side.buf_ts if pos == 0 else ts
            pos = end
            try:
                frame, _ = Frame.parse_frame_header(raw[:FRAME_HEADER_LEN])
                frame.parse_body(raw[FRAME_HEADER_LEN:])
            except (HyperframeError, ValueError) as e:
                raise ConnectionUnrecoverable(f"bad frame: {e}") from None
            self.counters["frames"] += 1
            self._frame(side, frame, start_ts, ts)
            if self.dead:
                return
        if pos:
            del buf[:pos]
            side.buf_ts = ts

    def _frame(self, side: _Side, frame: Frame, start_ts: int, ts: int) -> None:
        block = side.block
        if block is not None:
            if not isinstance(frame, ContinuationFrame) or frame.stream_id != block.stream_id:
                raise ConnectionUnrecoverable("header block interrupted before END_HEADERS")
            block.frames += 1
            block.size += len(frame.data)
            if block.frames > MAX_CONTINUATION_FRAMES + 1 or block.size > MAX_HEADER_BLOCK_BYTES:
                raise LimitExceeded(
                    f"header block over {MAX_CONTINUATION_FRAMES} CONTINUATIONs or {MAX_HEADER_BLOCK_BYTES} bytes"
                )
            block.fragments.append(frame.data)
            if "END_HEADERS" in frame.flags:
                side.block = None
                self._header_block(side, block, ts)
            return
        if isinstance(frame, DataFrame):
            self._data(side, frame, ts)
        elif isinstance(frame, HeadersFrame):
            if frame.stream_id == 0:
                raise ConnectionUnrecoverable("HEADERS on stream 0")
            block = _HeaderBlock(frame.stream_id, "END_STREAM" in frame.flags, frame.data, start_ts, False)
            self._start_block(side, block, frame, ts)
        elif isinstance(frame, PushPromiseFrame):
            block = _HeaderBlock(frame.promised_stream_id, False, frame.data, start_ts, True)
            self._start_block(side, block, frame, ts)
        elif isinstance(frame, ContinuationFrame):
            raise ConnectionUnrecoverable("CONTINUATION without a header block")
        elif isinstance(frame, RstStreamFrame):
            self._rst(side, frame, ts)
        elif isinstance(frame, SettingsFrame):
            self._settings(side, frame)
        elif isinstance(frame, GoAwayFrame):
            self._goaway(side, frame, ts)
        # PRIORITY, PING, WINDOW_UPDATE, ALTSVC and extension frames carry nothing we report

    def _start_block(self, side: _Side, block: _HeaderBlock, frame: Frame, ts: int) -> None:
        if "END_HEADERS" in frame.flags:
            self._header_block(side, block, ts)
        else:
            side.block = block

    def _settings(self, side: _Side, frame: SettingsFrame) -> None:
        if "ACK" in frame.flags:
            return
        other = self._server if side.is_client else self._client
        for key, value in frame.settings.items():
            if key == _SETTINGS_HEADER_TABLE_SIZE:
                # this side's decoder limit: the other side's encoder may now use up to `value`
                # (applied before the ACK: lenient, the encoder cannot use it earlier anyway)
                other.decoder.max_allowed_table_size = max(other.decoder.max_allowed_table_size, value)
            elif key == _SETTINGS_MAX_FRAME_SIZE:
                other.max_frame_size = max(other.max_frame_size, min(value, 2**24 - 1))

    def _decode(self, side: _Side, block: _HeaderBlock) -> Headers:
        try:
            fields = side.decoder.decode(b"".join(block.fragments), raw=True)
        except hpack.HPACKError as e:
            raise ConnectionUnrecoverable(f"HPACK: {type(e).__name__}: {e}") from None
        return [(bytes(n).decode("latin-1").lower(), bytes(v).decode("latin-1")) for n, v in fields]

    def _header_block(self, side: _Side, block: _HeaderBlock, ts: int) -> None:
        fields = self._decode(side, block)  # always: the HPACK table must follow every block
        if block.push:
            self.counters["pushes_ignored"] += 1
            return
        sid = block.stream_id
        if side.is_client:
            self._client_headers(sid, fields, block, ts)
            return
        msg = self._streams.get(sid)
        if msg is None:
            self._stash(sid, ("headers", fields, block.ts_ns, block.end_stream, ts), 0)
            return
        self._server_headers(msg, fields, block.ts_ns, block.end_stream, ts)

    def _client_headers(self, sid: int, fields: Headers, block: _HeaderBlock, ts: int) -> None:
        pseudo = {n: v for n, v in fields if n.startswith(":")}
        headers = [(n, v) for n, v in fields if not n.startswith(":")]
        msg = self._streams.get(sid)
        if msg is not None:
            msg.request_end(ts, headers)  # a second header block from the client is its trailers
            self._request_ended(sid, msg, ts)
            self._forget_if_done(sid, msg)
            return
        if not pseudo:
            self.counters["frames_unknown_stream"] += 1  # trailers of a stream we dropped
            return
        msg = Msg(sid, self._out, self.counters, block.ts_ns)
        self.counters["streams"] += 1
        self._max_client_sid = max(self._max_client_sid, sid)
        msg.request_head(
            RequestHead(
                sid,
                block.ts_ns,
                pseudo.get(":method", ""),
                pseudo.get(":path", ""),
                headers,
                "2",
                pseudo.get(":authority", "") or next((v for n, v in headers if n == "host"), ""),
            )
        )
        if len(self._streams) >= MAX_OPEN_STREAMS:
            msg.break_(ts, "limit", f"more than {MAX_OPEN_STREAMS} open streams")
            self._drop_early(sid)
            return
        self._streams[sid] = msg
        if block.end_stream:
            msg.request_end(ts)
            self._request_ended(sid, msg, ts)
            self._forget_if_done(sid, msg)

    def _server_headers(self, msg: Msg, fields: Headers, head_ts: int, end_stream: bool, ts: int) -> None:
        if not msg.resp_started:
            status_s = next((v for n, v in fields if n == ":status"), "")
            if not status_s.isdigit():
                msg.break_(ts, "parse_error", "response without a valid :status")
            else:
                status = int(status_s)
                if 100 <= status < 200:
                    return  # interim response; the final one follows
                headers = [(n, v) for n, v in fields if not n.startswith(":")]
                msg.response_head(ResponseHead(msg.id, head_ts, status, headers))
                if end_stream:
                    msg.response_end(ts)
        else:
            msg.response_end(ts, [(n, v) for n, v in fields if not n.startswith(":")])  # trailers
        self._forget_if_done(msg.id, msg)

    def _data(self, side: _Side, frame: DataFrame, ts: int) -> None:
        sid = frame.stream_id
        msg = self._streams.get(sid)
        end = "END_STREAM" in frame.flags
        if msg is None:
            if not side.is_client:
                self._stash(sid, ("data", frame.data, end, ts), len(frame.data))
            else:
                self.counters["frames_unknown_stream"] += 1
            return
        if side.is_client:
            msg.request_data(frame.data, ts)
            if end:
                msg.request_end(ts)
                self._request_ended(sid, msg, ts)
        else:
            self._server_data(msg, frame.data, end, ts)
        self._forget_if_done(sid, msg)

    def _server_data(self, msg: Msg, data: bytes, end: bool, ts: int) -> None:
        if not msg.resp_started:
            msg.break_(ts, "parse_error", "DATA before the response HEADERS")
        else:
            msg.response_data(data, ts)
            if end:
                msg.response_end(ts)
        self._forget_if_done(msg.id, msg)

    # A response may show up before its request: two threads' TLS records can reach the
    # ring buffer out of order. Server frames of a stream the client has not opened yet
    # are kept (decoded: HPACK already moved on) and replayed once the request has ended.

    def _stash(self, sid: int, item: tuple, size: int) -> None:
        if sid % 2 == 0 or sid <= self._max_client_sid:
            self.counters["frames_unknown_stream"] += 1  # a stream we dropped or never tracked
            return
        if self._early_bytes + size > MAX_EARLY_BYTES:
            self.counters["early_frames_dropped"] = self.counters.get("early_frames_dropped", 0) + 1
            return
        self._early.setdefault(sid, []).append(item)
        self._early_bytes += size

    def _drop_early(self, sid: int) -> None:
        for item in self._early.pop(sid, ()):
            if item[0] == "data":
                self._early_bytes -= len(item[1])
            self.counters["early_frames_dropped"] = self.counters.get("early_frames_dropped", 0) + 1

    def _request_ended(self, sid: int, msg: Msg, ts: int) -> None:
        items = self._early.pop(sid, None)
        if not items:
            return
        self.counters["early_responses_replayed"] = self.counters.get("early_responses_replayed", 0) + 1
        for item in items:
            if item[0] == "headers":
                _, fields, head_ts, end_stream, its = item
                self._server_headers(msg, fields, head_ts, end_stream, its)
            else:
                _, data, end, its = item
                self._early_bytes -= len(data)
                self._server_data(msg, data, end, its)

    def _rst(self, side: _Side, frame: RstStreamFrame, ts: int) -> None:
        self.counters["rst_streams"] += 1
        self._drop_early(frame.stream_id)
        msg = self._streams.pop(frame.stream_id, None)
        if msg is None:
            return
        who = "client" if side.is_client else "server"
        # after a complete response, RST_STREAM(NO_ERROR) only stops the upload (RFC 9113 8.1): Msg ignores it
        msg.break_(ts, "rst_stream", f"{who} reset the stream: {_error_name(frame.error_code)}")

    def _goaway(self, side: _Side, frame: GoAwayFrame, ts: int) -> None:
        self.counters["goaways"] += 1
        who = "client" if side.is_client else "server"
        err = _error_name(frame.error_code)
        self.goaway = (who, frame.last_stream_id, err)
        if side.is_client:
            return
        # streams above last_stream_id were never processed by the server
        for sid in [s for s in self._streams if s > frame.last_stream_id]:
            self._streams.pop(sid).break_(ts, "goaway", f"server GOAWAY {err}, last stream {frame.last_stream_id}")

    def _forget_if_done(self, sid: int, msg: Msg) -> None:
        if msg.done:
            self._streams.pop(sid, None)
