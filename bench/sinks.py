"""Output cost per record: redaction, journal encoding, a real journald, JSON lines.

`.venv/bin/python -m bench.sinks` (as root, for the standalone journald). Records
are realistic: an agent turn with a 150 KB request history and a 2 KB answer,
and a 1 MiB prompt (the memfd path). Figures are printed, not asserted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from llmspyd.llm.record import LlmExchange
from llmspyd.sinks import JsonLinesSink
from llmspyd.sinks.journald import JournaldSink, encode_entry, journal_fields
from llmspyd.sinks.redact import Redactor

API_KEY = "sk-ant-api03-BENCHKEY0123456789"


def record(prompt_bytes: int) -> dict:
    turns = []
    chunk = "x" * 1000 + "\n"
    n = max(1, prompt_bytes // (len(chunk) * 4))
    for i in range(n):
        turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": chunk * 4})
    ex = LlmExchange.model_validate(
        {
            "id": "bench",
            "provider": "anthropic",
            "api": "messages",
            "model": "claude-sonnet-4",
            "stream": True,
            "latency_ms": 2100.0,
            "ttft_ms": 400.0,
            "process": {"pid": 4242, "comm": "claude", "exe": "/usr/bin/claude", "cmdline": ["claude"]},
            "connection": {"peer_addr": "10.0.0.1", "peer_port": 443, "authority": "api.anthropic.com"},
            "request": {
                "method": "POST",
                "path": "/v1/messages",
                "headers": [["x-api-key", API_KEY], ["content-type", "application/json"]],
                "messages": turns,
                "body": "{}",
            },
            "response": {"status": 200, "text": "ok " * 700},
            "usage": {"input_tokens": 40000, "output_tokens": 500},
            "complete": True,
        }
    )
    return ex.model_dump(mode="json")


def timeit(fn, seconds: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    """Calls per second of fn over about `seconds`."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def main() -> None:
    redact = Redactor()
    for label, size in (("150 KB agent turn", 150_000), ("1 MiB prompt", 1 << 20)):
        rec = record(size)
        red = redact(rec)
        wire = encode_entry(journal_fields(red))
        print(f"{label}: record {len(wire) / 1e6:.2f} MB on the journal wire")
        print(f"  redaction             {timeit(lambda: redact(rec)):8.0f} records/s")
        print(f"  journal fields+encode {timeit(lambda: encode_entry(journal_fields(red))):8.0f} records/s")
        with open(os.devnull, "w") as devnull:
            sink = JsonLinesSink(devnull)
            print(f"  JSON line to a file   {timeit(lambda: sink.emit(red)):8.0f} records/s")
        if os.geteuid() == 0 and shutil.which("unshare") and os.path.exists("/lib/systemd/systemd-journald"):
            rate, path = _journald_rate(red)
            print(f"  real journald ({path}) {rate:8.0f} records/s, {rate * len(wire) / 1e6:.0f} MB/s")


def _journald_rate(rec: dict) -> tuple[float, str]:
    from tests.e2e.test_journald import JOURNALD, START

    root = Path(tempfile.mkdtemp(prefix="llmspy-bench-journal-"))
    (root / "sock").mkdir()
    (root / "log").mkdir()
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", START, "sh", str(root), JOURNALD])
    try:
        sock = root / "sock" / "socket"
        while not sock.exists():
            time.sleep(0.05)
        sink = JournaldSink(str(sock))
        rate = timeit(lambda: sink.emit(rec), 2.0)
        path = "memfd" if sink.writer.memfd_entries else "datagram"
        sink.close()
        return rate, path
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
