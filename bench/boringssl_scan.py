"""How long the stripped-BoringSSL finder takes on the real agents, cold and from the cache.

`.venv/bin/python -m bench.boringssl_scan [EXE ...]`; with no argument, the pinned agents of
tests/agents/versions.txt that are installed. Prints figures, asserts nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from llmspyd.discovery import boringssl


def main(paths: list[str]) -> None:
    if not paths:
        from tests.agents import pinned

        paths = [str(a.exe) for a in pinned() if a.exe.is_file() and a.exe.read_bytes()[:4] == b"\x7fELF"]
    with tempfile.TemporaryDirectory() as cache:
        os.environ[boringssl.CACHE_ENV] = cache
        print(f"{'file':60} {'MiB':>6} {'cold s':>7} {'cached ms':>9}  result")
        for p in paths:
            st = os.stat(p)
            t0 = time.perf_counter()
            a = boringssl.analyse(p)
            cold = time.perf_counter() - t0
            boringssl.boringssl_target(p, st.st_dev, st.st_ino)  # fills the cache (analyses once more)
            t0 = time.perf_counter()
            boringssl.boringssl_target(p, st.st_dev, st.st_ino)
            cached = (time.perf_counter() - t0) * 1000
            res = f"{a.entries}: " + str({k: hex(v) for k, v in a.vaddrs.items()}) if a.vaddrs else (a.reason or "none")
            print(f"{p[-60:]:60} {st.st_size / 2**20:6.0f} {cold:7.2f} {cached:9.2f}  {res}")


if __name__ == "__main__":
    main(sys.argv[1:])
