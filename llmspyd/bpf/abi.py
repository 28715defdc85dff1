"""ctypes mirror of bpf/llmspy.h: keep in sync with it.

tests/unit/test_abi.py checks every size and offset here against the BTF of
the compiled BPF objects, so a drift fails the tests, not the daemon.
"""

from __future__ import annotations

import ctypes
import enum

ABI_VERSION = 1
COMM_LEN = 16
PATH_LEN = 256
CHUNK_MAX = 32768


class Kind(enum.IntEnum):
    TLS_DATA = 1
    CONN_CLOSE = 2
    EXEC = 3
    EXIT = 4


class Verdict(enum.IntEnum):
    UNSET = 0
    TRACE = 1
    SKIP = 2


F_FIRST = 1 << 0
F_LAST = 1 << 1
F_TRUNCATED = 1 << 2
F_FAULT = 1 << 3


class Stat(enum.IntEnum):
    CALLS = 0
    RECORDS = 1
    BYTES = 2
    LOST_RECORDS = 3
    LOST_BYTES = 4
    TRUNCATED_CALLS = 5
    TRUNCATED_BYTES = 6
    FAULT_RECORDS = 7
    FILTERED_CALLS = 8
    MUTED_CALLS = 9
    ORPHAN_RETURNS = 10
    LOST_EVENTS = 11


STAT_MAX = len(Stat)


class Hdr(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint16),
        ("kind", ctypes.c_uint16),
        ("size", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
    ]


class TlsData(ctypes.Structure):
    _fields_ = [
        ("hdr", Hdr),
        ("conn", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("call_len", ctypes.c_uint32),
        ("data_len", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", ctypes.c_uint16),
        ("direction", ctypes.c_uint8),
        ("stack", ctypes.c_uint8),
        ("family", ctypes.c_uint16),
        ("peer_port", ctypes.c_uint16),
        ("local_port", ctypes.c_uint16),
        ("peer_addr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * COMM_LEN),
        ("_pad", ctypes.c_uint8 * 2),
        # data[] follows: hdr.size - sizeof(TlsData) == data_len bytes
    ]


class ConnClose(ctypes.Structure):
    _fields_ = [
        ("hdr", Hdr),
        ("conn", ctypes.c_uint64),
        ("stack", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 7),
    ]


class Exec(ctypes.Structure):
    _fields_ = [
        ("hdr", Hdr),
        ("ppid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("comm", ctypes.c_char * COMM_LEN),
        ("filename", ctypes.c_char * PATH_LEN),
    ]


class Exit(ctypes.Structure):
    _fields_ = [
        ("hdr", Hdr),
        ("exit_code", ctypes.c_int32),
        ("_pad", ctypes.c_uint32),
    ]


# C struct name -> mirror, for the ABI test
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "llmspy_hdr": Hdr,
    "llmspy_tls_data": TlsData,
    "llmspy_conn_close": ConnClose,
    "llmspy_exec": Exec,
    "llmspy_exit": Exit,
}
