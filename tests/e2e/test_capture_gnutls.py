"""GnuTLS end to end: wget and gnutls-cli against tests/tlsserver.py, captured by bpf/tls_gnutls.bpf.c.

The server records the plaintext it really received and sent per connection; the capture of the client
process must equal it byte for byte, several MiB both ways, with fd and peer, and the connection must end
with a CONN_CLOSE (gnutls_deinit).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from llmspyd.chunks import ConnClosed, Direction, Stack
from llmspyd.discovery.target import Target
from tests.tlsserver import assert_conn_exact, pattern

pytestmark = pytest.mark.e2e

MIB = 1 << 20
CLIENT_TIMEOUT = 60
GNUTLS_OBJECTS = ("process.bpf.o", "tls_gnutls.bpf.o")
# room for a whole test's exchanges even if the reader falls behind on a loaded machine
RING_BYTES = 64 << 20
# role -> the exported entry points that move application data through the caller's buffer
GNUTLS_ROLES = {
    "gnutls_record_send": ("gnutls_record_send", "gnutls_record_send2"),
    "gnutls_record_recv": ("gnutls_record_recv", "gnutls_record_recv_seq"),
    "gnutls_deinit": ("gnutls_deinit",),
}


def libgnutls() -> str | None:
    out = subprocess.run(["ldd", shutil.which("wget") or "/usr/bin/wget"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if "libgnutls.so" in line and "=>" in line:
            return os.path.realpath(line.split("=>")[1].split()[0])
    return None


def gnutls_target(path: str) -> Target:
    from llmspyd.discovery.elfsyms import open_elf

    names = [n for names in GNUTLS_ROLES.values() for n in names]
    with open_elf(path) as img:
        syms = img.lookup(names, tables=(".dynsym",))
    st = os.stat(path)
    offsets = {role: [syms[n].offset for n in names if n in syms] for role, names in GNUTLS_ROLES.items()}
    return Target(path, st.st_dev, st.st_ino, Stack.GNUTLS, offsets, how="dynsym")


@pytest.fixture(scope="module")
def gnutls_capture() -> Iterator[tuple]:
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    lib = libgnutls()
    if lib is None or not shutil.which("gnutls-cli"):
        pytest.skip("wget with libgnutls and gnutls-cli are needed (Debian wget, gnutls-bin)")
    from llmspyd.capture.session import CaptureSession
    from tests.conftest import EventLog

    log = EventLog()
    session = CaptureSession(log, objects=GNUTLS_OBJECTS, ring_bytes=RING_BYTES, scan=False, poll_ms=50).start()
    try:
        target = gnutls_target(lib)
        assert all(target.offsets.values()), target
        assert sorted(session.probes.attach(target)) == sorted(GNUTLS_ROLES)
        yield session, log
    finally:
        session.close()


def assert_exact(log, server, pid: int, timeout: float = 15.0):
    """One connection of pid, captured equal to what the server saw on it; returns (conn, server record)."""
    assert log.wait_for(lambda: log.conns(pid), timeout), f"nothing captured for pid {pid}"
    (conn,) = log.conns(pid)
    rec, _ = assert_conn_exact(log, server, pid, conn, timeout)
    chunks = log.chunks(pid, conn)
    assert all(c.stack == Stack.GNUTLS for c in chunks)
    assert all(c.fd >= 0 for c in chunks if c.peer is not None)
    return conn, rec


def test_wget_post_and_get_several_mib_exact(gnutls_capture, tls_server, certs, tmp_path):
    _, log = gnutls_capture
    body = tmp_path / "body"
    body.write_bytes(pattern(3 * MIB, seed=5))
    out = tmp_path / "out"
    p = subprocess.Popen(
        ["wget", "-q", "--ca-certificate", str(certs.ca), "--post-file", str(body), "-O", str(out),
         f"{tls_server.url}/echo"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _, err = p.communicate(timeout=CLIENT_TIMEOUT)
    assert p.returncode == 0, err
    assert out.read_bytes() == pattern(3 * MIB, seed=5)
    _, rec = assert_exact(log, tls_server, p.pid)
    assert rec.received.startswith(b"POST /echo HTTP/1.1\r\n") and len(rec.sent) > 3 * MIB
    assert all(c.comm == "wget" for c in log.chunks(p.pid))
    # (wget exits without gnutls_deinit: its connection ends with the process, not with a CONN_CLOSE)


def test_gnutls_cli_interactive_exact(gnutls_capture, tls_server, certs):
    """gnutls-cli sends stdin as it comes (4 KiB per gnutls_record_send) and prints what it receives."""
    _, log = gnutls_capture
    n_resp = MIB // 4  # gnutls-cli prints what it receives slowly (~2 s per MiB without any probe); wget does the big download
    p = subprocess.Popen(
        ["gnutls-cli", "--x509cafile", str(certs.ca), "-p", str(tls_server.port), "127.0.0.1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert p.stdin is not None and p.stdout is not None
    upload = pattern(MIB, seed=9)
    p.stdin.write(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(upload) + upload)
    p.stdin.write(b"GET /bytes/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % n_resp)
    p.stdin.flush()
    # wait for both responses before closing stdin (EOF makes gnutls-cli say goodbye)
    received = bytearray()
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while len(received) < len(upload) + n_resp:
        assert time.monotonic() < deadline, "gnutls-cli: responses incomplete"
        chunk = os.read(p.stdout.fileno(), 1 << 20)
        assert chunk, "gnutls-cli exited early"
        received += chunk
    p.stdin.close()
    p.wait(timeout=CLIENT_TIMEOUT)
    conn, rec = assert_exact(log, tls_server, p.pid)
    assert rec.requests == 2
    assert upload in rec.received and pattern(n_resp) in rec.sent
    # gnutls-cli sends each stdin read as it comes: many send calls, each whole
    sends = [c for c in log.chunks(p.pid, direction=Direction.WRITE) if c.first]
    assert len(sends) > 1
    # gnutls-cli frees its session: gnutls_deinit ends the connection's streams
    assert log.wait_for(lambda: any(e.conn == conn for e in log.events(ConnClosed, p.pid)), 10)
    closed = [e for e in log.events(ConnClosed, p.pid) if e.conn == conn]
    assert len(closed) == 1 and closed[0].stack == Stack.GNUTLS


def test_discovery_attaches_libgnutls_by_itself(tls_server, certs):
    """With the daemon's discovery and no manual attach, wget's libgnutls is found from its exec and probed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    lib = libgnutls()
    if lib is None:
        pytest.skip("wget with libgnutls is needed")
    from llmspyd.capture.session import CaptureSession
    from tests.conftest import EventLog

    log = EventLog()
    session = CaptureSession(log, full_discovery=True, scan=False, ring_bytes=RING_BYTES, poll_ms=20).start()
    try:
        st = os.stat(lib)

        # the first wget's exec makes discovery probe libgnutls (maybe too late for that wget's first bytes)
        subprocess.run(["wget", "-q", "--ca-certificate", str(certs.ca), "-O", "/dev/null", f"{tls_server.url}/x"],
                       capture_output=True, timeout=CLIENT_TIMEOUT, check=False)  # fmt: skip
        assert log.wait_for(lambda: (st.st_dev, st.st_ino) in session.probes.attached(), 30)
        assert session.probes.attached()[(st.st_dev, st.st_ino)].target.stack == Stack.GNUTLS
        p = subprocess.Popen(["wget", "-q", "--ca-certificate", str(certs.ca), "-O", "/dev/null",
                              f"{tls_server.url}/bytes/{MIB}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        _, err = p.communicate(timeout=CLIENT_TIMEOUT)
        assert p.returncode == 0, err
        _, rec = assert_exact(log, tls_server, p.pid)
        assert rec.sent.endswith(pattern(MIB))
    finally:
        session.close()
