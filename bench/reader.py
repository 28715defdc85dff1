"""Ring buffer reader cost: decode() alone, and the whole path kernel ring -> RingReader -> sink.

Run as root: .venv/bin/python -m bench.reader
Prints figures; asserts nothing. The kernel side is the test object of
tests/bpf/ (its tls_like uprobe on libc atoi emits one llmspy TLS record per
call) driven by a child that calls atoi in a tight loop, so the daemon-side
CPU per record is what this process burns divided by the records it got.
"""

from __future__ import annotations

import collections
import os
import resource
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from llmspyd.bpf.libbpf import BpfObject
from llmspyd.capture.reader import RingReader, decode
from tests.bpf.build import compile_test_object
from tests.unit.test_reader import tls_record

CALLS = 200_000
CHILD = f"""
import ctypes
atoi = ctypes.CDLL(None).atoi
atoi.argtypes = [ctypes.c_char_p]
arg = b"x" * 60
for _ in range({CALLS}):
    atoi(arg)
"""


def bench_decode() -> None:
    errs: collections.Counter[str] = collections.Counter()
    for size in (100, 4096, 32768):
        for fam in (0, 2):
            rec = memoryview(tls_record(b"x" * size, family=fam, addr=b"\x7f\0\0\1"))
            n = 100_000 if size < 32768 else 20_000
            t = timeit.timeit(lambda: decode(rec, errs), number=n) / n
            print(f"decode TLS record {size:6d} B, peer {'yes' if fam else 'no '}: {t * 1e6:6.2f} us")


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def bench_ring() -> None:
    if os.geteuid() != 0:
        print("ring: skipped (needs root)")
        return
    with tempfile.TemporaryDirectory() as d:
        obj_path = compile_test_object(Path(d) / "t.bpf.o")
        with BpfObject.open(obj_path) as obj:
            obj.map("rb").set_max_entries(64 << 20)
            obj.load()
            got = [0, 0]

            def sink(batch: list) -> None:
                got[0] += len(batch)
                got[1] += 1

            reader = RingReader(obj.map("rb"), sink, poll_ms=100)
            child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + CHILD],
                                     stdin=subprocess.PIPE)  # fmt: skip
            link = obj.program("tls_like").attach_uprobe("/lib/x86_64-linux-gnu/libc.so.6", func_name="atoi",
                                                         pid=child.pid)  # fmt: skip
            reader.start()
            c0, t0 = cpu_s(), time.monotonic()
            child.stdin.write(b"go\n")
            child.stdin.close()
            child.wait()
            wall_child = time.monotonic() - t0
            while got[0] < CALLS and time.monotonic() - t0 < 60:
                time.sleep(0.05)
            reader.stop()
            link.destroy()
            cpu, wall = cpu_s() - c0, time.monotonic() - t0
    print(f"ring: {got[0]} records (of {CALLS} calls) in {got[1]} batches; child ran {wall_child:.2f}s "
          f"({CALLS / wall_child:,.0f} probed calls/s)")  # fmt: skip
    print(f"ring: reader CPU {cpu:.2f}s = {cpu / max(got[0], 1) * 1e6:.2f} us per record "
          f"(ring -> ctypes callback -> decode -> batch -> sink); decode errors {reader.counters['decode_errors']}")  # fmt: skip


if __name__ == "__main__":
    bench_decode()
    bench_ring()
