"""AWS binary event-stream framing (`application/vnd.amazon.eventstream`), sans-IO.

Bedrock's ConverseStream and InvokeModelWithResponseStream answer with this.
One message:

    total_length u32 BE | headers_length u32 BE | prelude_crc u32 (CRC32 of the 8 bytes before)
    headers (headers_length bytes) | payload | message_crc u32 (CRC32 of everything before it)

A header is: name_len u8, name, type u8, value (type-dependent). Both CRCs
are checked. A bad message CRC drops that message (its length is still
trusted, so the next one is found); a bad prelude CRC means the length cannot
be trusted and the rest of the stream is given up. Both are counted.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

PRELUDE_LEN = 12
CRC_LEN = 4
MIN_MESSAGE_LEN = PRELUDE_LEN + CRC_LEN
# The AWS SDKs refuse messages above 16 MiB (and header blocks above 128 KiB); so do we.
MAX_MESSAGE_LEN = 16 * 1024 * 1024
MAX_HEADERS_LEN = 128 * 1024

_U32 = struct.Struct(">I")


class EventStreamError(ValueError):
    pass


@dataclass(slots=True)
class EventMessage:
    headers: dict[str, object]
    payload: bytes
    ts_ns: int

    @property
    def message_type(self) -> str:
        return str(self.headers.get(":message-type", "event"))

    @property
    def event_type(self) -> str:
        return str(self.headers.get(":event-type") or self.headers.get(":exception-type") or "")


@dataclass
class EventStreamParser:
    _buf: bytearray = field(default_factory=bytearray)
    messages: int = 0
    crc_failures: int = 0
    header_errors: int = 0
    broken: str | None = None  # set once the stream cannot be followed any more

    def feed(self, data: bytes, ts_ns: int) -> list[EventMessage]:
        if self.broken:
            return []
        buf = self._buf
        buf += data
        out: list[EventMessage] = []
        pos = 0
        n = len(buf)
        while n - pos >= PRELUDE_LEN:
            total, hlen, pcrc = struct.unpack_from(">III", buf, pos)
            if zlib.crc32(buf[pos : pos + 8]) != pcrc:
                self.crc_failures += 1
                self.broken = "prelude CRC mismatch"
                break
            if (
                total < MIN_MESSAGE_LEN
                or total > MAX_MESSAGE_LEN
                or hlen > min(MAX_HEADERS_LEN, total - MIN_MESSAGE_LEN)
            ):
                self.broken = f"bad lengths total={total} headers={hlen}"
                break
            if n - pos < total:
                break
            end = pos + total
            (mcrc,) = _U32.unpack_from(buf, end - CRC_LEN)
            if zlib.crc32(buf[pos : end - CRC_LEN]) != mcrc:
                self.crc_failures += 1
            else:
                hstart = pos + PRELUDE_LEN
                try:
                    headers = parse_headers(bytes(buf[hstart : hstart + hlen]))
                except EventStreamError:
                    self.header_errors += 1
                else:
                    out.append(EventMessage(headers, bytes(buf[hstart + hlen : end - CRC_LEN]), ts_ns))
                    self.messages += 1
            pos = end
        if self.broken:
            buf.clear()
        else:
            del buf[:pos]
        return out

    def pending_bytes(self) -> int:
        return len(self._buf)


def parse_headers(raw: bytes) -> dict[str, object]:
    headers: dict[str, object] = {}
    pos = 0
    n = len(raw)
    try:
        while pos < n:
            nlen = raw[pos]
            name = raw[pos + 1 : pos + 1 + nlen].decode("utf-8", "replace")
            pos += 1 + nlen
            typ = raw[pos]
            pos += 1
            value: object
            if typ == 0:
                value = True
            elif typ == 1:
                value = False
            elif typ == 2:
                value = struct.unpack_from(">b", raw, pos)[0]
                pos += 1
            elif typ == 3:
                value = struct.unpack_from(">h", raw, pos)[0]
                pos += 2
            elif typ == 4:
                value = struct.unpack_from(">i", raw, pos)[0]
                pos += 4
            elif typ in (5, 8):  # long, timestamp (ms since epoch)
                value = struct.unpack_from(">q", raw, pos)[0]
                pos += 8
            elif typ in (6, 7):  # bytes, string: u16 length
                (vlen,) = struct.unpack_from(">H", raw, pos)
                pos += 2
                chunk = raw[pos : pos + vlen]
                if len(chunk) != vlen:
                    raise EventStreamError("header value runs past the header block")
                value = chunk.decode("utf-8", "replace") if typ == 7 else chunk
                pos += vlen
            elif typ == 9:
                value = raw[pos : pos + 16].hex()
                pos += 16
            else:
                raise EventStreamError(f"unknown header type {typ}")
            if pos > n:
                raise EventStreamError("header runs past the header block")
            headers[name] = value
    except (IndexError, struct.error) as e:
        raise EventStreamError(str(e)) from e
    return headers


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """Build one message (string headers only): what Bedrock sends, for tests and the fake provider."""
    hb = bytearray()
    for name, value in headers.items():
        nb = name.encode()
        vb = value.encode()
        hb += bytes([len(nb)]) + nb + b"\x07" + struct.pack(">H", len(vb)) + vb
    total = PRELUDE_LEN + len(hb) + len(payload) + CRC_LEN
    prelude = struct.pack(">II", total, len(hb))
    prelude += _U32.pack(zlib.crc32(prelude))
    body = prelude + bytes(hb) + payload
    return body + _U32.pack(zlib.crc32(body))
