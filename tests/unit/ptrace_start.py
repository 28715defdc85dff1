"""Start a program stopped right after execve, before its dynamic loader maps any library.

PTRACE_TRACEME then execve: the kernel stops the child with SIGTRAP once the new
image is in place (the moment our exec tracepoint fires), with only the
executable and ld.so mapped. Lets tests look at a process exactly as discovery
sees it at its exec event, deterministically.
"""

from __future__ import annotations

import ctypes
import os
import signal

PTRACE_TRACEME = 0
PTRACE_DETACH = 17

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libc.ptrace.restype = ctypes.c_long


def start_stopped(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Fork and exec `argv` stopped at its first instruction; returns the pid (a child of this process)."""
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe work until execve
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            _libc.ptrace(PTRACE_TRACEME, 0, None, None)
            if env is None:
                os.execv(argv[0], argv)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    if not os.WIFSTOPPED(status):
        raise RuntimeError(f"{argv[0]} did not stop at exec (status {status:#x})")
    return pid


def resume(pid: int) -> None:
    _libc.ptrace(PTRACE_DETACH, pid, None, None)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
