"""The first OpenSSL finder of llmspyd.bpf.probes: symbol file offsets and candidate files (no root)."""

from __future__ import annotations

import os
import ssl  # noqa: F401  (maps libssl into this process)
import sys

import pytest
from elftools.elf.elffile import ELFFile

from llmspyd.bpf.probes import OPENSSL_ROLES, ROLE_PROBES, candidate_files, openssl_target
from llmspyd.chunks import Stack


def mapped_libssl() -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "/libssl.so" in parts[5]:
                return os.path.realpath(parts[5])
    pytest.skip("Python's ssl module maps no libssl here")


def test_openssl_target_offsets_are_file_offsets_of_the_functions() -> None:
    path = mapped_libssl()
    t = openssl_target(path)
    assert t is not None and t.stack == Stack.OPENSSL and set(t.offsets) == set(OPENSSL_ROLES)
    st = os.stat(path)
    assert (t.dev, t.ino) == (st.st_dev, st.st_ino)
    # independently: the bytes at each file offset are the bytes of the symbol's section at its vaddr
    with open(path, "rb") as f:
        elf = ELFFile(f)
        dynsym = elf.get_section_by_name(".dynsym")
        for role, (off,) in t.offsets.items():
            (sym,) = dynsym.get_symbol_by_name(role)
            sec = elf.get_section(sym["st_shndx"])
            expect = sec.data()[sym["st_value"] - sec["sh_addr"] :][:16]
            f.seek(off)
            assert f.read(16) == expect, role


def test_non_openssl_files_are_not_targets(tmp_path) -> None:
    assert openssl_target(os.path.realpath(sys.executable)) is None  # Debian's python links libssl dynamically
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an elf at all" * 10)
    assert openssl_target(str(junk)) is None
    assert openssl_target(str(tmp_path / "missing")) is None


def test_candidate_files_lists_exe_and_mapped_libssl() -> None:
    path = mapped_libssl()
    found = list(candidate_files(os.getpid()))
    assert found[0] == (f"/proc/{os.getpid()}/exe", None)
    st = os.stat(path)
    assert any(key == (st.st_dev, st.st_ino) and p.endswith(os.path.basename(path)) for p, key in found[1:])


def test_every_role_has_an_entry_program() -> None:
    for role in OPENSSL_ROLES:
        assert any(not ret for _, ret in ROLE_PROBES[role])


def test_stable_path_prefers_the_plain_path_of_the_same_file(tmp_path) -> None:
    from llmspyd.bpf.probes import _stable_path

    path = mapped_libssl()
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    assert _stable_path(f"/proc/{os.getpid()}/root{path}", key) == path
    assert _stable_path(f"/proc/{os.getpid()}/exe", (0, 0)) == f"/proc/{os.getpid()}/exe"  # another file: kept
    other = tmp_path / "x"
    other.write_bytes(b"x")
    assert _stable_path(f"/proc/{os.getpid()}/root{other}", key) == f"/proc/{os.getpid()}/root{other}"
