"""llmspyd in a pid namespace of its own (a container): records carry the pids that namespace sees, and
processes outside it are not captured (the kernel side uses bpf_get_ns_current_pid_tgid there)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_capture_in_own_pid_namespace(tls_server, certs, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs and make a pid namespace")
    if not shutil.which("unshare") or not shutil.which("curl"):
        pytest.skip("needs unshare and curl")
    out, err, pidfile = tmp_path / "sniff.jsonl", tmp_path / "sniff.err", tmp_path / "inner.pid"
    curl = f"curl -s --http1.1 --cacert {certs.ca} -o /dev/null"
    script = f"""
{ROOT}/.venv/bin/llmspy sniff --json --openssl-only --duration 8 > {out} 2> {err} &
for i in $(seq 300); do grep -q capturing {err} && break; sleep 0.1; done
sleep 1.5
{curl} {tls_server.url}/inside-the-namespace & echo $! > {pidfile}; wait $!
wait
"""
    ns = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script])
    deadline = time.monotonic() + 60
    while not (err.exists() and "capturing" in err.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "capturing" in err.read_text(), err.read_text()
    outer = subprocess.run(f"{curl} {tls_server.url}/outside-the-namespace", shell=True, check=True)
    assert outer.returncode == 0
    assert ns.wait(60) == 0, err.read_text()

    inner_pid = int(pidfile.read_text())
    assert inner_pid < 100, "a fresh pid namespace numbers its processes from 1"
    chunks = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    inside = sorted(
        {c["pid"] for c in chunks if c["direction"] == "write" and b"GET /inside-the-namespace " in base64.b64decode(c["data"])}
    )
    assert inside == [inner_pid], (inside, inner_pid)
    assert not any(b"/outside-the-namespace" in base64.b64decode(c["data"]) for c in chunks)
