"""What the capture layer hands to the pipeline: plain data, no I/O.

These types are the boundary between `capture/` (which decodes ring-buffer
records, see bpf/llmspy.h) and the pure layers (`streams`, `protocols/`,
`llm/`). Timestamps are CLOCK_MONOTONIC nanoseconds as the kernel saw them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class Direction(enum.IntEnum):
    WRITE = 0  # plaintext the process sent
    READ = 1  # plaintext the process received


class Stack(enum.IntEnum):
    UNKNOWN = 0
    OPENSSL = 1
    GNUTLS = 2
    GOTLS = 3
    BORINGSSL = 4
    RUSTLS = 5


class ConnKey(NamedTuple):
    """One TLS connection: the process and the address of its TLS object."""

    pid: int
    conn: int


@dataclass(slots=True)
class Peer:
    family: int  # socket.AF_INET or AF_INET6
    addr: str
    port: int
    local_port: int = 0


@dataclass(slots=True)
class TlsChunk:
    """Plaintext of one TLS call, or one piece of a long call.

    `offset` counts the bytes in this direction on this connection before
    `data[0]`; a jump in it means bytes were lost (counted in the kernel).
    """

    ts_ns: int
    pid: int
    tid: int
    comm: str
    conn: int
    direction: Direction
    offset: int
    data: bytes
    call_len: int
    stack: Stack = Stack.UNKNOWN
    first: bool = True  # first piece of its call
    last: bool = True  # last piece of its call
    truncated: bool = False  # the call was cut at max_call_bytes after this piece
    fault: bool = False  # the user buffer could not be read
    fd: int = -1
    peer: Peer | None = None
    cgroup_id: int = 0

    @property
    def key(self) -> ConnKey:
        return ConnKey(self.pid, self.conn)


@dataclass(slots=True)
class ConnClosed:
    """The TLS object was freed: both byte streams of the connection end."""

    ts_ns: int
    pid: int
    conn: int
    stack: Stack = Stack.UNKNOWN

    @property
    def key(self) -> ConnKey:
        return ConnKey(self.pid, self.conn)


@dataclass(slots=True)
class ProcessExec:
    ts_ns: int
    pid: int
    ppid: int
    uid: int
    comm: str
    filename: str
    cgroup_id: int = 0


@dataclass(slots=True)
class ProcessExit:
    ts_ns: int
    pid: int
    exit_code: int = 0


CaptureEvent = TlsChunk | ConnClosed | ProcessExec | ProcessExit
