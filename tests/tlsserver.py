"""A TLS test server on 127.0.0.1 that records, per connection, the exact plaintext it received and sent.

HTTP/1.1 with keep-alive; ALPN offers only http/1.1 (so curl does not switch to HTTP/2). Routes:
  GET  /bytes/N   -> N bytes of `pattern(N)` written with ONE sendall (one SSL_write)
  POST /echo      -> the request body back
  anything else   -> 200 "ok"
Requests need Content-Length (or no body). Each connection's record lets a test compare what a capture saw
with what really crossed the wire, byte for byte, keyed by the client's port.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

# what the server reads per recv: large, so a big upload costs few calls
RECV_BYTES = 1 << 20
# largest request head accepted (a test client never sends more)
MAX_HEAD = 64 * 1024


def pattern(n: int, seed: int = 0) -> bytes:
    """n deterministic bytes that are not periodic at any chunk size a capture might use."""
    block = bytes((i * 131 + seed * 7 + (i >> 8) * 17) & 0xFF for i in range(65521))  # prime length
    return (block * (n // len(block) + 1))[:n]


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path) -> Certs:
    """A throwaway CA and a server cert for 127.0.0.1 / localhost, via the openssl CLI."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=llmspy test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "server.pem")
    return Certs(ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key")


@dataclass
class ConnRecord:
    """Plaintext of one accepted connection, as the server saw it."""

    client_port: int
    received: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    requests: int = 0
    closed: threading.Event = field(default_factory=threading.Event)


class TlsServer:
    def __init__(self, certs: Certs) -> None:
        self.certs = certs
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certs.cert, certs.key)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[ConnRecord] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="tlsserver", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def connections(self) -> list[ConnRecord]:
        with self._lock:
            return list(self._conns)

    def connection(self, client_port: int, timeout: float = 10.0) -> ConnRecord:
        """The record of the connection from `client_port`, once the client closed it."""
        for rec in reversed(self.connections()):
            if rec.client_port == client_port:
                rec.closed.wait(timeout)
                return rec
        raise KeyError(f"no connection from port {client_port}; have {[c.client_port for c in self.connections()]}")

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, addr = self._sock.accept()
            except OSError:
                return
            rec = ConnRecord(client_port=addr[1])
            with self._lock:
                self._conns.append(rec)
            threading.Thread(target=self._serve, args=(raw, rec), daemon=True).start()

    def _serve(self, raw: socket.socket, rec: ConnRecord) -> None:
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                buf = bytearray()
                while True:
                    req = self._read_request(tls, buf, rec)
                    if req is None:
                        return
                    method, path, body = req
                    resp_body = self._route(method, path, body)
                    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(resp_body)}\r\nContent-Type: application/octet-stream\r\n\r\n"
                    out = head.encode() + resp_body
                    tls.sendall(out)  # one SSL_write of the whole response
                    rec.sent += out
                    rec.requests += 1
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            rec.closed.set()

    @staticmethod
    def _recv(tls: ssl.SSLSocket, buf: bytearray, rec: ConnRecord) -> bool:
        data = tls.recv(RECV_BYTES)
        if not data:
            return False
        buf += data
        rec.received += data
        return True

    def _read_request(self, tls: ssl.SSLSocket, buf: bytearray, rec: ConnRecord) -> tuple[str, str, bytes] | None:
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD or not self._recv(tls, buf, rec):
                return None
        end = buf.index(b"\r\n\r\n")
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        method, path, _ = head[0].split(" ", 2)
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        while len(buf) < length:
            if not self._recv(tls, buf, rec):
                return None
        body = bytes(buf[:length])
        del buf[:length]
        return method, path, body

    @staticmethod
    def _route(method: str, path: str, body: bytes) -> bytes:
        if path.startswith("/bytes/"):
            return pattern(int(path.rsplit("/", 1)[1]))
        if path == "/echo":
            return body
        return b"ok"

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def client_env(certs: Certs) -> dict[str, str]:
    """Environment for client subprocesses so curl, Python and node trust the test CA."""
    env = dict(os.environ)
    env["SSL_CERT_FILE"] = str(certs.ca)
    env["CURL_CA_BUNDLE"] = str(certs.ca)
    env["NODE_EXTRA_CA_CERTS"] = str(certs.ca)
    return env


def assert_conn_exact(log, server: TlsServer, pid: int, conn: int, timeout: float = 15.0) -> tuple:
    """The captured streams of (pid, conn) equal what `server` saw on that connection, with no gap.

    `log` is the tests' EventLog. Waits for a chunk carrying the peer (it names the server-side record) and for
    the whole streams; returns (server record, peer)."""
    from llmspyd.chunks import Direction

    assert log.wait_for(lambda: log.chunks(pid, conn), timeout), f"nothing captured for pid {pid} conn {conn:#x}"
    assert log.wait_for(lambda: any(c.peer is not None for c in log.chunks(pid, conn)), timeout), (
        "no chunk carries the peer address"
    )
    peer = next(c.peer for c in log.chunks(pid, conn) if c.peer is not None)
    assert peer.addr == "127.0.0.1" and peer.port == server.port
    rec = server.connection(peer.local_port)
    assert log.wait_for(
        lambda: len(log.stream(pid, conn, Direction.READ)[0]) >= len(rec.sent)
        and len(log.stream(pid, conn, Direction.WRITE)[0]) >= len(rec.received),
        timeout,
    ), "capture incomplete"
    sent, sgaps = log.stream(pid, conn, Direction.WRITE)
    got, rgaps = log.stream(pid, conn, Direction.READ)
    assert sgaps == [] and rgaps == []
    assert sent == bytes(rec.received)
    assert got == bytes(rec.sent)
    return rec, peer
