"""journald sink: one journal entry per exchange, over the native protocol.

The protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL) is written here directly
rather than through libsystemd bindings, so that the daemon needs no compiled
extension: one AF_UNIX datagram per entry to /run/systemd/journal/socket,
fields as ``NAME=value\\n``, or, for a value holding a newline (a prompt, a
JSON body), ``NAME\\n`` + 64-bit little-endian length + value + ``\\n``. An
entry too big for one datagram goes into a sealed memfd whose descriptor is
passed with SCM_RIGHTS in an empty datagram; journald reads it from there.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import re
import socket
import struct
import syslog
from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "llmspyd"

# Ask for a big send buffer so most entries fit one datagram (sd-journal asks 8 MiB too);
# the kernel caps it at net.core.wmem_max unless we hold CAP_NET_ADMIN (SO_SNDBUFFORCE).
SNDBUF_BYTES = 8 * 1024 * 1024

# journal field names: upper-case letters, digits and "_", not starting with "_" (those are trusted fields), <= 64.
_FIELD_NAME = re.compile(r"^[A-Z0-9][A-Z0-9_]{0,63}$")

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

Field = tuple[str, str | bytes]


class JournalError(OSError):
    """The journal refused or could not take an entry."""


def encode_entry(fields: Iterable[Field]) -> bytes:
    """Serialize fields in the native journal format (binary-safe)."""
    out = bytearray()
    for name, value in fields:
        if not _FIELD_NAME.match(name):
            raise ValueError(f"invalid journal field name {name!r}")
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalWriter:
    """Sends encoded entries to a journald native socket."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, max_datagram: int | None = None) -> None:
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SNDBUF_BYTES)
                break
            except OSError:
                continue
        # bigger entries go straight to a memfd; smaller ones still fall back to it on EMSGSIZE
        sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.max_datagram = sndbuf // 2 if max_datagram is None else max_datagram
        self.memfd_entries = 0  # entries that took the memfd path (for status and tests)

    def send(self, fields: Iterable[Field]) -> None:
        payload = encode_entry(fields)
        if len(payload) > self.max_datagram:
            self._send_memfd(payload)
            return
        try:
            self.sock.sendto(payload, self.socket_path)
            return
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise JournalError(e.errno, f"journal socket {self.socket_path}: {e.strerror}") from e
        self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        fd = os.memfd_create("llmspyd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            # journald only trusts a sealed memfd: nobody can change it after it is sent
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            fds = array.array("i", [fd])
            try:
                self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, self.socket_path)
            except OSError as e:
                raise JournalError(e.errno, f"journal socket {self.socket_path} (memfd): {e.strerror}") from e
            self.memfd_entries += 1
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()


def _dig(record: Mapping[str, Any], *path: str) -> Any:
    node: Any = record
    for p in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(p)
    return node


def _first(record: Mapping[str, Any], *paths: tuple[str, ...]) -> Any:
    for path in paths:
        v = _dig(record, *path)
        if v not in (None, ""):
            return v
    return None


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.0f}" if v == int(v) else f"{v:.3f}"
    return str(v)


# (journal field, candidate paths in the record's JSON form). First non-empty wins.
SCALAR_FIELDS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("LLM_EXCHANGE_ID", (("id",),)),
    ("LLM_CONVERSATION_ID", (("conversation_id",),)),
    ("LLM_PROVIDER", (("provider",),)),
    ("LLM_API", (("api",),)),
    ("LLM_MODEL", (("model",), ("response", "model"))),
    ("LLM_RESPONSE_MODEL", (("response", "model"),)),
    ("LLM_STATUS", (("response", "status"), ("error", "status"))),
    ("LLM_STREAM", (("stream",),)),
    ("LLM_COMPLETE", (("complete",),)),
    ("LLM_MISSING_BYTES", (("missing_bytes",),)),
    ("LLM_TRUNCATED", (("truncated",),)),
    ("LLM_CLOSED_EARLY", (("closed_early",),)),
    ("LLM_FINISH_REASON", (("response", "finish_reason"),)),
    ("LLM_ERROR_KIND", (("error", "kind"),)),
    ("LLM_ERROR_TYPE", (("error", "type"),)),
    ("LLM_INPUT_TOKENS", (("usage", "input_tokens"),)),
    ("LLM_OUTPUT_TOKENS", (("usage", "output_tokens"),)),
    ("LLM_CACHE_READ_TOKENS", (("usage", "cache_read_tokens"),)),
    ("LLM_CACHE_WRITE_TOKENS", (("usage", "cache_write_tokens"),)),
    ("LLM_REASONING_TOKENS", (("usage", "reasoning_tokens"),)),
    ("LLM_LATENCY_MS", (("latency_ms",), ("timing", "latency_ms"))),
    ("LLM_TTFT_MS", (("ttft_ms",), ("timing", "ttft_ms"))),
    ("LLM_REQUEST_START", (("timing", "request_start"),)),
    ("LLM_PID", (("process", "pid"),)),
    ("LLM_COMM", (("process", "comm"),)),
    ("LLM_EXE", (("process", "exe"),)),
    ("LLM_UID", (("process", "uid"),)),
    ("LLM_CGROUP", (("process", "cgroup"),)),
    ("LLM_CONTAINER", (("process", "container"),)),
    ("LLM_HOST", (("connection", "authority"),)),
    ("LLM_HTTP_VERSION", (("connection", "http_version"),)),
    ("LLM_TLS_STACK", (("connection", "tls_stack"),)),
    ("LLM_METHOD", (("request", "method"),)),
    ("LLM_PATH", (("request", "path"),)),
)


def _peer(record: Mapping[str, Any]) -> str | None:
    addr, port = _dig(record, "connection", "peer_addr"), _dig(record, "connection", "peer_port")
    if not addr:
        return None
    return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"


def _error_text(record: Mapping[str, Any]) -> str | None:
    err = _dig(record, "error")
    if not err:
        return None
    if isinstance(err, Mapping):
        kind, msg = err.get("kind") or "error", err.get("message") or ""
        return f"{kind}: {msg}" if msg else str(kind)
    return str(err)


def summary(record: Mapping[str, Any]) -> str:
    """The human MESSAGE: who called which model, how much, how fast, how it ended."""
    provider = _first(record, ("provider",)) or "unknown"
    model = _first(record, ("model",), ("response", "model")) or "?"
    comm = _dig(record, "process", "comm") or "?"
    pid = _dig(record, "process", "pid")
    parts = [f"{comm}[{pid}] → {provider} {model}"]
    status = _first(record, ("response", "status"), ("error", "status"))
    if status is not None:
        parts.append(f"status={status}")
    tin = _dig(record, "usage", "input_tokens")
    tout = _dig(record, "usage", "output_tokens")
    if tin is not None or tout is not None:
        parts.append(f"tokens={tin if tin is not None else '?'}→{tout if tout is not None else '?'}")
    lat = _first(record, ("latency_ms",), ("timing", "latency_ms"))
    if lat is not None:
        parts.append(f"latency={_text(lat)}ms")
    ttft = _first(record, ("ttft_ms",), ("timing", "ttft_ms"))
    if ttft is not None:
        parts.append(f"ttft={_text(ttft)}ms")
    if _dig(record, "stream"):
        parts.append("stream")
    err = _error_text(record)
    if err:
        parts.append(f"error={err[:120]}")
    elif _dig(record, "complete") is False:
        parts.append("incomplete")
    return " ".join(parts)


def _json(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def journal_fields(record: Mapping[str, Any]) -> list[Field]:
    """Map a (redacted) record's JSON form to journal fields."""
    failed = bool(_dig(record, "error")) or (
        isinstance(_dig(record, "response", "status"), int) and _dig(record, "response", "status") >= 400
    )
    fields: list[Field] = [
        ("MESSAGE", summary(record)),
        ("PRIORITY", str(syslog.LOG_WARNING if failed else syslog.LOG_INFO)),
        ("LLM_FAILED", "1" if failed else "0"),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
    ]
    for name, paths in SCALAR_FIELDS:
        v = _first(record, *paths)
        if v is not None and v != "" and not isinstance(v, (dict, list)):
            fields.append((name, _text(v)))
    err = _error_text(record)
    if err:
        fields.append(("LLM_ERROR", err))
    peer = _peer(record)
    if peer:
        fields.append(("LLM_PEER", peer))
    cmdline = _dig(record, "process", "cmdline")
    if isinstance(cmdline, list) and cmdline:
        fields.append(("LLM_CMDLINE", " ".join(str(a) for a in cmdline)))
    if isinstance(record.get("request"), Mapping):
        fields.append(("LLM_REQUEST", _json(record["request"])))
    if isinstance(record.get("response"), Mapping):
        fields.append(("LLM_RESPONSE", _json(record["response"])))
    # the rest of the record (timing, process, connection, usage, …): with LLM_REQUEST and
    # LLM_RESPONSE it rebuilds the whole record, without storing the big bodies twice
    fields.append(("LLM_RECORD", _json({k: v for k, v in record.items() if k not in ("request", "response")})))
    return fields


class JournaldSink:
    """Sink: writes each record as one journal entry."""

    name = "journald"

    def __init__(self, socket_path: str = DEFAULT_SOCKET, max_datagram: int | None = None) -> None:
        self.writer = JournalWriter(socket_path, max_datagram)

    def emit(self, record: Mapping[str, Any]) -> None:
        self.writer.send(journal_fields(record))

    def close(self) -> None:
        self.writer.close()
