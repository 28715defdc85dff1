"""The scanner's verdicts on real files of this machine and on binaries built at test time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmspyd.chunks import Stack
from llmspyd.discovery import procmaps
from llmspyd.discovery.scanner import Scanner
from llmspyd.discovery.target import Target, Uncovered
from tests.unit import discovery_bins as bins
from tests.unit.test_discovery_elfsyms import file_offset, readelf_loads, readelf_symbols

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
LIBGNUTLS = "/usr/lib/x86_64-linux-gnu/libgnutls.so.30"
NODE = "/usr/bin/node"


def opened(path: str) -> procmaps.OpenedFile:
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed")
    f = procmaps.open_in_root(os.getpid(), os.path.realpath(path))
    assert f is not None
    return f


def expected_offsets(path: str, names: tuple[str, ...], dynamic: bool = True) -> dict[str, list[int]]:
    syms = readelf_symbols(path, dynamic=dynamic)
    loads = readelf_loads(path)
    return {n: [file_offset(loads, syms[n])] for n in names if n in syms}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("scanbins")
    out = {
        "go_tls": bins.go_build(d, "go_tls", bins.GO_TLS_PROGRAM, []),
        "go_plain": bins.go_build(d, "go_plain", bins.GO_PLAIN_PROGRAM, ["-ldflags=-s -w"]),
        "rust_markers": bins.cc_build(d, "rust_markers", bins.C_RUST_MARKERS, []),
    }
    out["go_tls_stripped"] = bins.strip_copy(out["go_tls"], str(d / "go_tls_stripped"))
    try:
        out["static_ssl"] = bins.cc_build(d, "static_ssl", bins.C_STATIC_OPENSSL, bins.static_openssl_libs())
        out["static_ssl_stripped"] = bins.strip_copy(out["static_ssl"], str(d / "static_ssl_stripped"))
    except pytest.skip.Exception:
        pass
    return out


def test_libssl_is_openssl_with_binutils_offsets() -> None:
    f = opened(LIBSSL)
    v, fresh = Scanner().analyse(f)
    assert fresh and v.stack == Stack.OPENSSL and v.uncovered is None
    t = v.target
    assert isinstance(t, Target) and t.how == "dynsym" and t.key == f.key
    names = ("SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex", "SSL_free")
    assert t.offsets == expected_offsets(os.path.realpath(LIBSSL), names)
    assert v.needed and "libcrypto.so.3" in v.needed


def test_gnutls() -> None:
    f = opened(LIBGNUTLS)
    v, _ = Scanner().analyse(f)
    assert v.stack == Stack.GNUTLS and v.target is not None
    names = ("gnutls_record_send", "gnutls_record_recv", "gnutls_deinit")
    want = expected_offsets(os.path.realpath(LIBGNUTLS), names)
    # send2 and recv_seq take (session, buf, len) too and are probed under the same roles
    also = expected_offsets(os.path.realpath(LIBGNUTLS), ("gnutls_record_send2", "gnutls_record_recv_seq"))
    want["gnutls_record_send"] += also.get("gnutls_record_send2", [])
    want["gnutls_record_recv"] += also.get("gnutls_record_recv_seq", [])
    assert v.target.offsets == want


def test_node_exports_static_openssl() -> None:
    f = opened(NODE)
    v, _ = Scanner().analyse(f)
    assert v.stack == Stack.OPENSSL and v.target is not None and v.target.how == "dynsym"
    assert v.target.offsets == expected_offsets(
        NODE, ("SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex", "SSL_free")
    )


def test_plain_system_binaries_have_no_tls() -> None:
    s = Scanner()
    for path in ("/usr/bin/cat", "/lib/x86_64-linux-gnu/libc.so.6", sys.executable):
        v, _ = s.analyse(opened(path))
        assert v.stack == Stack.UNKNOWN and v.target is None and v.uncovered is None, path


def test_not_elf_is_no_tls(tmp_path: Path) -> None:
    p = tmp_path / "script"
    p.write_text("#!/bin/sh\n" + "echo SSL_write\n" * 20)
    v, _ = Scanner().analyse(opened(str(p)))
    assert v.stack == Stack.UNKNOWN and "ELF" in v.note


def test_cache_per_inode_size_mtime(tmp_path: Path) -> None:
    s = Scanner()
    f = opened(LIBSSL)
    v1, fresh1 = s.analyse(f)
    v2, fresh2 = s.analyse(opened(LIBSSL))
    assert fresh1 and not fresh2 and v1 is v2
    copy = tmp_path / "libssl.so.3"
    shutil.copy(LIBSSL, copy)
    v3, fresh3 = s.analyse(opened(str(copy)))
    assert fresh3 and v3.target is not None and v3.target.key != v1.target.key  # type: ignore[union-attr]
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))  # same inode, new mtime: analysed again
    _, fresh4 = s.analyse(opened(str(copy)))
    assert fresh4
    assert s.counters["files_analysed"] == 3


def test_go_binary_delegates_to_go_finder(built: dict[str, str]) -> None:
    calls = []

    def fake_go(path, elf, dev, ino):  # type: ignore[no-untyped-def]
        calls.append((path, dev, ino))
        return Target(path, dev, ino, Stack.GOTLS, {"go_write": [1]}, how="fake")

    s = Scanner(go_finder=fake_go, load_optional=False)
    for kind in ("go_tls", "go_tls_stripped"):
        f = opened(built[kind])
        v, _ = s.analyse(f)
        assert v.stack == Stack.GOTLS and v.target is not None and v.target.how == "fake"
        assert calls[-1] == (f.path, f.dev, f.ino)
    # a Go program without crypto/tls: no TLS, the finder is not even asked
    n = len(calls)
    v, _ = s.analyse(opened(built["go_plain"]))
    assert v.stack == Stack.UNKNOWN and len(calls) == n and "crypto/tls" in v.note


def test_go_without_finder_is_uncovered_by_name(built: dict[str, str]) -> None:
    v, _ = Scanner(load_optional=False).analyse(opened(built["go_tls"]))
    assert v.stack == Stack.GOTLS and isinstance(v.uncovered, Uncovered) and "finder" in v.uncovered.reason


def test_go_with_real_go_finder(built: dict[str, str]) -> None:
    pytest.importorskip("llmspyd.discovery.golang")
    s = Scanner()
    if s.go_finder is None:
        pytest.skip("golang finder does not import")
    want = expected_offsets(built["go_tls"], ("crypto/tls.(*Conn).Write", "crypto/tls.(*Conn).Read"), dynamic=False)
    got = {}
    for kind in ("go_tls", "go_tls_stripped"):
        v, _ = s.analyse(opened(built[kind]))
        assert v.stack == Stack.GOTLS and v.target is not None, v.uncovered
        got[kind] = v.target.offsets
        # where in the function golang.py probes is its choice (it may skip the prologue): inside it, at least
        for role, fn in (("go_write", "crypto/tls.(*Conn).Write"), ("go_read", "crypto/tls.(*Conn).Read")):
            assert 0 <= v.target.offsets[role][0] - want[fn][0] < 64
    assert got["go_tls"] == got["go_tls_stripped"]  # symbols or .gopclntab: the same places


def test_static_openssl_found_in_symtab_and_stripped_is_uncovered(built: dict[str, str]) -> None:
    if "static_ssl" not in built:
        pytest.skip("libssl.a not installed")
    path = built["static_ssl"]
    v, _ = Scanner().analyse(opened(path))
    assert v.stack == Stack.OPENSSL and v.target is not None and v.target.how == "symtab"
    names = ("SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex", "SSL_free")
    assert v.target.offsets == expected_offsets(path, names, dynamic=False)
    v, _ = Scanner().analyse(opened(built["static_ssl_stripped"]))
    assert v.target is None and isinstance(v.uncovered, Uncovered) and v.uncovered.stack == Stack.OPENSSL
    assert "stripped" in v.uncovered.reason


def test_rustls_binary_is_uncovered_with_reason(built: dict[str, str]) -> None:
    v, _ = Scanner().analyse(opened(built["rust_markers"]))
    assert v.stack == Stack.RUSTLS and v.target is None
    assert isinstance(v.uncovered, Uncovered) and "rustls" in v.uncovered.reason


def test_boringssl_marker_delegates(tmp_path: Path) -> None:
    src = '#include <stdio.h>\nconst char *f = "../../ssl/ssl_lib.cc";\nint main(void){puts(f);return 0;}\n'
    path = bins.cc_build(tmp_path, "boring_marker", src, [])
    seen = []

    def finder(p, dev, ino):  # type: ignore[no-untyped-def]
        seen.append(p)
        return Uncovered(p, dev, ino, Stack.BORINGSSL, "stripped BoringSSL: fingerprint not verified")

    v, _ = Scanner(boring_finder=finder, load_optional=False).analyse(opened(path))
    assert seen and v.stack == Stack.BORINGSSL and "fingerprint" in v.uncovered.reason  # type: ignore[union-attr]
    # the finder says "not BoringSSL": no verdict
    v, _ = Scanner(boring_finder=lambda p, d, i: None, load_optional=False).analyse(opened(path))
    assert v.stack == Stack.UNKNOWN and v.uncovered is None


def test_finder_exception_is_reported_not_raised(built: dict[str, str]) -> None:
    def broken(*a):  # type: ignore[no-untyped-def]
        raise ValueError("boom")

    v, _ = Scanner(go_finder=broken, load_optional=False).analyse(opened(built["go_tls"]))
    assert v.uncovered is not None and "boom" in v.uncovered.reason


def test_scan_process_live_python_with_ssl() -> None:
    if not os.path.exists(LIBSSL):
        pytest.skip("no libssl")
    p = subprocess.Popen(
        [sys.executable, "-c", "import ssl, time; print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        s = Scanner()
        cov = s.scan_process(p.pid)
        assert cov is not None and cov.pid == p.pid and cov.comm
        assert Stack.OPENSSL in cov.stacks
        st = os.stat(LIBSSL)
        t = cov.targets[(st.st_dev, st.st_ino)]
        assert os.stat(t.path).st_ino == st.st_ino and not t.path.startswith("/proc/")
        assert [x.key for x in cov.new_targets] == [t.key]
        again = s.scan_process(p.pid, cov)
        assert again is cov and again.new_targets == []  # nothing new to analyse
        assert "openssl" in cov.summary()["stacks"]
    finally:
        p.kill()
        p.wait()
    assert Scanner().scan_process(p.pid) is None
    assert Scanner().scan_process(os.getpid()) is None  # never the daemon itself
