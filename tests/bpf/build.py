"""Compile the test-only BPF objects of tests/bpf/ (the daemon itself never compiles)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_SRC = ROOT / "tests" / "bpf" / "libbpf_test.bpf.c"
ARCH = {"x86_64": "x86", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def have_clang() -> bool:
    return shutil.which("clang") is not None


def compile_test_object(out: Path, *defines: str, src: Path = TEST_SRC) -> Path:
    """clang -g -O2 -target bpf, with the project's bpf/ headers; raises CalledProcessError with clang's stderr."""
    cmd = ["clang", "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{ARCH}", "-Wall"]
    cmd += [f"-D{d}" for d in defines]
    cmd += ["-I", str(ROOT / "bpf"), "-I", "/usr/include", "-c", str(src), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
    return out
