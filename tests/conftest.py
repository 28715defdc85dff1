"""Shared fixtures: a TLS server on 127.0.0.1 with a throwaway CA, and a live capture collecting events.

`capture` (session) loads the real BPF objects, attaches to every OpenSSL found and records everything it
reads; tests look at the events of the client processes they started (filter by pid). The capture never
sees this pytest process (self_tgid), so the in-process TLS server is not captured, but clients must run
as subprocesses.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tlsserver import Certs, TlsServer, client_env, make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def tls_server(certs: Certs) -> Iterator[TlsServer]:
    srv = TlsServer(certs)
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def tls_env(certs: Certs) -> dict[str, str]:
    """Environment for client subprocesses: trust the test CA."""
    return client_env(certs)


class EventLog:
    """Thread-safe store of captured events, with helpers to rebuild byte streams."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list = []

    def __call__(self, batch: list) -> None:
        with self._lock:
            self._events.extend(batch)

    def events(self, kind: type | None = None, pid: int | None = None) -> list:
        with self._lock:
            evs = list(self._events)
        return [e for e in evs if (kind is None or isinstance(e, kind)) and (pid is None or e.pid == pid)]

    def chunks(self, pid: int | None = None, conn: int | None = None, direction: int | None = None) -> list:
        from llmspyd.chunks import TlsChunk

        return [
            c
            for c in self.events(TlsChunk, pid)
            if (conn is None or c.conn == conn) and (direction is None or c.direction == direction)
        ]

    def conns(self, pid: int) -> list[int]:
        """Connection keys of pid, in order of first appearance."""
        seen: dict[int, None] = {}
        for c in self.chunks(pid):
            seen.setdefault(c.conn, None)
        return list(seen)

    def stream(self, pid: int, conn: int, direction: int) -> tuple[bytes, list[tuple[int, int]]]:
        """Bytes of one direction of one connection in offset order, and the gaps (offset, length) in it."""
        out = bytearray()
        gaps: list[tuple[int, int]] = []
        pos = 0  # offset the next chunk should start at
        for c in sorted(self.chunks(pid, conn, direction), key=lambda c: c.offset):
            if c.offset > pos:
                gaps.append((pos, c.offset - pos))
            out += c.data
            pos = c.offset + len(c.data)
        return bytes(out), gaps

    def wait_for(self, pred: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return pred()


def _need_bpf() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    from llmspyd.bpf.loader import objects_dir

    if not (objects_dir() / "tls_openssl.bpf.o").exists():
        pytest.fail("BPF objects are not built: run `make bpf`")


@pytest.fixture(scope="session")
def start_capture() -> Iterator[Callable[..., tuple]]:
    """Factory: start_capture(**CaptureSession kwargs) -> (session, EventLog); closed at session end."""
    _need_bpf()
    from llmspyd.capture.session import CaptureSession

    sessions = []

    def start(**kwargs) -> tuple:
        log = EventLog()
        s = CaptureSession(log, **kwargs).start()
        sessions.append(s)
        return s, log

    yield start
    for s in sessions:
        s.close()


@pytest.fixture(scope="session")
def capture(start_capture) -> tuple:
    """One capture for the whole session: (CaptureSession, EventLog)."""
    return start_capture(poll_ms=50)
