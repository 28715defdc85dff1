"""elfsyms against what binutils says about real files of this machine."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from llmspyd.discovery.elfsyms import NotElf, open_elf
from tests.unit import discovery_bins as bins

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
LIBGNUTLS = "/usr/lib/x86_64-linux-gnu/libgnutls.so.30"
NODE = "/usr/bin/node"
OPENSSL_FUNCS = ["SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex", "SSL_free"]
GNUTLS_FUNCS = ["gnutls_record_send", "gnutls_record_recv", "gnutls_deinit"]

def need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed on this machine")
    return path


def readelf_symbols(path: str, dynamic: bool) -> dict[str, int]:
    """name -> value of defined FUNC symbols, as `readelf -Ws` (or --dyn-syms) prints them."""
    out = subprocess.run(
        ["readelf", "-W", "--dyn-syms" if dynamic else "--syms", path], capture_output=True, text=True, check=True
    ).stdout
    syms: dict[str, int] = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 8 and f[3] in ("FUNC", "IFUNC") and f[6] != "UND":
            name = f[7].split("@")[0]
            syms.setdefault(name, int(f[1], 16))
    return syms


def readelf_loads(path: str) -> list[tuple[int, int, int]]:
    """(offset, vaddr, filesz) of each PT_LOAD, from `readelf -lW`."""
    out = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True, check=True).stdout
    loads = []
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            loads.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))
    return loads


def file_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int:
    for off, va, filesz in loads:
        if va <= vaddr < va + filesz:
            return vaddr - va + off
    raise AssertionError(f"{vaddr:#x} in no PT_LOAD")


@pytest.mark.parametrize(
    ("path", "names"),
    [(LIBSSL, OPENSSL_FUNCS), (LIBGNUTLS, GNUTLS_FUNCS), (NODE, OPENSSL_FUNCS)],
)
def test_dynsym_offsets_match_binutils(path: str, names: list[str]) -> None:
    need(path)
    want = readelf_symbols(path, dynamic=True)
    loads = readelf_loads(path)
    with open_elf(path) as img:
        got = img.lookup(names, tables=(".dynsym",))
    assert set(got) == set(names)
    for name in names:
        assert got[name].vaddr == want[name]
        assert got[name].offset == file_offset(loads, want[name])
        assert got[name].table == ".dynsym"


def test_node_file_offset_differs_from_vaddr() -> None:
    # node is ET_EXEC loaded at 0x400000 with .text at a different file offset: the translation matters
    need(NODE)
    with open_elf(NODE) as img:
        sym = img.lookup(["SSL_write"])["SSL_write"]
    assert sym.offset != sym.vaddr


def test_symtab_lookup_matches_readelf() -> None:
    need(NODE)
    want = readelf_symbols(NODE, dynamic=False)
    names = ["uv_run", "SSL_write", "napi_create_string_utf8"]
    with open_elf(NODE) as img:
        got = img.lookup(names, tables=(".symtab",))
    for name in names:
        if name in want:
            assert got[name].vaddr == want[name]
            assert got[name].table == ".symtab"


def test_missing_and_undefined_symbols_are_not_returned() -> None:
    need(LIBSSL)
    with open_elf(LIBSSL) as img:
        # libssl imports memcpy (undefined in its dynsym): an import is not a definition
        got = img.lookup(["memcpy", "no_such_function_xyz", "gnutls_record_send"])
    assert got == {}


def test_dynamic_needed_matches_readelf() -> None:
    need(LIBSSL)
    out = subprocess.run(["readelf", "-dW", LIBSSL], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+?)\]", out)
    soname = re.findall(r"\(SONAME\).*\[(.+?)\]", out)
    with open_elf(LIBSSL) as img:
        dyn = img.dynamic()
    assert dyn["needed"] == needed
    assert dyn["soname"] == soname


def test_not_elf(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\necho hi\n" * 10)
    with pytest.raises(NotElf):
        open_elf(str(script))
    trunc = tmp_path / "t"
    trunc.write_bytes(Path(LIBSSL).read_bytes()[:100] if os.path.exists(LIBSSL) else b"\x7fELF" + b"\0" * 96)
    with pytest.raises(NotElf), open_elf(str(trunc)) as img:
        img.lookup(["SSL_write"])


@pytest.fixture(scope="module")
def go_binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("gobin")
    out = {
        "plain": bins.go_build(d, "plain", bins.GO_TLS_PROGRAM, []),
        "stripped": bins.go_build(d, "stripped", bins.GO_TLS_PROGRAM, ["-ldflags=-s -w"]),
    }
    out["version"] = subprocess.run(
        ["go", "env", "GOVERSION"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return out


@pytest.mark.parametrize("kind", ["plain", "stripped"])
def test_go_buildinfo(go_binaries: dict[str, str], kind: str) -> None:
    with open_elf(go_binaries[kind]) as img:
        info = img.go_buildinfo()
        assert img.is_go()
        assert img.interpreter() == ""  # CGO_ENABLED=0: static
    assert info is not None
    assert info.version == go_binaries["version"]
    assert info.main_path == "example.com/llmspytest"


def test_go_symbols_when_not_stripped(go_binaries: dict[str, str]) -> None:
    names = ["crypto/tls.(*Conn).Write", "crypto/tls.(*Conn).Read"]
    want = readelf_symbols(go_binaries["plain"], dynamic=False)
    loads = readelf_loads(go_binaries["plain"])
    with open_elf(go_binaries["plain"]) as img:
        got = img.lookup(names)
    for n in names:
        assert got[n].offset == file_offset(loads, want[n])
    with open_elf(go_binaries["stripped"]) as img:
        assert img.lookup(names) == {}
        assert img.has_section(".gopclntab")


def test_not_go() -> None:
    need(LIBSSL)
    with open_elf(LIBSSL) as img:
        assert img.go_buildinfo() is None
        assert not img.is_go()


def test_contains_in_section() -> None:
    need(LIBSSL)
    with open_elf(LIBSSL) as img:
        assert img.contains(b"ssl_lib.c", ".rodata") or img.contains(b"ssl_lib.c")
        assert not img.contains(b"rustls-0.", ".rodata")
