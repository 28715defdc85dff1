"""DT_NEEDED resolution against what ldconfig and ld.so (ldd) say on this machine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmspyd.discovery import ldso, procmaps
from llmspyd.discovery.scanner import Scanner
from tests.unit.ptrace_start import kill, start_stopped

CURL = "/usr/bin/curl"
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


def test_ld_cache_matches_ldconfig() -> None:
    if not os.path.exists(ldso.LD_CACHE) or not shutil.which("ldconfig"):
        pytest.skip("no ld.so.cache")
    with open(ldso.LD_CACHE, "rb") as f:
        cache = ldso.parse_ld_cache(f.read())
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    pairs = re.findall(r"^\s+(\S+) \(([^)]*)\) => (\S+)$", out, re.MULTILINE)
    assert pairs and len(cache) > 10
    for name, _, path in pairs:
        assert path in cache[name], name


def test_ld_cache_garbage() -> None:
    assert ldso.parse_ld_cache(b"") == {}
    assert ldso.parse_ld_cache(b"glibc-ld.so.cache1.1" + b"\xff" * 30) == {}
    assert ldso.parse_ld_cache(b"not a cache at all, no") == {}


def _closure(pid: int) -> dict[str, tuple[int, int]]:
    s = Scanner(load_optional=False)
    exe = next(mf for mf in procmaps.executable_files(pid) if mf.is_exe)
    opened = procmaps.open_mapped(pid, exe)
    assert opened is not None

    def info(f: procmaps.OpenedFile):  # type: ignore[no-untyped-def]
        v, _ = s.analyse(f)
        return (v.needed, v.rpath, v.runpath) if v.is_dynamic else None

    libs = ldso.needed_closure(pid, procmaps.exe_path(pid), opened, info, ldso.LdCaches())
    return {os.path.basename(p): lib.key for p, lib in libs}


def test_closure_at_exec_matches_what_the_loader_maps() -> None:
    """Resolve curl's libraries while it is stopped at exec, then let ld.so map them and compare inodes."""
    if not os.path.exists(CURL):
        pytest.skip("curl not installed")
    pid = start_stopped([CURL, "--version"])
    try:
        assert not any("libssl" in m.path for m in procmaps.read_maps(pid))  # not mapped yet
        predicted = _closure(pid)
    finally:
        kill(pid)
    ldd = subprocess.run(["ldd", CURL], capture_output=True, text=True, check=True).stdout
    loaded = dict(re.findall(r"^\s+(\S+) => (\S+) \(0x", ldd, re.MULTILINE))
    assert "libssl.so.3" in predicted
    for name, path in loaded.items():
        st = os.stat(path)
        assert predicted.get(name) == (st.st_dev, st.st_ino), name


@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace (unshare -m) needs root")
def test_closure_inside_another_mount_namespace(tmp_path: Path) -> None:
    if not os.path.exists(CURL) or not shutil.which("unshare"):
        pytest.skip("curl or unshare missing")
    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)
    st = os.stat(copy)
    script = (
        f"mount --bind {copy} {LIBSSL} && exec {sys.executable} -c "
        "\"import time; print('ready', flush=True); time.sleep(60)\""
    )
    p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        # resolve curl's closure as if curl had been exec'd in that namespace (its root is the same view)
        resolver = ldso.Resolver(p.pid, ldso.LdCaches(), ldso.elf_ident(CURL))
        found = resolver.resolve("libssl.so.3", "/usr/bin", [], [])
        assert found is not None
        lib = procmaps.open_in_root(p.pid, found)
        assert lib is not None and lib.key == (st.st_dev, st.st_ino)
    finally:
        p.kill()
        p.wait()


def test_ld_library_path_and_runpath_origin(tmp_path: Path) -> None:
    """LD_LIBRARY_PATH from the process's environment wins over the cache, as with ld.so."""
    if not os.path.exists(CURL):
        pytest.skip("curl not installed")
    libdir = tmp_path / "lib"
    libdir.mkdir()
    shutil.copy(LIBSSL, libdir / "libssl.so.3")
    st = os.stat(libdir / "libssl.so.3")
    pid = start_stopped([CURL, "--version"], env={"LD_LIBRARY_PATH": str(libdir), "PATH": "/usr/bin"})
    try:
        predicted = _closure(pid)
    finally:
        kill(pid)
    assert predicted["libssl.so.3"] == (st.st_dev, st.st_ino)
    r = ldso.Resolver(os.getpid(), ldso.LdCaches(), None)
    assert r.resolve("libssl.so.3", str(libdir), [], ["$ORIGIN"]) == str(libdir / "libssl.so.3")
    assert r.resolve("no-such-lib.so.9", "/", [], []) is None
