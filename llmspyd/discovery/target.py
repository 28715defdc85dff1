"""What discovery hands to the probe manager: one file to probe, and where.

Pure data. Offsets are FILE offsets (what the kernel's uprobe wants), not
virtual addresses. Attaching is per file, keyed by (dev, ino), so one attach
covers every process that maps the file, including ones started later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmspyd.chunks import Stack


@dataclass(slots=True)
class Target:
    path: str  # path the daemon can open, e.g. /proc/PID/root/usr/lib/x86_64-linux-gnu/libssl.so.3
    dev: int
    ino: int
    stack: Stack
    # role -> file offsets. Roles: "SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex", "SSL_free",
    # "gnutls_record_send", "gnutls_record_recv", "gnutls_deinit",
    # "go_write" (entry), "go_read" (entry), "go_read_ret" (every RET of Read: many offsets).
    offsets: dict[str, list[int]] = field(default_factory=dict)
    how: str = ""  # how the offsets were found: "dynsym", "symtab", "gopclntab", "fingerprint", ...
    # numbers some probes need besides offsets, e.g. Go struct layout for the fd (see discovery/golang.py)
    params: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.dev, self.ino)


@dataclass(slots=True)
class Uncovered:
    """A file or process whose TLS stack we found but cannot probe, and why."""

    path: str
    dev: int
    ino: int
    stack: Stack
    reason: str  # e.g. "rustls: no stable plaintext functions", "stripped, fingerprint not verified"
