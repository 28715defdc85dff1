"""procmaps on live processes of this machine: parsing, grouping, and resolving the right inode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmspyd.discovery import procmaps

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"

MAPS_SAMPLE = """\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 260131                     /usr/bin/cat
55d0c0a02000-55d0c0a07000 r-xp 00002000 fe:00 260131                     /usr/bin/cat
55d0c1f00000-55d0c1f21000 rw-p 00000000 00:00 0                          [heap]
7f1e2a000000-7f1e2a028000 r--p 00000000 fe:00 262277                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2a028000-7f1e2a19d000 r-xp 00028000 fe:00 262277                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2a200000-7f1e2a240000 r-xp 00010000 103:02 99                        /tmp/my lib.so (deleted)
7f1e2a300000-7f1e2a301000 rw-s 00000000 00:01 4242                       /memfd:x (deleted)
7ffd3c5f0000-7ffd3c5f2000 r-xp 00000000 00:00 0                          [vdso]
garbage line
"""


def test_parse_maps_sample() -> None:
    maps = procmaps.parse_maps(MAPS_SAMPLE)
    assert [m.path for m in maps] == [
        "/usr/bin/cat",
        "/usr/bin/cat",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/tmp/my lib.so",
        "/memfd:x",
    ]
    lib = maps[4]
    assert lib.deleted and lib.executable
    assert lib.dev == os.makedev(0x103, 0x02) and lib.ino == 99
    assert lib.offset == 0x10000
    assert lib.range == "7f1e2a200000-7f1e2a240000"
    assert not maps[0].executable and maps[1].executable


def _start(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, **kw)  # type: ignore[call-overload]
    assert p.stdout is not None
    assert p.stdout.readline().strip() == b"ready"  # the library is mapped now
    return p


def _stop(p: subprocess.Popen[bytes]) -> None:
    p.kill()
    p.wait()


LOAD_AND_WAIT = "import ctypes, sys, time; ctypes.CDLL(sys.argv[1]); print('ready', flush=True); time.sleep(60)"


@pytest.fixture()
def ssl_child() -> Iterator[subprocess.Popen[bytes]]:
    if not os.path.exists(LIBSSL):
        pytest.skip("libssl.so.3 not installed")
    p = _start([sys.executable, "-c", LOAD_AND_WAIT, LIBSSL])
    yield p
    _stop(p)


def test_live_process_maps_libssl_and_exe(ssl_child: subprocess.Popen[bytes]) -> None:
    files = {f.path: f for f in procmaps.executable_files(ssl_child.pid)}
    real = os.path.realpath(LIBSSL)
    assert real in files or LIBSSL in files
    lib = files.get(real) or files[LIBSSL]
    st = os.stat(LIBSSL)
    assert (lib.dev, lib.ino) == (st.st_dev, st.st_ino)
    assert not lib.is_exe and not lib.deleted
    exe = [f for f in files.values() if f.is_exe]
    assert len(exe) == 1
    exe_st = os.stat(os.path.realpath(sys.executable))
    assert exe[0].key == (exe_st.st_dev, exe_st.st_ino)
    opened = procmaps.open_mapped(ssl_child.pid, lib)
    # same mount namespace as ours: the plain path names the same inode and outlives the process
    assert opened is not None and opened.via == "host"
    assert opened.path == lib.path
    assert opened.key == lib.key and opened.size == st.st_size


def test_gone_process_gives_nothing() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    assert procmaps.read_maps(p.pid) == []
    assert procmaps.executable_files(p.pid) == []


def test_deleted_and_replaced_library_opens_the_mapped_inode(tmp_path: Path) -> None:
    if not os.path.exists(LIBSSL):
        pytest.skip("libssl.so.3 not installed")
    copy = tmp_path / "libssl-copy.so.3"
    shutil.copy(LIBSSL, copy)
    old_ino = os.stat(copy).st_ino
    p = _start([sys.executable, "-c", LOAD_AND_WAIT, str(copy)])
    try:
        # replace the file at the same path, as a package upgrade does (new inode, old one deleted)
        new = tmp_path / "new.so"
        shutil.copy(LIBSSL, new)
        os.rename(new, copy)
        assert os.stat(copy).st_ino != old_ino
        lib = next(f for f in procmaps.executable_files(p.pid) if f.path == str(copy))
        assert lib.deleted and lib.ino == old_ino
        opened = procmaps.open_mapped(p.pid, lib)
        assert opened is not None
        assert opened.via == "map_files" and opened.ino == old_ino
        assert os.stat(opened.path).st_ino == old_ino
    finally:
        _stop(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace (unshare -m) needs root")
def test_other_mount_namespace_resolves_to_its_own_copy(tmp_path: Path) -> None:
    if not os.path.exists(LIBSSL) or not shutil.which("unshare"):
        pytest.skip("libssl.so.3 or unshare missing")
    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)
    copy_st = os.stat(copy)
    host_st = os.stat(LIBSSL)
    script = f'mount --bind {copy} {LIBSSL} && exec {sys.executable} -c "{LOAD_AND_WAIT}" {LIBSSL}'
    p = _start(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    try:
        lib = next(f for f in procmaps.executable_files(p.pid) if f.path.endswith("libssl.so.3"))
        assert lib.key == (copy_st.st_dev, copy_st.st_ino) != (host_st.st_dev, host_st.st_ino)
        opened = procmaps.open_mapped(p.pid, lib)
        assert opened is not None and opened.via == "root"
        st = os.stat(opened.path)
        assert (st.st_dev, st.st_ino) == (copy_st.st_dev, copy_st.st_ino)
        # the same path from the daemon's namespace is the host's file, a different inode
        assert os.stat(LIBSSL).st_ino == host_st.st_ino
        # a name the process has not mapped yet also resolves inside its namespace
        pre = procmaps.open_in_root(p.pid, LIBSSL)
        assert pre is not None and pre.key == lib.key
    finally:
        _stop(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs needs root")
def test_overlayfs_library_keyed_as_maps_and_uprobes_see_it(tmp_path: Path) -> None:
    """A container image layer. Kernels differ in what maps shows for it (older: the real file's device;
    6.x: the overlay's device with the real inode number), so both the mapped file and a path not mapped yet
    must come out with the key that maps shows on this kernel."""
    if not os.path.exists(LIBSSL) or not shutil.which("unshare"):
        pytest.skip("libssl.so.3 or unshare missing")
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    shutil.copy(LIBSSL, lower / "libssl.so.3")
    real = os.stat(lower / "libssl.so.3")
    lib = merged / "libssl.so.3"
    script = (
        f"mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {merged} && "
        f'exec {sys.executable} -c "{LOAD_AND_WAIT}" {lib}'
    )
    p = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None
        if p.stdout.readline().strip() != b"ready":
            pytest.skip(f"overlayfs not available: {p.stderr.read().decode() if p.stderr else ''}")
        mf = next(f for f in procmaps.executable_files(p.pid) if f.path == str(lib))
        assert mf.ino == real.st_ino
        overlay_st = os.stat(procmaps.root_path(p.pid, str(lib)))
        assert os.major(overlay_st.st_dev) == 0 and overlay_st.st_dev != real.st_dev  # stat names the overlay
        opened = procmaps.open_mapped(p.pid, mf)
        assert opened is not None and opened.key == mf.key
        pre = procmaps.open_in_root(p.pid, str(lib))  # the DT_NEEDED pre-resolution path
        assert pre is not None and pre.key == mf.key
    finally:
        _stop(p)
