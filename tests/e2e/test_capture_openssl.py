"""Issue 2 end to end: real BPF objects in the real kernel, real TLS clients against tests/tlsserver.py.

Every test compares what the capture rebuilt for a client process with what the server really received
and sent on that connection, byte for byte. Clients run as subprocesses: the capture never traces pytest
itself (self_tgid), which is also what keeps the in-process server out of the capture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from llmspyd.bpf.abi import CHUNK_MAX, Verdict
from llmspyd.chunks import ConnClosed, Direction, ProcessExec, ProcessExit, Stack
from tests.tlsserver import assert_conn_exact, pattern

pytestmark = pytest.mark.e2e

MIB = 1 << 20
CLIENT_TIMEOUT = 60


def run(argv: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, timeout=CLIENT_TIMEOUT, check=True, **kw)


def python_client(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def wait_conns(log, pid: int, n: int, timeout: float = 15.0) -> list[int]:
    assert log.wait_for(lambda: len(log.conns(pid)) >= n, timeout), f"pid {pid}: {len(log.conns(pid))} conns < {n}"
    return log.conns(pid)


def test_curl_request_and_response_exact(capture, tls_server, tls_env, tmp_path):
    _, log = capture
    body = tmp_path / "body"
    body.write_bytes(pattern(5000, seed=3))
    p = subprocess.Popen(
        ["curl", "-sS", "--http1.1", "-o", "/dev/null", "--data-binary", f"@{body}", f"{tls_server.url}/echo",
         "-o", "/dev/null", f"{tls_server.url}/bytes/70000"],
        env=tls_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _, err = p.communicate(timeout=CLIENT_TIMEOUT)
    assert p.returncode == 0, err
    (conn,) = wait_conns(log, p.pid, 1)  # two requests, one keep-alive connection
    rec, peer = assert_conn_exact(log, tls_server, p.pid, conn)
    assert rec.requests == 2
    assert b"POST /echo HTTP/1.1" in rec.received and pattern(5000, seed=3) in rec.received
    assert peer.addr == "127.0.0.1" and peer.port == tls_server.port
    assert all(c.comm == "curl" for c in log.chunks(p.pid))
    # curl frees its SSL object before exiting: the connection's streams end
    assert log.wait_for(lambda: any(e.conn == conn for e in log.events(ConnClosed, p.pid)))
    assert not log.chunks(os.getpid()), "the capture must never trace its own process"


def test_classic_perf_event_uprobes_capture_too(start_capture, tls_server, tls_env):
    """Kernels before 6.6 have no uprobe_multi links: the one-perf-event-per-probe path captures the same."""
    session, log = start_capture(uprobe_multi=False, poll_ms=50)
    assert not session.objects.uprobe_multi
    links = [lk for att in session.probes.attached().values() for lk in att.links]
    assert links and all("uprobe.multi" not in lk.desc for lk in links)
    p = subprocess.Popen(["curl", "-sS", "--http1.1", "-o", "/dev/null", f"{tls_server.url}/bytes/33333"],
                         env=tls_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    _, err = p.communicate(timeout=CLIENT_TIMEOUT)
    assert p.returncode == 0, err
    (conn,) = wait_conns(log, p.pid, 1)
    rec, _ = assert_conn_exact(log, tls_server, p.pid, conn)
    assert b"GET /bytes/33333 HTTP/1.1" in rec.received and len(rec.sent) > 33333


PY_FD_PEER = """
import http.client, json, ssl, sys
ctx = ssl.create_default_context()
c = http.client.HTTPSConnection("127.0.0.1", {port}, context=ctx)
c.request("POST", "/echo", body=b"hello from python " * 50)
r = c.getresponse(); data = r.read()
assert data == b"hello from python " * 50
c.request("GET", "/bytes/12345"); r = c.getresponse(); n = len(r.read())
print(json.dumps({{"fd": c.sock.fileno(), "local_port": c.sock.getsockname()[1], "n": n}}))
c.close()
"""


def test_python_http_client_exact_with_fd_and_peer(capture, tls_server, tls_env):
    _, log = capture
    p = subprocess.Popen(python_client(PY_FD_PEER.format(port=tls_server.port)), env=tls_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=CLIENT_TIMEOUT)
    assert p.returncode == 0, err
    info = json.loads(out)
    assert info["n"] == 12345
    (conn,) = wait_conns(log, p.pid, 1)
    _, peer = assert_conn_exact(log, tls_server, p.pid, conn)
    assert peer.local_port == info["local_port"] and peer.port == tls_server.port and peer.addr == "127.0.0.1"
    chunks = log.chunks(p.pid, conn)
    assert {c.fd for c in chunks} == {info["fd"]}
    assert all(c.tid > 0 and c.ts_ns > 0 and c.comm.startswith("python") for c in chunks)
    assert {c.stack for c in chunks} == {Stack.OPENSSL}


PY_URLLIB = """
import urllib.request
print(urllib.request.urlopen("{url}/bytes/3000").read() == __import__("tests.tlsserver", fromlist=["x"]).pattern(3000))
"""


def test_python_urllib_exact(capture, tls_server, tls_env):
    _, log = capture
    p = subprocess.Popen(python_client(PY_URLLIB.format(url=tls_server.url)), env=tls_env, cwd=_repo_root(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=CLIENT_TIMEOUT)
    assert p.returncode == 0 and out.strip() == b"True", err
    (conn,) = wait_conns(log, p.pid, 1)
    assert_conn_exact(log, tls_server, p.pid, conn)


PY_TWO_CONNS = """
import http.client, ssl, threading
ctx = ssl.create_default_context()
def talk(seed):
    c = http.client.HTTPSConnection("127.0.0.1", {port}, context=ctx)
    for i in range(20):
        body = bytes([65 + seed]) * (1000 + 997 * i)
        c.request("POST", "/echo", body=body)
        assert c.getresponse().read() == body
    c.close()
ts = [threading.Thread(target=talk, args=(s,)) for s in (0, 1)]
[t.start() for t in ts]; [t.join() for t in ts]
"""


def test_two_concurrent_connections_not_mixed(capture, tls_server, tls_env):
    _, log = capture
    p = subprocess.Popen(python_client(PY_TWO_CONNS.format(port=tls_server.port)), env=tls_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=CLIENT_TIMEOUT)
    assert p.returncode == 0, err
    conns = wait_conns(log, p.pid, 2)
    assert len(conns) == 2
    bodies = set()
    for conn in conns:
        rec, _ = assert_conn_exact(log, tls_server, p.pid, conn)
        sent, _ = log.stream(p.pid, conn, Direction.WRITE)
        # each connection carries only its own thread's letter in its bodies
        bodies.add(bytes(set(sent.split(b"\r\n\r\n", 1)[1][:1000])))
        assert rec.requests == 20
    assert bodies == {b"A", b"B"}


PY_4MIB = """
import http.client, ssl, hashlib
ctx = ssl.create_default_context()
c = http.client.HTTPSConnection("127.0.0.1", {port}, context=ctx)
body = bytes(range(256)) * ({n} // 256)
c.request("POST", "/echo", body=body)          # the body goes out in ONE SSL_write_ex of 4 MiB
assert c.getresponse().read() == body          # the server answers with ONE sendall of 4 MiB
"""


def test_4mib_exact_both_ways(capture, tls_server, tls_env):
    _, log = capture
    n = 4 * MIB
    p = subprocess.Popen(python_client(PY_4MIB.format(port=tls_server.port, n=n)), env=tls_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=CLIENT_TIMEOUT)
    assert p.returncode == 0, err
    (conn,) = wait_conns(log, p.pid, 1)
    assert_conn_exact(log, tls_server, p.pid, conn, timeout=30)
    # the 4 MiB write was one call, split into sequenced chunks of at most CHUNK_MAX
    big = [c for c in log.chunks(p.pid, conn, Direction.WRITE) if c.call_len == n]
    assert len(big) == n // CHUNK_MAX
    assert big[0].first and big[-1].last and not any(c.first for c in big[1:]) and not any(c.last for c in big[:-1])
    assert all(len(c.data) == CHUNK_MAX for c in big)
    assert [c.offset - big[0].offset for c in big] == [i * CHUNK_MAX for i in range(len(big))]


NODE_FETCH = """
const body = "node says hi ".repeat(300);
(async () => {{
  await new Promise(r => setTimeout(r, {delay_ms}));
  const r1 = await fetch("{url}/echo", {{ method: "POST", body }});
  if ((await r1.text()) !== body) throw new Error("echo mismatch");
  const r2 = await fetch("{url}/bytes/20000");
  const b = Buffer.from(await r2.arrayBuffer());
  if (b.length !== 20000) throw new Error("length " + b.length);
  console.log("ok");
}})().catch(e => {{ console.error(e); process.exit(1); }});
"""


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (make deps)")
    return node


def test_node_fetch_exact(capture, tls_server, tls_env):
    session, log = capture
    node = _node()
    # node links OpenSSL statically: the probes go on the executable itself
    assert "SSL_write" in session.scanner.scan_file(node)
    p = subprocess.Popen([node, "-e", NODE_FETCH.format(url=tls_server.url, delay_ms=0)], env=tls_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=CLIENT_TIMEOUT)
    assert p.returncode == 0 and out.strip() == b"ok", err
    conns = wait_conns(log, p.pid, 1)
    # undici may open a second connection for the second request: check every one, and both bodies
    reqs = 0
    for conn in conns:
        # node encrypts into memory and libuv writes the socket right after SSL_write returns: the socket is
        # learnt from that write, so every chunk after the connection's first write carries it
        chunks = sorted(log.chunks(p.pid, conn), key=lambda c: c.ts_ns)
        assert all(c.peer is not None for c in chunks[1:]), [(c.direction, c.offset, c.peer) for c in chunks]
        rec, peer = assert_conn_exact(log, tls_server, p.pid, conn)
        assert peer.port == tls_server.port and peer.addr == "127.0.0.1" and chunks[-1].fd >= 0
        reqs += rec.requests
    assert reqs == 2


def test_process_started_after_capture_is_captured(start_capture, tls_server, tls_env):
    """A capture that attached to nothing at start picks up node from its exec event, before its first write."""
    node = _node()
    session, log = start_capture(scan=False, poll_ms=50)
    try:
        p = subprocess.Popen([node, "-e", NODE_FETCH.format(url=tls_server.url, delay_ms=1000)], env=tls_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=CLIENT_TIMEOUT)
        assert p.returncode == 0, err
        assert log.wait_for(lambda: len(log.chunks(p.pid)) >= 4)
        writes = b"".join(log.stream(p.pid, c, Direction.WRITE)[0] for c in log.conns(p.pid))
        assert b"POST /echo HTTP/1.1" in writes and b"node says hi " * 300 in writes
        assert any(key[1] == _ino(node) for key in session.probes.attached())
    finally:
        session.close()


PY_UPLOAD = """
import http.client, ssl
c = http.client.HTTPSConnection("127.0.0.1", {port}, context=ssl.create_default_context())
c.request("POST", "/echo", body=bytes(range(256)) * ({n} // 256))
c.getresponse().read()
c.request("GET", "/bytes/10")  # a small write after the burst: the lost tail of the upload becomes a gap
c.getresponse().read()
"""


def test_tiny_ring_counts_loss_and_shows_gap_at_right_offset(start_capture, tls_server, tls_env):
    # 64 KiB ring: one 32 KiB record fits, a burst of 32 does not
    session, log = start_capture(ring_bytes=64 * 1024, wakeup_bytes=0, scan=True, poll_ms=50)
    try:
        before = session.stats()
        n = 1 * MIB
        p = subprocess.Popen(python_client(PY_UPLOAD.format(port=tls_server.port, n=n)), env=tls_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = p.communicate(timeout=CLIENT_TIMEOUT)
        assert p.returncode == 0, err
        after = session.stats()
        lost = after["lost_bytes"] - before["lost_bytes"]
        assert after["lost_records"] > before["lost_records"] and lost > 0
        assert log.wait_for(lambda: log.conns(p.pid) != [], 5)
        (conn,) = log.conns(p.pid)
        rec = server_record_by_content(tls_server, log, p.pid, conn)
        sent, gaps = log.stream(p.pid, conn, Direction.WRITE)
        assert gaps, "lost records must show as gaps"
        expected = bytes(rec.received)
        head = expected.index(b"\r\n\r\n") + 4  # the headers went in their own SSL_write, the body in one more
        assert expected[head + n :].startswith(b"GET /bytes/10 ")
        # every captured chunk sits at its true offset ...
        for c in log.chunks(p.pid, conn, Direction.WRITE):
            assert c.data == expected[c.offset : c.offset + len(c.data)]
        # ... and each gap starts where a lost record of the body call would have started
        for at, length in gaps:
            assert at == 0 or (at - head) % CHUNK_MAX == 0, (at, length, head)
            assert length > 0
        assert len(sent) + sum(g[1] for g in gaps) <= len(expected)
        assert lost >= sum(g[1] for g in gaps)
    finally:
        session.close()


def server_record_by_content(server, log, pid: int, conn: int):
    peer = next((c.peer for c in log.chunks(pid, conn) if c.peer is not None), None)
    assert peer is not None
    return server.connection(peer.local_port)


PY_WAIT = """
import http.client, ssl, sys
c = http.client.HTTPSConnection("127.0.0.1", {port}, context=ssl.create_default_context())
for line in sys.stdin:
    c.request("POST", "/echo", body=line.strip().encode())
    print(c.getresponse().read().decode(), flush=True)
"""


def test_mute_connection_and_skip_process(capture, tls_server, tls_env):
    session, log = capture
    p = subprocess.Popen(python_client(PY_WAIT.format(port=tls_server.port)), env=tls_env, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def say(word: str) -> None:
            p.stdin.write(word + "\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == word

        say("first-request")
        (conn,) = wait_conns(log, p.pid, 1)
        assert log.wait_for(lambda: b"first-request" in log.stream(p.pid, conn, Direction.READ)[0])

        before = session.stats()
        session.probes.mute(p.pid, conn)
        say("hushed-request")
        assert session.stats()["muted_calls"] >= before["muted_calls"] + 2
        session.probes.unmute(p.pid, conn)
        say("unmuted-request")
        assert log.wait_for(lambda: b"unmuted-request" in log.stream(p.pid, conn, Direction.READ)[0])

        before = session.stats()
        session.probes.set_pid_verdict(p.pid, Verdict.SKIP)
        say("skipped-request")
        assert session.stats()["filtered_calls"] >= before["filtered_calls"] + 2
        session.probes.set_pid_verdict(p.pid, None)
        say("last-request")
        assert log.wait_for(lambda: b"last-request" in log.stream(p.pid, conn, Direction.READ)[0])
        everything = b"".join(c.data for c in log.chunks(p.pid))
        assert b"hushed-request" not in everything and b"skipped-request" not in everything
    finally:
        p.stdin.close()
        p.wait(timeout=CLIENT_TIMEOUT)


def _ino(path: str) -> int:
    import os

    return os.stat(path).st_ino


def _repo_root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2])


def _start_sniff(*args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "llmspyd.cli", "sniff", *args], cwd=_repo_root(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    notes = []
    for line in p.stderr:
        notes.append(line)
        if "capturing" in line:
            return p
    p.wait(timeout=10)
    raise AssertionError("sniff did not start: " + "".join(notes))


def _stop_sniff(p: subprocess.Popen) -> tuple[list[str], str]:
    import signal

    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return out.splitlines(), err


def test_sniff_json_pid_filter(tls_server, tls_env):
    import base64

    client = subprocess.Popen(python_client(PY_WAIT.format(port=tls_server.port)), env=tls_env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    other = None
    try:
        sniff = _start_sniff("--json", "--pid", str(client.pid))
        client.stdin.write("sniffed-request\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "sniffed-request"
        # another process's traffic must not show up
        other = subprocess.run(["curl", "-sS", "--http1.1", "-o", "/dev/null", f"{tls_server.url}/bytes/10"],
                               env=tls_env, timeout=CLIENT_TIMEOUT)
        lines, err = _stop_sniff(sniff)
    finally:
        client.stdin.close()
        client.wait(timeout=CLIENT_TIMEOUT)
    objs = [json.loads(line) for line in lines]
    assert objs, err
    assert {o["pid"] for o in objs} == {client.pid}
    for o in objs:
        assert set(o) >= {"pid", "comm", "conn", "direction", "offset", "len", "data", "ts", "tid", "fd", "peer", "flags"}
        assert len(base64.b64decode(o["data"])) == o["len"]
    writes = b"".join(base64.b64decode(o["data"]) for o in objs if o["direction"] == "write")
    reads = b"".join(base64.b64decode(o["data"]) for o in objs if o["direction"] == "read")
    assert writes.startswith(b"POST /echo HTTP/1.1\r\n") and writes.endswith(b"\r\n\r\nsniffed-request")
    assert reads.startswith(b"HTTP/1.1 200 OK\r\n") and reads.endswith(b"sniffed-request")
    assert objs[0]["peer"] == f"127.0.0.1:{tls_server.port}" and objs[0]["offset"] == 0
    assert "lost_records=0" in err


def test_sniff_human_exe_filter(tls_server, tls_env):
    sniff = _start_sniff("--exe", "curl")
    subprocess.run(["curl", "-sS", "--http1.1", "-o", "/dev/null", "--data-binary", "hi-from-curl",
                    f"{tls_server.url}/echo"], env=tls_env, timeout=CLIENT_TIMEOUT, check=True)
    subprocess.run(python_client(PY_URLLIB.format(url=tls_server.url)), env=tls_env, cwd=_repo_root(),
                   timeout=CLIENT_TIMEOUT, check=True, capture_output=True)
    lines, _ = _stop_sniff(sniff)
    text = "\n".join(lines)
    assert "POST /echo HTTP/1.1" in text and "hi-from-curl" in text
    heads = [line for line in lines if " >> conn " in line or " << conn " in line]
    assert heads and all(" curl[" in h for h in heads)
    assert "GET /bytes/3000" not in text  # the python client is filtered out


def test_max_call_bytes_cut_is_flagged_counted_and_offsets_continue(start_capture, tls_server, tls_env):
    limit = 1000
    session, log = start_capture(max_call_bytes=limit, poll_ms=50)
    try:
        before = session.stats()
        n = 256 * 391  # PY_UPLOAD sends a multiple of 256 bytes
        p = subprocess.Popen(python_client(PY_UPLOAD.format(port=tls_server.port, n=n)), env=tls_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = p.communicate(timeout=CLIENT_TIMEOUT)
        assert p.returncode == 0, err
        (conn,) = wait_conns(log, p.pid, 1)
        assert log.wait_for(lambda: b"GET /bytes/10 " in log.stream(p.pid, conn, Direction.WRITE)[0])
        body = [c for c in log.chunks(p.pid, conn, Direction.WRITE) if c.call_len == n]
        assert len(body) == 1, [(c.call_len, c.offset, len(c.data), c.truncated) for c in log.chunks(p.pid, conn)]
        assert body[0].truncated and len(body[0].data) == limit
        after = session.stats()
        assert after["truncated_calls"] > before["truncated_calls"]
        assert after["truncated_bytes"] - before["truncated_bytes"] >= n - limit
        # the next call starts after the whole body: the cut shows as a gap of exactly the bytes not captured
        _, gaps = log.stream(p.pid, conn, Direction.WRITE)
        assert gaps == [(body[0].offset + limit, n - limit)]
    finally:
        session.close()


def test_exec_and_exit_events(capture, tls_server, tls_env):
    _, log = capture
    p = subprocess.run([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=CLIENT_TIMEOUT)
    assert p.returncode == 3
    # the child's pid is not returned by run(): find it by its parent and executable
    assert log.wait_for(lambda: any(e.ppid == os.getpid() and e.filename == sys.executable
                                    for e in log.events(ProcessExec)))  # fmt: skip
    execs = [e for e in log.events(ProcessExec) if e.ppid == os.getpid() and e.filename == sys.executable]
    child = execs[-1]
    assert child.comm.startswith("python") and child.uid == os.getuid() and child.cgroup_id > 0
    assert log.wait_for(lambda: log.events(ProcessExit, child.pid) != [])
    (ex,) = log.events(ProcessExit, child.pid)
    assert ex.exit_code == 3 << 8  # wait(2) status
    assert ex.ts_ns > child.ts_ns


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


def test_cgroup_verdict_skips_a_whole_cgroup(capture, tls_server, tls_env):
    from pathlib import Path

    from llmspyd.bpf.probes import cgroup2_mount, cgroup_id

    session, log = capture
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    rel = _cgroup_of(os.getpid())
    leaf = Path(mount) / rel.lstrip("/") / f"llmspy-test-{os.getpid()}"
    try:
        leaf.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup here: {e}")
    assert cgroup_id(f"{rel.rstrip('/')}/{leaf.name}") == leaf.stat().st_ino
    client = None
    try:
        client = subprocess.Popen(python_client(PY_WAIT.format(port=tls_server.port)), env=tls_env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        (leaf / "cgroup.procs").write_text(str(client.pid))
        before = session.stats()
        session.probes.set_cgroup_verdict(leaf.stat().st_ino, Verdict.SKIP)
        client.stdin.write("in-skipped-cgroup\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "in-skipped-cgroup"
        assert session.stats()["filtered_calls"] >= before["filtered_calls"] + 2
        session.probes.set_cgroup_verdict(leaf.stat().st_ino, None)
        client.stdin.write("cgroup-unskipped\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "cgroup-unskipped"
        assert log.wait_for(lambda: any(b"cgroup-unskipped" in c.data for c in log.chunks(client.pid)))
        assert not any(b"in-skipped-cgroup" in c.data for c in log.chunks(client.pid))
        assert {c.cgroup_id for c in log.chunks(client.pid)} == {leaf.stat().st_ino}
    finally:
        if client is not None:
            client.stdin.close()
            client.wait(timeout=CLIENT_TIMEOUT)
        leaf.rmdir()


def test_attach_cookie_names_the_stack(start_capture, tls_server, tls_env):
    """The OpenSSL programs serve OpenSSL-compatible stacks too; the target's stack reaches every record."""
    from llmspyd.bpf.probes import openssl_target

    session, log = start_capture(scan=False, poll_ms=50)
    try:
        libssl = _python_libssl()
        target = openssl_target(libssl)
        target.stack = Stack.BORINGSSL  # as if discovery had found BoringSSL's SSL_* here
        assert session.probes.attach(target)
        p = subprocess.run(python_client(PY_URLLIB.format(url=tls_server.url)), env=tls_env, cwd=_repo_root(),
                           timeout=CLIENT_TIMEOUT, check=True, capture_output=True)
        assert p.stdout.strip() == b"True"
        assert log.wait_for(lambda: len(log.events(ConnClosed)) > 0 and log.chunks() != [])
        assert {c.stack for c in log.chunks()} == {Stack.BORINGSSL}
        assert {e.stack for e in log.events(ConnClosed)} == {Stack.BORINGSSL}
    finally:
        session.close()


def _python_libssl() -> str:
    import ssl  # noqa: F401

    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "/libssl.so" in parts[5]:
                return os.path.realpath(parts[5])
    pytest.skip("no libssl mapped by Python")
