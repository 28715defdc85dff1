"""Python mirror of pattern() in tests/go/{client,server}/main.go."""

from __future__ import annotations

import hashlib


def pattern(n: int, seed: int) -> bytes:
    out = bytearray()
    blk = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{blk}".encode()).digest()
        blk += 1
    return bytes(out[:n])
