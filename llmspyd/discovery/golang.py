"""Go binaries: where crypto/tls reads and writes plaintext, found without running the program.

A Go program carries its own TLS stack, so the probes go into the executable:
uprobes at the start of `crypto/tls.(*Conn).Write`, `(*Conn).Read` and
`(*Conn).Close` (just after the stack check of the prologue, see
after_stack_check), and at every RET instruction of `Read` (never a uretprobe:
Go moves goroutine stacks, and a return address rewritten by a uretprobe
would crash the program when its stack is copied).

Functions are found through `.symtab` when the binary has one and always
cross-checked with `.gopclntab`, Go's own function table, which the runtime
needs and which therefore survives `-ldflags=-s -w`. RET instructions are found
by decoding each function's machine code with capstone, between its entry and
the next function's entry (from `.gopclntab`).

The register ABI (arguments in registers) exists since Go 1.17; older
binaries pass arguments on the stack and are reported as Uncovered.

When DWARF is present (and the executable is not position-independent), the
struct layout from *tls.Conn to the socket fd (`tls.Conn.conn` ->
`*net.TCPConn` -> `netFD.pfd.Sysfd`) is read from it and handed to the probes
in `Target.params` (the "dwarf" fd path); otherwise the probes learn fd and
peer from the syscall that the TLS call makes on the same thread (the
"syscall" fd path).
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from typing import Any

from llmspyd.chunks import Stack
from llmspyd.discovery.target import Target, Uncovered

# register ABI (ABIInternal) on amd64 since Go 1.17: the probes read arguments from registers
GO_MIN_VERSION = (1, 17)

READ_FN = "crypto/tls.(*Conn).Read"
WRITE_FN = "crypto/tls.(*Conn).Write"
CLOSE_FN = "crypto/tls.(*Conn).Close"
# net.Conn methods of *net.TCPConn: itab.fun[0] (Close) and fun[2] (Read) in the sorted
# method table of net.Conn; the probe compares them to recognise a *net.TCPConn in the interface
TCPCONN_CLOSE_FN = "net.(*TCPConn).Close"
TCPCONN_READ_FN = "net.(*TCPConn).Read"
WANTED = (READ_FN, WRITE_FN, CLOSE_FN, TCPCONN_CLOSE_FN, TCPCONN_READ_FN)

BUILDINFO_MAGIC = b"\xff Go buildinf:"
BUILDINFO_HEADER = 32
BUILDINFO_INLINE = 0x2  # Go >= 1.18: version and modinfo strings follow the header inline
BUILDINFO_ALIGN = 16
# the build info sits in the first data pages; bound the search where there are no section headers
BUILDINFO_SCAN_MAX = 64 << 20

# .gopclntab header magics (runtime/symtab.go)
PCLN_GO116 = 0xFFFFFFFA  # Go 1.16-1.17: absolute entry PCs in the functab
PCLN_GO118 = 0xFFFFFFF0  # Go 1.18-1.19: entry offsets from textStart
PCLN_GO120 = 0xFFFFFFF1  # Go 1.20 and later: same layout as 1.18
PCLN_MAGICS = (PCLN_GO116, PCLN_GO118, PCLN_GO120)
# the table's section; position-independent builds before Go 1.2x put it among the relocated read-only data
PCLN_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")

# amd64 return instructions: RET (C3) and RET imm16 (C2); capstone calls both "ret"
RET_MNEMONICS = ("ret", "retq")
# a crypto/tls.(*Conn).Read is a few hundred bytes; anything bigger means a wrong bound
MAX_FUNC_BYTES = 1 << 20
# the stack check is the first two or three instructions of a Go function (lea r12; cmp; jbe)
PROLOGUE_INSNS = 4
PROLOGUE_BYTES = 32
# g.stackguard0 is at offset 0x10 of the g that R14 holds
STACKGUARD_OPERAND = "[r14+0x10]"

# params handed to the probes (see bpf/tls_gotls.bpf.c, struct go_fd_layout)
PARAM_TCPCONN_CLOSE = "tcpconn_close"  # vaddr of net.(*TCPConn).Close: key of the layout map
PARAM_TCPCONN_READ = "tcpconn_read"  # vaddr of net.(*TCPConn).Read: checked too
PARAM_CONN_OFF = "conn_off"  # tls.Conn.conn (a net.Conn interface)
PARAM_FD_OFF = "fd_off"  # net.TCPConn.conn.fd (a *netFD)
PARAM_PFD_OFF = "pfd_off"  # net.netFD.pfd (an internal/poll.FD)
PARAM_SYSFD_OFF = "sysfd_off"  # internal/poll.FD.Sysfd (an int)


class GoBinaryError(Exception):
    """The Go binary is malformed or of a layout we do not understand."""


@dataclass(frozen=True, slots=True)
class GoFunc:
    name: str
    entry: int  # virtual address
    end: int  # virtual address of the next function (exclusive)


# ---------------------------------------------------------------------------------------------------------
# small ELF view: mmap plus the section and segment headers pyelftools already parsed


class _Image:
    def __init__(self, path: str, elf: Any) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.data = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        self.elf = elf
        self.sections: dict[str, tuple[int, int, int]] = {}  # name -> (file offset, size, vaddr)
        for sec in elf.iter_sections():
            if sec["sh_type"] != "SHT_NOBITS":
                self.sections[sec.name] = (sec["sh_offset"], sec["sh_size"], sec["sh_addr"])
        self.loads = [
            (seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD"
        ]

    def close(self) -> None:
        try:
            self.data.close()
        except BufferError:
            pass  # a memoryview is still alive (e.g. in an exception's frame): the GC unmaps it
        self._f.close()

    def section(self, name: str) -> memoryview | None:
        s = self.sections.get(name)
        if s is None or s[0] + s[1] > len(self.data):
            return None
        return memoryview(self.data)[s[0] : s[0] + s[1]]

    def vaddr_to_offset(self, vaddr: int) -> int | None:
        for start, off, filesz in self.loads:
            if start <= vaddr < start + filesz:
                return vaddr - start + off
        return None

    def read(self, vaddr: int, n: int) -> bytes | None:
        off = self.vaddr_to_offset(vaddr)
        if off is None or off + n > len(self.data):
            return None
        return self.data[off : off + n]


# ---------------------------------------------------------------------------------------------------------
# build info


def _uvarint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise GoBinaryError("bad varint in build info")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _buildinfo_version(img: _Image) -> str | None:
    """The Go version that built the binary ("go1.19.8"), or None when it is not a Go binary."""
    sec = img.section(".go.buildinfo")
    if sec is not None:
        blob = bytes(sec[:4096])
        at = blob.find(BUILDINFO_MAGIC)
    else:
        # no section headers: the blob is 16-byte aligned somewhere in the data
        at = -1
        pos = img.data.find(BUILDINFO_MAGIC, 0, BUILDINFO_SCAN_MAX)
        while pos >= 0 and pos % BUILDINFO_ALIGN:
            pos = img.data.find(BUILDINFO_MAGIC, pos + 1, BUILDINFO_SCAN_MAX)
        if pos >= 0:
            blob, at = img.data[pos : pos + 4096], 0
    if at < 0:
        return None
    hdr = blob[at : at + BUILDINFO_HEADER]
    if len(hdr) < BUILDINFO_HEADER:
        raise GoBinaryError("truncated build info")
    ptr_size, flags = hdr[14], hdr[15]
    if flags & BUILDINFO_INLINE:
        n, pos = _uvarint(blob, at + BUILDINFO_HEADER)
        return bytes(blob[pos : pos + n]).decode("utf-8", "replace")
    # Go < 1.18: a pointer to a Go string header (data pointer, length)
    if ptr_size not in (4, 8):
        raise GoBinaryError(f"build info pointer size {ptr_size}")
    fmt = "<Q" if ptr_size == 8 else "<I"
    big_endian = bool(flags & 0x1)
    if big_endian:
        fmt = ">" + fmt[1:]
    (str_hdr,) = struct.unpack_from(fmt, hdr, 16)
    raw = img.read(str_hdr, 2 * ptr_size)
    if raw is None:
        raise GoBinaryError("build info version pointer outside the file")
    data_ptr, length = struct.unpack(fmt[0] + fmt[1] * 2, raw)
    s = img.read(data_ptr, length)
    if s is None:
        raise GoBinaryError("build info version string outside the file")
    return s.decode("utf-8", "replace")


def parse_go_version(version: str) -> tuple[int, int] | None:
    """(major, minor) from "go1.19.8", "go1.21rc2", "devel go1.23-abcdef"; None when unreadable."""
    m = re.search(r"go(\d+)\.(\d+)", version)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------------------
# .gopclntab


def pclntab_funcs(img: _Image, names: tuple[str, ...], text_start: int | None = None) -> dict[str, GoFunc]:
    """Entry and end of the named functions, from .gopclntab (works on stripped binaries)."""
    sec_name = next((n for n in PCLN_SECTIONS if n in img.sections), PCLN_SECTIONS[0])
    tab = img.section(sec_name)
    if tab is None:
        raise GoBinaryError("no .gopclntab section")
    if len(tab) < 16:
        raise GoBinaryError("truncated .gopclntab")
    (magic,) = struct.unpack_from("<I", tab, 0)
    if magic not in PCLN_MAGICS:
        raise GoBinaryError(f"unknown .gopclntab magic {magic:#x}")
    quantum, ptr_size = tab[6], tab[7]
    if ptr_size != 8 or quantum != 1:
        raise GoBinaryError(f"unsupported .gopclntab (pointer size {ptr_size}, pc quantum {quantum})")
    if magic == PCLN_GO116:
        nfunc, _nfiles, funcname_off, _cu, _file, _pc, functab_off = struct.unpack_from("<7Q", tab, 8)
        base = 0
        ent = struct.Struct("<QQ")  # entry pc, funcoff
        func_hdr = struct.Struct("<Qi")  # _func.entry, _func.nameoff
    else:
        nfunc, _nfiles, base, funcname_off, _cu, _file, _pc, functab_off = struct.unpack_from("<8Q", tab, 8)
        if base == 0:
            # Go >= 1.2x leaves textStart to a relocation: the text starts at runtime.text
            base = text_start if text_start is not None else img.sections.get(".text", (0, 0, 0))[2]
        ent = struct.Struct("<II")  # entry offset from textStart, funcoff
        func_hdr = struct.Struct("<Ii")  # _func.entryOff, _func.nameOff
    functab_end = functab_off + (nfunc + 1) * ent.size
    if functab_end > len(tab) or funcname_off > len(tab):
        raise GoBinaryError(".gopclntab tables outside the section")

    # name offsets of the wanted names inside funcnametab (each name is stored once, NUL-terminated)
    want: dict[int, str] = {}
    sec_off = img.sections[sec_name][0]
    lo, hi = sec_off + funcname_off, sec_off + functab_off
    for name in names:
        raw = name.encode() + b"\x00"
        if img.data[lo : lo + len(raw)] == raw:
            want[0] = name
            continue
        pos = img.data.find(b"\x00" + raw, lo, hi)
        if pos >= 0:
            want[pos + 1 - lo] = name

    found: dict[str, GoFunc] = {}
    if not want:
        return found
    for i in range(nfunc):
        entry, funcoff = ent.unpack_from(tab, functab_off + i * ent.size)
        _, nameoff = func_hdr.unpack_from(tab, functab_off + funcoff)
        name = want.get(nameoff)
        if name is None:
            continue
        next_entry, _ = ent.unpack_from(tab, functab_off + (i + 1) * ent.size)
        found[name] = GoFunc(name, base + entry, base + next_entry)
        if len(found) == len(want):
            break
    return found


# ---------------------------------------------------------------------------------------------------------
# .symtab


def symtab_funcs(img: _Image, names: tuple[str, ...]) -> dict[str, int]:
    """vaddr of the named functions from .symtab; empty when the binary is stripped."""
    symtab, strtab = img.section(".symtab"), img.section(".strtab")
    if symtab is None or strtab is None:
        return {}
    strs = bytes(strtab)
    name_offs: dict[int, str] = {}
    for name in names:
        needle = b"\x00" + name.encode() + b"\x00"
        pos = strs.find(needle)
        if pos >= 0:
            name_offs[pos + 1] = name
    if not name_offs:
        return {}
    sym = struct.Struct("<IBBHQQ")
    count = len(symtab) // sym.size
    # compare only st_name, a strided view over the table; decode the few hits
    st_names = memoryview(bytes(symtab)).cast("I")
    out: dict[str, int] = {}
    for i in range(count):
        name = name_offs.get(st_names[i * (sym.size // 4)])
        if name is not None:
            _, info, _, shndx, value, _ = sym.unpack_from(symtab, i * sym.size)
            if shndx != 0 and info & 0xF == 2:  # defined STT_FUNC
                out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# machine code


def _disasm(img: _Image, fn: GoFunc, max_bytes: int | None = None) -> list[tuple[int, int, str, str]]:
    import capstone

    size = fn.end - fn.entry
    if not 0 < size <= MAX_FUNC_BYTES:
        raise GoBinaryError(f"{fn.name}: implausible size {size}")
    code = img.read(fn.entry, size if max_bytes is None else min(size, max_bytes))
    if code is None:
        raise GoBinaryError(f"{fn.name}: code outside the file")
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.skipdata = True  # keep going over padding or anything undecodable
    return list(md.disasm_lite(code, fn.entry))


def after_stack_check(img: _Image, fn: GoFunc) -> int:
    """vaddr of the first instruction after fn's stack-bound check: where each call passes exactly once.

    A Go prologue compares SP with g.stackguard0 (`cmp rsp|r12, [r14 + 0x10]`, then `jbe`) and, when the
    stack must grow, calls runtime.morestack and JUMPS BACK TO THE ENTRY with the same arguments. An entry
    probe therefore fires twice for one call whenever the stack grows there; a probe after the `jbe` does
    not, and the argument registers are untouched up to it. A function without the check (nosplit) is
    probed at its entry.
    """
    insns = _disasm(img, fn, PROLOGUE_BYTES)[:PROLOGUE_INSNS]
    for i, (_addr, _size, mnemonic, ops) in enumerate(insns[:-1]):
        if mnemonic == "cmp" and STACKGUARD_OPERAND in ops.replace(" ", ""):
            nxt = insns[i + 1]
            if nxt[2] not in ("jbe", "jb"):
                break
            return nxt[0] + nxt[1]
    if any(STACKGUARD_OPERAND in ops.replace(" ", "") for *_, ops in insns):
        raise GoBinaryError(f"{fn.name}: unrecognised stack check in the prologue")
    return fn.entry


def ret_offsets(img: _Image, fn: GoFunc) -> list[int]:
    """File offsets of every RET instruction of fn (amd64)."""
    rets = []
    for addr, _size, mnemonic, _ops in _disasm(img, fn):
        if mnemonic in RET_MNEMONICS:
            off = img.vaddr_to_offset(addr)
            if off is not None:
                rets.append(off)
    return rets


# ---------------------------------------------------------------------------------------------------------
# DWARF: layout from *tls.Conn to the socket fd

# (struct type name, member name, param) along the pointer chain
_FD_CHAIN = (
    ("crypto/tls.Conn", "conn", PARAM_CONN_OFF),
    ("net.conn", "fd", PARAM_FD_OFF),
    ("net.netFD", "pfd", PARAM_PFD_OFF),
    ("internal/poll.FD", "Sysfd", PARAM_SYSFD_OFF),
)
# *net.TCPConn embeds net.conn: its "conn" member must be at offset 0 for the chain above
_TCPCONN = ("net.TCPConn", "conn")


def _struct_members(dwarf: Any, info: bytes, cus: list[tuple[int, int, Any]], name: str) -> dict[str, int] | None:
    """Member offsets of the struct type DIE named `name`, found by its name bytes instead of a walk.

    Go writes DIE names inline (DW_FORM_string) right after a one-byte abbreviation code, so each
    occurrence of the name is a candidate DIE one byte earlier; a candidate counts only if it parses as a
    structure type of exactly that name whose children are members. Walking every DIE with pyelftools
    instead takes seconds per MiB of .debug_info.
    """
    needle = name.encode() + b"\x00"
    pos = info.find(needle)
    while pos >= 0:
        die_off = pos - 1
        cu = next((c for lo, hi, c in cus if lo <= die_off < hi), None)
        if cu is not None:
            try:
                die = cu.get_DIE_from_refaddr(die_off)
                dname = die.attributes.get("DW_AT_name")
                if (
                    die.tag == "DW_TAG_structure_type"
                    and dname is not None
                    and dname.value == needle[:-1]
                    and "DW_AT_byte_size" in die.attributes
                ):
                    members: dict[str, int] = {}
                    for child in die.iter_children():
                        loc = child.attributes.get("DW_AT_data_member_location")
                        cname = child.attributes.get("DW_AT_name")
                        if child.tag != "DW_TAG_member" or loc is None or cname is None:
                            break
                        if isinstance(loc.value, int):
                            members[cname.value.decode("utf-8", "replace")] = loc.value
                    else:
                        return members
            except Exception:  # noqa: BLE001, S110 - a false candidate can fail to parse in any way
                pass
        pos = info.find(needle, pos + 1)
    return None


def dwarf_fd_layout(elf: Any) -> dict[str, int] | None:
    """Member offsets from DWARF along tls.Conn -> net.Conn -> netFD -> Sysfd, or None."""
    if not elf.has_dwarf_info():
        return None
    try:
        dwarf = elf.get_dwarf_info()
        info = dwarf.debug_info_sec.stream.getvalue()
        cus = []
        for cu in dwarf.iter_CUs():
            cus.append((cu.cu_offset, cu.cu_offset + cu["unit_length"] + cu.structs.initial_length_field_size(), cu))
    except Exception:  # noqa: BLE001 - a DWARF we cannot read means "no layout", never a failure
        return None
    out: dict[str, int] = {}
    for type_name, member, param in (*_FD_CHAIN, (*_TCPCONN, "tcpconn_conn_off")):
        members = _struct_members(dwarf, info, cus, type_name)
        if members is None or member not in members:
            return None
        out[param] = members[member]
    if out.pop("tcpconn_conn_off") != 0:
        return None
    return out


# ---------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class GoAnalysis:
    version: str
    funcs: dict[str, GoFunc]
    how: str  # "symtab" or "gopclntab"
    probe_at: dict[str, int]  # function -> vaddr of its "entry" probe: after the stack check
    offsets: dict[str, list[int]]  # Target roles -> FILE offsets
    params: dict[str, int]


def analyse(path: str, elf: Any) -> GoAnalysis | None:
    """Everything the Go probes need from one binary; None when it is not a Go binary.

    Raises GoBinaryError when it is Go but cannot be handled."""
    img = _Image(path, elf)
    try:
        version = _buildinfo_version(img)
        if version is None:
            return None
        ver = parse_go_version(version)
        if ver is None:
            raise GoBinaryError(f"unreadable Go version {version!r}")
        if ver < GO_MIN_VERSION:
            raise GoBinaryError(f"{version}: before the register ABI of Go 1.17 (arguments on the stack)")
        syms = symtab_funcs(img, WANTED + ("runtime.text",))
        text_start = syms.get("runtime.text")
        funcs = pclntab_funcs(img, WANTED, text_start)
        for name, vaddr in syms.items():
            if name in funcs and funcs[name].entry != vaddr:
                raise GoBinaryError(f"{name}: .symtab says {vaddr:#x}, .gopclntab {funcs[name].entry:#x}")
        missing = [n for n in (READ_FN, WRITE_FN) if n not in funcs]
        if missing:
            raise GoBinaryError(f"no {', '.join(missing)}: crypto/tls not linked in")
        how = "symtab" if READ_FN in syms and WRITE_FN in syms else "gopclntab"
        probe_at = {n: after_stack_check(img, funcs[n]) for n in (READ_FN, WRITE_FN, CLOSE_FN) if n in funcs}
        rets = ret_offsets(img, funcs[READ_FN])
        if not rets:
            raise GoBinaryError(f"{READ_FN}: no RET instruction found")
        offsets: dict[str, list[int]] = {"go_read_ret": rets}
        for role, fn in (("go_write", WRITE_FN), ("go_read", READ_FN), ("go_close", CLOSE_FN)):
            if fn in probe_at:
                off = img.vaddr_to_offset(probe_at[fn])
                if off is None:
                    raise GoBinaryError(f"{fn} lies outside the loaded segments")
                offsets[role] = [off]
        params: dict[str, int] = {}
        # the probe compares run-time code addresses with these link-time ones: equal only without relocation
        layout = dwarf_fd_layout(elf) if elf.header["e_type"] == "ET_EXEC" else None
        if layout is not None and TCPCONN_CLOSE_FN in funcs and TCPCONN_READ_FN in funcs:
            params = {
                PARAM_TCPCONN_CLOSE: funcs[TCPCONN_CLOSE_FN].entry,
                PARAM_TCPCONN_READ: funcs[TCPCONN_READ_FN].entry,
                **layout,
            }
        return GoAnalysis(version, funcs, how, probe_at, offsets, params)
    finally:
        img.close()


def go_target(path: str, elf: Any, dev: int, ino: int) -> Target | Uncovered | None:
    """Probe offsets for a Go binary's crypto/tls, Uncovered when it cannot be probed, None when not Go.

    `elf` is an open pyelftools ELFFile of `path`, or None to open it here."""
    own = None
    if elf is None:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        try:
            own = open(path, "rb")  # noqa: SIM115 - closed below
            elf = ELFFile(own)
        except (OSError, ELFError):
            if own is not None:
                own.close()
            return None
    try:
        if elf.header["e_machine"] != "EM_X86_64":
            img = _Image(path, elf)
            try:
                if _buildinfo_version(img) is None:
                    return None
            finally:
                img.close()
            return Uncovered(path, dev, ino, Stack.GOTLS, "Go: only the amd64 register ABI is supported")
        try:
            a = analyse(path, elf)
        except (GoBinaryError, struct.error, ValueError, IndexError) as e:
            # a malformed binary is reported, never an exception in the scanner
            return Uncovered(path, dev, ino, Stack.GOTLS, f"Go: {e}")
        if a is None:
            return None
        fd_path = "dwarf" if a.params else "syscall"
        target = Target(
            path=path,
            dev=dev,
            ino=ino,
            stack=Stack.GOTLS,
            offsets=a.offsets,
            how=f"{a.how}; {a.version}; fd:{fd_path}",
        )
        target.params.update(a.params)
        return target
    finally:
        if own is not None:
            own.close()


# struct go_fd_layout in bpf/tls_gotls.bpf.c: tcpconn_read, fd_off, pfd_off, sysfd_off, pad
_FD_LAYOUT = struct.Struct("<QIIII")


def fd_layout_entry(params: dict[str, int]) -> tuple[bytes, bytes] | None:
    """(key, value) for the BPF map go_fd_layouts from Target.params; None on the "syscall" fd path."""
    try:
        if params[PARAM_CONN_OFF] != 0:  # the probe reads the net.Conn interface at offset 0
            return None
        key = struct.pack("<Q", params[PARAM_TCPCONN_CLOSE])
        value = _FD_LAYOUT.pack(
            params[PARAM_TCPCONN_READ], params[PARAM_FD_OFF], params[PARAM_PFD_OFF], params[PARAM_SYSFD_OFF], 0
        )
    except KeyError:
        return None
    return key, value
