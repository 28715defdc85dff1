"""Content-Encoding decoders: streaming, stacked, truncated, corrupt, bombs."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
import zstandard

from llmspyd.protocols import decode
from llmspyd.protocols.decode import BodyDecoder, decoder_for, parse_content_encoding
from llmspyd.protocols.errors import DecodeError

RAW = b'data: {"delta":"token"}\n\n' * 400


def _enc(coding: str, raw: bytes = RAW) -> bytes:
    return {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }[coding](raw)


def _run(dec: BodyDecoder, data: bytes, step: int) -> bytes:
    out = b"".join(dec.feed(data[i : i + step]) for i in range(0, len(data), step))
    return out + dec.finish()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("step", [1, 7, 100_000])
def test_each_coding_streams(coding, step):
    assert _run(BodyDecoder([coding]), _enc(coding), step) == RAW


def test_first_bytes_come_out_before_the_end():
    """Streamed (SSE) bodies must not be held back until the body ends."""
    c = zlib.compressobj(wbits=31)
    first = c.compress(b"data: first\n\n") + c.flush(zlib.Z_SYNC_FLUSH)
    dec = BodyDecoder(["gzip"])
    assert dec.feed(first) == b"data: first\n\n"


def test_gzip_members_and_zstd_frames_concatenated():
    assert _run(BodyDecoder(["gzip"]), gzip.compress(b"a" * 10) + gzip.compress(b"b" * 10), 3) == b"a" * 10 + b"b" * 10
    z = zstandard.ZstdCompressor()
    assert _run(BodyDecoder(["zstd"]), z.compress(b"x" * 50) + z.compress(b"y" * 5), 4) == b"x" * 50 + b"y" * 5


def test_raw_deflate_is_accepted_too():
    c = zlib.compressobj(wbits=-15)
    assert _run(BodyDecoder(["deflate"]), c.compress(RAW) + c.flush(), 5) == RAW


def test_header_parsing_order_and_identity():
    headers = [("content-encoding", "gzip, identity"), ("content-encoding", "BR")]
    assert parse_content_encoding(headers) == ["gzip", "br"]
    assert decoder_for([("content-type", "x")]) is None
    assert decoder_for([("content-encoding", "identity")]) is None
    with pytest.raises(DecodeError, match="compress"):
        decoder_for([("content-encoding", "compress")])


def test_truncated_and_corrupt_streams_raise_decode_error():
    for coding in ("gzip", "deflate", "br"):
        dec = BodyDecoder([coding])
        dec.feed(_enc(coding)[:-8])
        with pytest.raises(DecodeError, match="truncated"):
            dec.finish()
    with pytest.raises(DecodeError):
        BodyDecoder(["gzip"]).feed(b"\x1f\x8b\x08\x00" + b"\xff" * 40)
    with pytest.raises(DecodeError):
        BodyDecoder(["br"]).feed(b"\xff" * 40)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_decompression_bomb_is_stopped(coding, monkeypatch):
    monkeypatch.setattr(decode, "MAX_DECODED_BYTES", 100_000)
    bomb = _enc(coding, b"\0" * 2_000_000)
    dec = BodyDecoder([coding])
    with pytest.raises(DecodeError, match="exceeds"):
        _run(dec, bomb, 4096)


def test_transfer_codings_other_than_chunked_are_undone_after_content_codings():
    headers = [("content-encoding", "br"), ("transfer-encoding", "gzip, chunked")]
    assert parse_content_encoding(headers) == ["br", "gzip"]
    assert _run(decoder_for(headers), gzip.compress(brotli.compress(RAW)), 33) == RAW
