"""Incremental JSON streams that are not SSE.

- `NdjsonParser`: one JSON value per line (Ollama's native /api/chat and
  /api/generate, content type application/x-ndjson).
- `JsonArrayParser`: a JSON array whose elements arrive over time (Gemini
  streamGenerateContent without alt=sse: "[{...}\\n,\\r\\n{...}\\n]").

Both are sans-IO: `feed(bytes, ts_ns) -> list[(value, ts_ns)]`. Invalid
elements are counted in `bad` and skipped; they never raise.
"""

from __future__ import annotations

import json
import re
from typing import Any

# One element longer than this is dropped (and counted) rather than buffered without end.
MAX_ELEMENT_BYTES = 16 * 1024 * 1024


class NdjsonParser:
    def __init__(self) -> None:
        self._buf = b""
        self.bad = 0
        self.values = 0

    def feed(self, data: bytes, ts_ns: int) -> list[tuple[Any, int]]:
        buf = self._buf + data if self._buf else data
        out: list[tuple[Any, int]] = []
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > MAX_ELEMENT_BYTES:
            self._buf = b""
            self.bad += 1
        for line in lines:
            self._one(line, ts_ns, out)
        return out

    def close(self, ts_ns: int) -> list[tuple[Any, int]]:
        """End of body: a last line without newline still counts."""
        out: list[tuple[Any, int]] = []
        if self._buf:
            self._one(self._buf, ts_ns, out)
            self._buf = b""
        return out

    def pending_bytes(self) -> int:
        return len(self._buf)

    def _one(self, line: bytes, ts_ns: int, out: list[tuple[Any, int]]) -> None:
        line = line.strip()
        if not line:
            return
        try:
            out.append((json.loads(line), ts_ns))
            self.values += 1
        except ValueError:
            self.bad += 1


_INTERESTING = re.compile(rb'[{}\[\]"\\]')


class JsonArrayParser:
    """Split a streamed top-level JSON array into its elements as each one closes.

    Scans only for structural bytes (braces, brackets, quotes, backslashes), so
    the cost is one regex pass over the body.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # where scanning resumes in _buf
        self._depth = 0  # nesting depth, the outer array counted as 1
        self._in_str = False
        self._escape = False
        self._start = -1  # start of the current element in _buf
        self.bad = 0
        self.values = 0
        self.started = False

    def feed(self, data: bytes, ts_ns: int) -> list[tuple[Any, int]]:
        out: list[tuple[Any, int]] = []
        buf = self._buf
        buf += data
        i = self._scan
        n = len(buf)
        while i < n:
            if self._escape:
                self._escape = False
                i += 1
                continue
            if self._in_str:
                m = _INTERESTING.search(buf, i)
                if m is None:
                    i = n
                    break
                i = m.start()
                c = buf[i]
                if c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_str = False
                i += 1
                continue
            m = _INTERESTING.search(buf, i)
            if m is None:
                i = n
                break
            i = m.start()
            c = buf[i]
            if c == 0x22:
                self._in_str = True
            elif c in (0x7B, 0x5B):  # { [
                if self._depth == 0 and c == 0x5B:
                    self.started = True
                elif self._depth == 1:
                    self._start = i
                elif self._depth == 0:  # a bare object: not an array stream, take it as one element
                    self.started = True
                    self._start = i
                    self._depth += 1
                self._depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth == 1 and self._start >= 0:
                    self._emit(bytes(buf[self._start : i + 1]), ts_ns, out)
                    self._start = -1
                elif self._depth <= 0:
                    self._depth = 0
            i += 1
        # drop what is consumed, keep the element in progress
        keep_from = self._start if self._start >= 0 else i
        if keep_from > 0:
            del buf[:keep_from]
            if self._start >= 0:
                self._start = 0
            i -= keep_from
        self._scan = i
        if len(buf) > MAX_ELEMENT_BYTES:
            self.bad += 1
            buf.clear()
            self._scan = 0
            self._start = -1
            self._depth = min(self._depth, 1)
            self._in_str = False
        return out

    def pending_bytes(self) -> int:
        return len(self._buf) if self._start >= 0 else 0

    def _emit(self, raw: bytes, ts_ns: int, out: list[tuple[Any, int]]) -> None:
        try:
            out.append((json.loads(raw), ts_ns))
            self.values += 1
        except ValueError:
            self.bad += 1
