"""The stripped-BoringSSL finder on small executables built here, where symbols are the oracle.

tests/agents/ssl_lib_mini.c mirrors the parts of BoringSSL's ssl_lib.cc the
finder relies on. We build it four ways (PIE / non-PIE; ERR_put_error with 5
arguments, or with 4 as after LTO dropped the unused one), strip it, and
check that the finder names exactly the offsets the unstripped symbols give.
The real Bun and Claude Code binaries are checked in tests/e2e/test_agents.py,
with a uprobe oracle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from llmspyd.chunks import Stack
from llmspyd.discovery import boringssl
from llmspyd.discovery.target import Target, Uncovered
from llmspyd.discovery.x86code import Image

SOURCE = Path(__file__).parent.parent / "agents" / "ssl_lib_mini.c"

VARIANTS = {
    "pie": ["-fPIE", "-pie"],
    "nopie": ["-fno-pie", "-no-pie"],
    "pie_lto_args": ["-fPIE", "-pie", "-DLTO_ARGS"],
    "nopie_lto_args": ["-fno-pie", "-no-pie", "-DLTO_ARGS"],
}

needs_clang = pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed")


def build(tmp: Path, name: str, flags: list[str], src: Path = SOURCE) -> tuple[Path, Path]:
    """(unstripped, stripped) executables from `src` compiled as ssl/ssl_lib.cc."""
    d = tmp / name / "ssl"
    d.mkdir(parents=True)
    shutil.copy(src, d / "ssl_lib.cc")
    full = tmp / name / "full"
    subprocess.run(
        ["clang", "-x", "c", "-O2", "-fcf-protection=none", "-w", *flags, "-o", str(full), str(d / "ssl_lib.cc")],
        check=True,
    )
    stripped = tmp / name / "stripped"
    subprocess.run(["strip", "-s", "-o", str(stripped), str(full)], check=True)
    return full, stripped


def build_int3_padded(tmp: Path, name: str, flags: list[str]) -> tuple[Path, Path]:
    """Like build(), with SSL_peek inlined into SSL_read and int3 (not nop) between functions, as lld lays out
    Bun and Claude Code: the finder's fast path (entries from padding, no scan for call targets)."""
    d = tmp / name / "ssl"
    d.mkdir(parents=True)
    shutil.copy(SOURCE, d / "ssl_lib.cc")
    asm = tmp / name / "x.s"
    cc = ["clang", "-x", "c", "-O2", "-fcf-protection=none", "-w", "-DINLINE_PEEK", *flags]
    subprocess.run([*cc, "-S", "-o", str(asm), str(d / "ssl_lib.cc")], check=True)
    lines = asm.read_text().splitlines()
    for i, line in enumerate(lines[:-1]):  # only the alignment right before a function, never a loop's
        if line.strip().startswith(".p2align") and "@function" in lines[i + 1]:
            lines[i] = "\t.p2align\t4, 0xcc"
    asm.write_text("\n".join(lines) + "\n")
    full = tmp / name / "full"
    subprocess.run(["clang", *flags, "-o", str(full), str(asm)], check=True)
    stripped = tmp / name / "stripped"
    subprocess.run(["strip", "-s", "-o", str(stripped), str(full)], check=True)
    return full, stripped


def symbol_offsets(path: Path) -> dict[str, int]:
    """File offsets of the SSL_* functions, from the symbol table (the oracle)."""
    out = subprocess.run(["nm", str(path)], check=True, capture_output=True, text=True).stdout
    with Image.open(str(path)) as img:
        res = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] in ("SSL_write", "SSL_read", "SSL_peek"):
                off = img.va_to_offset(int(parts[0], 16))
                assert off is not None
                res[parts[2]] = off
    return res


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed")
    tmp = tmp_path_factory.mktemp("boringssl")
    return {name: build(tmp, name, flags) for name, flags in VARIANTS.items()}


@needs_clang
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_finds_the_symbols_offsets_in_stripped_build(builds: dict[str, tuple[Path, Path]], variant: str) -> None:
    full, stripped = builds[variant]
    want = symbol_offsets(full)
    assert set(want) == {"SSL_write", "SSL_read", "SSL_peek"}
    a = boringssl.analyse(str(stripped))
    assert a.reason == "" and a.entries == "call targets"  # nop padding: entries from direct calls
    # SSL_read, not SSL_peek: here SSL_peek is a separate function and SSL_read only wraps it
    assert a.offsets == {"SSL_write": [want["SSL_write"]], "SSL_read": [want["SSL_read"]]}


@needs_clang
@pytest.mark.parametrize("variant", ["pie", "nopie_lto_args"])
def test_fast_path_from_int3_padding(tmp_path: Path, variant: str) -> None:
    full, stripped = build_int3_padded(tmp_path, variant, VARIANTS[variant])
    want = symbol_offsets(full)
    assert "SSL_peek" not in want  # inlined, as in the real binaries
    a = boringssl.analyse(str(stripped))
    assert a.reason == "" and a.entries == "int3 padding"
    assert a.offsets == {"SSL_write": [want["SSL_write"]], "SSL_read": [want["SSL_read"]]}


@needs_clang
def test_without_bad_length_check_it_is_uncovered_not_guessed(tmp_path: Path) -> None:
    _, stripped = build(tmp_path, "nobadlen", ["-fPIE", "-pie", "-DNO_BAD_LENGTH"])
    a = boringssl.analyse(str(stripped))
    assert "SSL_write" not in a.offsets
    assert "UNINITIALIZED+SSL_HANDSHAKE_FAILURE+BAD_LENGTH" in a.reason
    st = os.stat(stripped)
    os.environ[boringssl.CACHE_ENV] = str(tmp_path / "cache")
    try:
        t = boringssl.boringssl_target(str(stripped), st.st_dev, st.st_ino)
    finally:
        del os.environ[boringssl.CACHE_ENV]
    assert isinstance(t, Uncovered)
    assert t.stack == Stack.BORINGSSL and "BAD_LENGTH" in t.reason


@needs_clang
def test_candidate_with_the_wrong_arguments_is_refused(tmp_path: Path) -> None:
    """SSL_write's errors, but the function reads a 4th argument: the finder says why and gives no offset."""
    _, stripped = build(tmp_path, "extra", ["-fPIE", "-pie", "-DWRITE_EXTRA_ARG"])
    a = boringssl.analyse(str(stripped))
    assert a.offsets == {}
    assert "SSL_write candidate" in a.reason and "more than 3 args" in a.reason


@needs_clang
def test_plain_program_has_no_boringssl(tmp_path: Path) -> None:
    src = tmp_path / "plain.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("ssl_lib"); return 0; }\n')
    exe = tmp_path / "plain"
    subprocess.run(["clang", "-O2", "-o", str(exe), str(src)], check=True)
    a = boringssl.analyse(str(exe))
    assert not a.boringssl and not a.offsets
    st = os.stat(exe)
    os.environ[boringssl.CACHE_ENV] = str(tmp_path / "cache")
    try:
        assert boringssl.boringssl_target(str(exe), st.st_dev, st.st_ino) is None
    finally:
        del os.environ[boringssl.CACHE_ENV]


def test_not_an_elf_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(boringssl.CACHE_ENV, str(tmp_path / "cache"))
    f = tmp_path / "script.sh"
    f.write_text("#!/bin/sh\necho ssl_lib.cc\n")
    st = os.stat(f)
    assert boringssl.boringssl_target(str(f), st.st_dev, st.st_ino) is None
    assert boringssl.boringssl_target(str(tmp_path / "missing"), 1, 2) is None


@needs_clang
def test_result_is_cached_per_file_identity(
    builds: dict[str, tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(boringssl.CACHE_ENV, str(tmp_path / "cache"))
    exe = tmp_path / "exe"
    shutil.copy(builds["pie"][1], exe)
    st = os.stat(exe)
    first = boringssl.boringssl_target(str(exe), st.st_dev, st.st_ino)
    assert isinstance(first, Target) and first.how == "fingerprint" and first.stack == Stack.BORINGSSL
    assert (tmp_path / "cache" / boringssl.CACHE_FILE).is_file()

    calls: list[str] = []
    real = boringssl.analyse
    monkeypatch.setattr(boringssl, "analyse", lambda p: calls.append(p) or real(p))
    again = boringssl.boringssl_target(str(exe), st.st_dev, st.st_ino)
    assert calls == [] and isinstance(again, Target) and again.offsets == first.offsets

    assert boringssl.cached_target(str(exe), st.st_dev, st.st_ino).offsets == first.offsets

    # a rebuilt file (new mtime) is analysed again, and is not in the cache before that
    os.utime(exe, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert boringssl.cached_target(str(exe), st.st_dev, st.st_ino) is boringssl.NOT_CACHED
    third = boringssl.boringssl_target(str(exe), st.st_dev, st.st_ino)
    assert calls == [str(exe)] and isinstance(third, Target) and third.offsets == first.offsets


def test_unwritable_cache_still_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(boringssl.CACHE_ENV, str(blocker / "sub"))  # cannot mkdir under a file
    f = tmp_path / "x"
    f.write_bytes(b"\x7fELF" + b"\0" * 60)
    st = os.stat(f)
    assert boringssl.boringssl_target(str(f), st.st_dev, st.st_ino) is None


@needs_clang
def test_rust_program_with_rustls_is_uncovered_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Codex-like: rustls compiled in (its crate path in panic locations), no BoringSSL: Uncovered, stack RUSTLS."""
    monkeypatch.setenv(boringssl.CACHE_ENV, str(tmp_path / "cache"))
    src = tmp_path / "r.c"
    src.write_text(
        "#include <stdio.h>\n"
        'const char *loc = "/root/.cargo/registry/src/index.crates.io-1/rustls-0.23.46/src/conn.rs";\n'
        "int main(void) { puts(loc); return 0; }\n"
    )
    exe = tmp_path / "r"
    subprocess.run(["clang", "-O2", "-o", str(exe), str(src)], check=True)
    st = os.stat(exe)
    t = boringssl.boringssl_target(str(exe), st.st_dev, st.st_ino)
    assert isinstance(t, Uncovered) and t.stack == Stack.RUSTLS and "rustls" in t.reason


def test_cache_keeps_only_the_newest_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(boringssl.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(boringssl, "MAX_CACHE_ENTRIES", 3)
    files = []
    for i in range(5):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"not an elf")
        st = os.stat(f)
        files.append((f, st))
        assert boringssl.boringssl_target(str(f), st.st_dev, st.st_ino) is None
    kept = [boringssl.cached_target(str(f), st.st_dev, st.st_ino) is not boringssl.NOT_CACHED for f, st in files]
    assert sum(kept) == 3 and kept[-1]
