"""Pure parts of `llmspy sniff`: JSON shape, readable rendering, size parsing, filters."""

from __future__ import annotations

import base64
import io
import json

from llmspyd.capture.sniff import Printer, ProcessFilter, _size, chunk_json, chunk_text, printable, _Clock
from llmspyd.chunks import ConnClosed, Direction, Peer, ProcessExec, TlsChunk


def chunk(**kw) -> TlsChunk:
    base = dict(ts_ns=1, pid=42, tid=43, comm="curl", conn=0xABC, direction=Direction.WRITE, offset=100,
                data=b"GET / HTTP/1.1\r\n\r\n", call_len=18, fd=5, peer=Peer(2, "127.0.0.1", 443, 5555))
    base.update(kw)
    return TlsChunk(**base)


def test_chunk_json_fields_and_data_roundtrip() -> None:
    o = chunk_json(chunk(data=b"\x00\xffbin", first=True, last=False))
    assert o["pid"] == 42 and o["tid"] == 43 and o["comm"] == "curl"
    assert o["conn"] == "42:abc" and o["direction"] == "write" and o["offset"] == 100
    assert o["len"] == 5 and base64.b64decode(o["data"]) == b"\x00\xffbin"
    assert o["peer"] == "127.0.0.1:443" and o["local_port"] == 5555 and o["fd"] == 5
    assert o["flags"] == ["first"]
    json.dumps(o)  # serialisable as is
    assert chunk_json(chunk(direction=Direction.READ, peer=None))["peer"] is None
    assert chunk_json(chunk(peer=Peer(10, "::1", 8443)))["peer"] == "[::1]:8443"


def test_printable_keeps_text_and_escapes_control_bytes() -> None:
    assert printable(b"a\r\nb\tc") == "a\nb\tc"
    assert printable(b"\x00\x1b[0m") == "\\x00\\x1b[0m"
    assert printable(b"\xff\xfe") == "\\xff\\xfe"
    assert printable("héllo".encode()) == "héllo"


def test_chunk_text_preview_is_bounded_unless_full() -> None:
    big = chunk(data=b"x" * 5000, call_len=5000)
    short = chunk_text(big, _Clock())
    assert "more bytes; --full shows all" in short and len(short) < 3000
    assert chunk_text(big, _Clock(), full=True).count("x") >= 5000
    head = chunk_text(chunk(truncated=True), _Clock()).splitlines()[0]
    assert "curl[42/43] >> conn 42:abc fd=5 to 127.0.0.1:443 write 18B off=100" in head and "[truncated]" in head


def test_size_parsing() -> None:
    assert _size("4096") == 4096
    assert _size("64k") == 65536 and _size("8MiB") == 8 << 20 and _size("1g") == 1 << 30


def test_exe_filter_uses_exec_events_for_short_lived_processes() -> None:
    out = io.StringIO()
    p = Printer(out, as_json=True, full=False, filt=ProcessFilter(["curl"], []), pids=set())
    # pid 999999 does not exist any more: only the exec event tells what it ran
    p([ProcessExec(ts_ns=1, pid=999999, ppid=1, uid=0, comm="curl", filename="/usr/bin/curl"),
       chunk(pid=999999), chunk(pid=999998, comm="python3"), ConnClosed(ts_ns=2, pid=999999, conn=1)])  # fmt: skip
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["pid"] for line in lines] == [999999]


def test_pid_and_comm_filters() -> None:
    out = io.StringIO()
    p = Printer(out, as_json=True, full=False, filt=ProcessFilter([], ["node"]), pids={7, 8})
    p([chunk(pid=7, comm="node"), chunk(pid=8, comm="curl"), chunk(pid=9, comm="node")])
    assert [json.loads(line)["pid"] for line in out.getvalue().splitlines()] == [7]
