"""decode() on records built with the ctypes mirror (so that the reader's struct formats are checked against it)."""

from __future__ import annotations

import collections
import ctypes
import socket

import pytest

from llmspyd.bpf import abi
from llmspyd.capture.reader import decode
from llmspyd.chunks import ConnClosed, Direction, Peer, ProcessExec, ProcessExit, Stack, TlsChunk


def hdr(kind: int, size: int, *, version: int = abi.ABI_VERSION) -> abi.Hdr:
    return abi.Hdr(version=version, kind=kind, size=size, ts_ns=123456789, pid=4321, tid=4322)


def tls_record(
    data: bytes,
    *,
    family: int = 0,
    addr: bytes = b"",
    flags: int = abi.F_FIRST | abi.F_LAST,
    direction: int = 1,
    data_len: int | None = None,
    size: int | None = None,
) -> bytes:
    n = len(data) if data_len is None else data_len
    total = ctypes.sizeof(abi.TlsData) + len(data)
    rec = abi.TlsData(
        hdr=hdr(abi.Kind.TLS_DATA, total if size is None else size),
        conn=0xFFFF8880DEADBEEF,
        offset=1 << 33,
        cgroup_id=77,
        call_len=100000,
        data_len=n,
        fd=5,
        flags=flags,
        direction=direction,
        stack=Stack.GNUTLS,
        family=family,
        peer_port=8443,
        local_port=50123,
        comm=b"curl",
    )
    rec.peer_addr[: len(addr)] = list(addr)
    return bytes(rec) + data


def test_tls_data_all_fields() -> None:
    errs: collections.Counter[str] = collections.Counter()
    ev = decode(memoryview(tls_record(b"GET / HTTP/1.1\r\n", family=socket.AF_INET, addr=bytes([10, 1, 2, 3]))), errs)
    assert ev == TlsChunk(
        ts_ns=123456789,
        pid=4321,
        tid=4322,
        comm="curl",
        conn=0xFFFF8880DEADBEEF,
        direction=Direction.READ,
        offset=1 << 33,
        data=b"GET / HTTP/1.1\r\n",
        call_len=100000,
        stack=Stack.GNUTLS,
        first=True,
        last=True,
        truncated=False,
        fault=False,
        fd=5,
        peer=Peer(socket.AF_INET, "10.1.2.3", 8443, 50123),
        cgroup_id=77,
    )
    assert not errs
    assert type(ev.data) is bytes  # a copy: the ring memory is reused after the callback


def test_tls_data_ipv6_flags_and_no_peer() -> None:
    ev = decode(tls_record(b"x", family=socket.AF_INET6, addr=socket.inet_pton(socket.AF_INET6, "::1")))
    assert isinstance(ev, TlsChunk) and ev.peer == Peer(socket.AF_INET6, "::1", 8443, 50123)
    ev = decode(tls_record(b"", flags=abi.F_TRUNCATED | abi.F_FAULT, direction=0))
    assert isinstance(ev, TlsChunk)
    assert ev.peer is None and ev.data == b"" and ev.direction is Direction.WRITE
    assert (ev.first, ev.last, ev.truncated, ev.fault) == (False, False, True, True)


def test_record_longer_than_hdr_size_is_fine_but_data_stays_inside() -> None:
    # the ring rounds records up to 8 bytes: trailing bytes beyond data_len are ignored
    ev = decode(tls_record(b"abc" + b"\0" * 5, data_len=3))
    assert isinstance(ev, TlsChunk) and ev.data == b"abc"


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"", "short_record"),
        (bytes(hdr(abi.Kind.TLS_DATA, 24)), "short_record"),  # header only: fixed part missing
        (tls_record(b"hello")[:106], "bad_size"),  # cut inside data[]: hdr.size says more than we got
        (tls_record(b"hello", data_len=6), "short_record"),  # data_len past the record
        (tls_record(b"hello", size=50), "bad_size"),  # hdr.size smaller than the fixed part
        (bytes(hdr(99, 24)) + b"\0" * 64, "unknown_kind"),
        (bytes(hdr(abi.Kind.EXIT, 32, version=2)) + b"\0" * 8, "bad_version"),
        (tls_record(b"hi", direction=7), "bad_field"),
    ],
)
def test_bad_records_are_none_and_counted(record: bytes, reason: str) -> None:
    errs: collections.Counter[str] = collections.Counter()
    assert decode(memoryview(record), errs) is None
    assert errs == {reason: 1}


def test_unknown_stack_is_a_bad_field() -> None:
    rec = abi.TlsData.from_buffer_copy(tls_record(b""))
    rec.stack = 200
    errs: collections.Counter[str] = collections.Counter()
    assert decode(bytes(rec), errs) is None and errs["bad_field"] == 1


def test_conn_close_exec_exit() -> None:
    close = abi.ConnClose(hdr=hdr(abi.Kind.CONN_CLOSE, ctypes.sizeof(abi.ConnClose)), conn=0xABC, stack=Stack.OPENSSL)
    assert decode(bytes(close)) == ConnClosed(ts_ns=123456789, pid=4321, conn=0xABC, stack=Stack.OPENSSL)
    ex = abi.Exec(
        hdr=hdr(abi.Kind.EXEC, ctypes.sizeof(abi.Exec)),
        ppid=1,
        uid=1000,
        cgroup_id=9,
        comm=b"node",
        filename=b"/usr/bin/node\xff",  # not UTF-8: replaced, not fatal
    )
    assert decode(bytes(ex)) == ProcessExec(
        ts_ns=123456789, pid=4321, ppid=1, uid=1000, comm="node", filename="/usr/bin/node\ufffd", cgroup_id=9
    )
    xt = abi.Exit(hdr=hdr(abi.Kind.EXIT, ctypes.sizeof(abi.Exit)), exit_code=-9)
    assert decode(bytes(xt)) == ProcessExit(ts_ns=123456789, pid=4321, exit_code=-9)
    assert decode(bytes(xt)[:-4]) is None  # the padded fixed struct is the minimum


def test_comm_full_length_without_nul() -> None:
    rec = abi.TlsData.from_buffer_copy(tls_record(b""))
    rec.comm = b"a" * abi.COMM_LEN
    ev = decode(bytes(rec))
    assert isinstance(ev, TlsChunk) and ev.comm == "a" * abi.COMM_LEN
