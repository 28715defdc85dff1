"""Incremental server-sent events parser (WHATWG HTML, "event stream interpretation").

Sans-IO: `feed(bytes, ts_ns) -> list[SseEvent]`. Lines end in CRLF, LF or CR
(a CR at the end of one chunk followed by LF at the start of the next is ONE
line end); `data:` lines accumulate joined by "\\n"; lines starting with ":"
are comments; a blank line dispatches. An event's `ts_ns` is the time of the
chunk that completed it, which is when a client could first have used it.
Lines are split on bytes and decoded one by one, so a UTF-8 character split
across chunks is never broken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A single SSE line longer than this is cut (and counted): providers send one JSON object per
# data line, a few KiB at most; anything far bigger is not an event stream we can use.
MAX_LINE_BYTES = 8 * 1024 * 1024

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class SseEvent:
    event: str  # "message" when the stream gave no event field
    data: str
    id: str | None
    ts_ns: int


class SseParser:
    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False  # previous chunk ended in CR: a leading LF belongs to it
        self._first = True
        self._event = ""
        self._data: list[str] = []
        self._has_data = False
        self._last_id: str | None = None
        self.retry_ms: int | None = None
        self.comments = 0
        self.cut_lines = 0  # lines longer than MAX_LINE_BYTES
        self.events = 0

    def feed(self, data: bytes, ts_ns: int) -> list[SseEvent]:
        if not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buf = self._buf + data if self._buf else data
        if self._first and len(buf) >= 3:
            self._first = False
            if buf.startswith(_BOM):
                buf = buf[3:]
        out: list[SseEvent] = []
        if b"\r" not in buf:
            # fast path: LF-only streams (every provider we know) need no regex
            lines = buf.split(b"\n")
            rest = lines.pop()
            for line in lines:
                self._line(line, ts_ns, out)
            if len(rest) > MAX_LINE_BYTES:
                self.cut_lines += 1
                rest = b""
            self._buf = rest
            return out
        pos = 0
        n = len(buf)
        while pos < n:
            m = _EOL.search(buf, pos)
            if m is None:
                break
            end = m.end()
            if m.group() == b"\r" and end == n:
                # could be the first half of CRLF: take the line, drop a following LF
                self._skip_lf = True
            self._line(buf[pos : m.start()], ts_ns, out)
            pos = end
        rest = buf[pos:]
        if len(rest) > MAX_LINE_BYTES:
            self.cut_lines += 1
            rest = b""
        self._buf = rest
        return out

    def pending_bytes(self) -> int:
        """Bytes of an event not yet dispatched: non-zero at the end of a truncated stream."""
        pending = len(self._buf)
        if self._has_data or self._event:
            pending += sum(len(d) + 1 for d in self._data) or 1
        return pending

    def _line(self, raw: bytes, ts_ns: int, out: list[SseEvent]) -> None:
        if not raw:
            if self._has_data:
                data = "\n".join(self._data)
                out.append(SseEvent(self._event or "message", data, self._last_id, ts_ns))
                self.events += 1
            self._event = ""
            self._data = []
            self._has_data = False
            return
        if raw[:6] == b"data: ":
            self._data.append(raw[6:].decode("utf-8", "replace"))
            self._has_data = True
            return
        if raw[0] == 0x3A:  # ':' comment, e.g. OpenRouter's ": OPENROUTER PROCESSING" keep-alives
            self.comments += 1
            return
        line = raw.decode("utf-8", "replace")
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        # other field names are ignored, as the spec says
