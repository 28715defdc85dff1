"""Incremental Content-Encoding decoders: gzip, deflate, br, zstd (and stacks of them).

Bodies arrive in pieces; each decoder takes bytes as they come and returns what
it can decode so far, so a streamed (SSE) response stays streamed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli
import zstandard

from llmspyd.protocols.errors import DecodeError

# A decompression bomb must not eat the daemon's memory: an LLM request or
# response body is at most a few MB of JSON; 64 MiB decoded is far beyond any
# real one, yet bounded.
MAX_DECODED_BYTES = 64 * 1024 * 1024

SUPPORTED = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})


def parse_content_encoding(headers: list[tuple[str, str]]) -> list[str]:
    """Codings in the order they were applied, identity dropped.

    Content-Encoding first, then any Transfer-Encoding other than chunked
    (`Transfer-Encoding: gzip, chunked` is rare but legal HTTP/1.1; chunked
    framing itself is undone by the HTTP/1 parser).
    """
    content: list[str] = []
    transfer: list[str] = []
    for name, value in headers:
        if name == "content-encoding":
            content += [c.strip().lower() for c in value.split(",") if c.strip()]
        elif name == "transfer-encoding":
            transfer += [c.strip().lower() for c in value.split(",") if c.strip()]
    return [c for c in content + transfer if c not in ("identity", "chunked")]


class _Step:
    """One coding layer: feed() -> bytes, finish() -> bytes (checks the stream ended)."""

    def feed(self, data: bytes, budget: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class _Gzip(_Step):
    """gzip, including several concatenated members (allowed by RFC 1952)."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes, budget: int) -> bytes:
        out = []
        while data:
            piece = self._d.decompress(data, budget + 1)
            out.append(piece)
            budget -= len(piece)
            if budget < 0:
                raise DecodeError(f"decoded body exceeds {MAX_DECODED_BYTES} bytes")
            if self._d.unconsumed_tail:
                data = self._d.unconsumed_tail
            elif self._d.eof and self._d.unused_data:
                data = self._d.unused_data
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                data = b""
        return b"".join(out)

    def finish(self) -> bytes:
        if not self._d.eof:
            raise DecodeError("gzip stream truncated")
        return b""


class _Deflate(_Step):
    """'deflate' means zlib-wrapped (RFC 9110) but many servers send raw deflate: sniff the header."""

    def __init__(self) -> None:
        self._d: zlib._Decompress | None = None
        self._head = b""

    def feed(self, data: bytes, budget: int) -> bytes:
        if self._d is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            cmf, flg = self._head[0], self._head[1]
            zlib_wrapped = (cmf & 0x0F) == 8 and (cmf * 256 + flg) % 31 == 0
            self._d = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
            data, self._head = self._head, b""
        out = self._d.decompress(data, budget + 1)
        while self._d.unconsumed_tail and len(out) <= budget:
            out += self._d.decompress(self._d.unconsumed_tail, budget + 1 - len(out))
        if len(out) > budget:
            raise DecodeError(f"decoded body exceeds {MAX_DECODED_BYTES} bytes")
        return out

    def finish(self) -> bytes:
        if self._d is None:
            if self._head:
                raise DecodeError("deflate stream truncated")
            return b""
        if not self._d.eof:
            raise DecodeError("deflate stream truncated")
        return b""


class _Brotli(_Step):
    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    def feed(self, data: bytes, budget: int) -> bytes:
        out = self._d.process(data, output_buffer_limit=budget + 1)
        while len(out) <= budget and not self._d.can_accept_more_data():
            more = self._d.process(b"", output_buffer_limit=budget + 1 - len(out))
            if not more:
                break
            out += more
        if len(out) > budget:
            raise DecodeError(f"decoded body exceeds {MAX_DECODED_BYTES} bytes")
        return out

    def finish(self) -> bytes:
        if not self._d.is_finished():
            raise DecodeError("brotli stream truncated")
        return b""


class _Zstd(_Step):
    def __init__(self) -> None:
        # read_across_frames: a streamed body may be several zstd frames back to back
        self._d = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
        self._seen = False

    def feed(self, data: bytes, budget: int) -> bytes:
        self._seen = True
        out = self._d.decompress(data)
        if len(out) > budget:
            raise DecodeError(f"decoded body exceeds {MAX_DECODED_BYTES} bytes")
        return out


_STEPS: dict[str, Callable[[], _Step]] = {
    "gzip": _Gzip,
    "x-gzip": _Gzip,
    "deflate": _Deflate,
    "br": _Brotli,
    "zstd": _Zstd,
}


class BodyDecoder:
    """Undo a stack of content codings, incrementally.

    Errors surface as `DecodeError`; the caller marks the message broken and
    keeps what was already decoded.
    """

    def __init__(self, codings: list[str]) -> None:
        unknown = [c for c in codings if c not in _STEPS]
        if unknown:
            raise DecodeError(f"unsupported content-encoding {','.join(unknown)}")
        # applied left to right, so undone right to left
        self._steps = [_STEPS[c]() for c in reversed(codings)]
        self._total = 0

    def _run(self, data: bytes, start: int) -> bytes:
        for step in self._steps[start:]:
            if not data:
                return b""
            data = step.feed(data, MAX_DECODED_BYTES - self._total)
        return data

    def feed(self, data: bytes) -> bytes:
        try:
            out = self._run(data, 0)
        except DecodeError:
            raise
        except (zlib.error, brotli.error, zstandard.ZstdError) as e:
            raise DecodeError(f"{type(e).__name__}: {e}") from None
        self._total += len(out)
        return out

    def finish(self) -> bytes:
        """End of body: flush every layer and check each stream really ended."""
        out = b""
        try:
            for i, step in enumerate(self._steps):
                tail = step.finish()
                out = self._run(tail, i + 1) if tail else out
        except DecodeError:
            raise
        except (zlib.error, brotli.error, zstandard.ZstdError) as e:
            raise DecodeError(f"{type(e).__name__}: {e}") from None
        return out


def decoder_for(headers: list[tuple[str, str]]) -> BodyDecoder | None:
    """A decoder for the message's Content-Encoding, None when the body is identity.

    Raises DecodeError for a coding we cannot undo, so the caller can say so
    instead of handing compressed bytes on as if they were text.
    """
    codings = parse_content_encoding(headers)
    return BodyDecoder(codings) if codings else None
