"""ELF facts discovery needs, read fast: wanted symbols, file offsets, Go build info, DT_NEEDED.

Binaries are big (node ~100 MB with ~110k symbols, Bun ~245 MB), and a fresh
one is analysed while its process is already starting, so nothing here walks
a whole file or builds a Python object per symbol. pyelftools parses the
headers; the symbol tables are scanned straight from an mmap: the wanted
names are found in the string table with `find`, then only the `st_name`
column of the table is compared (a strided memoryview), and only the few
matching entries are decoded.

Uprobe offsets are FILE offsets: a symbol's virtual address is translated
through the PT_LOAD segment that contains it.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

ELF_MAGIC = b"\x7fELF"
GO_BUILDINFO_MAGIC = b"\xff Go buildinf:"
# The build info header is 32 bytes; Go >= 1.18 ("flags & 2") stores the strings inline right after it.
GO_BUILDINFO_HEADER = 32
GO_BUILDINFO_INLINE = 0x2
# Go aligns the build info blob to 16 bytes; in a binary without section headers it is searched in data.
GO_BUILDINFO_ALIGN = 16

SHN_UNDEF = 0
STT_FUNC = 2
STT_GNU_IFUNC = 10
STB_GLOBAL = 1
STB_WEAK = 2
ELF64_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size


class NotElf(Exception):
    """The file is not an ELF object we can read (script, truncated, foreign class)."""


@dataclass(frozen=True, slots=True)
class Load:
    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int  # PF_X=1 PF_W=2 PF_R=4


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    vaddr: int
    size: int
    table: str  # ".dynsym" or ".symtab"
    offset: int  # file offset of vaddr (what the uprobe wants)


@dataclass(slots=True)
class GoBuildInfo:
    version: str  # "go1.19.8"
    main_path: str = ""  # the main module path, when recorded


@dataclass(frozen=True, slots=True)
class SectionHeader:
    index: int
    name: str
    type: str  # "SHT_PROGBITS", "SHT_NOBITS", ...
    offset: int
    size: int
    addr: int
    link: int
    entsize: int


@dataclass(slots=True)
class ElfImage:
    """An ELF file opened for reading: mmap plus pyelftools headers. Use as a context manager."""

    path: str
    size: int
    data: mmap.mmap
    elf: ELFFile
    _file: object
    loads: list[Load] = field(default_factory=list)
    # Built from the raw headers: pyelftools' get_section_by_name would construct every section object, and
    # its .gnu.hash object parses the whole table (130 ms on node).
    sections: dict[str, SectionHeader] = field(default_factory=dict)
    interp: str = ""
    by_index: list[SectionHeader] = field(default_factory=list)

    def __enter__(self) -> ElfImage:  # noqa: PYI034 - a dataclass, not subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.data.close()
        except (BufferError, ValueError):
            pass  # a memoryview still alive; the GC will unmap it
        self._file.close()  # type: ignore[attr-defined]

    # --- headers ---------------------------------------------------------------------------------------------
    @property
    def is64(self) -> bool:
        return self.elf.elfclass == 64

    @property
    def elf_type(self) -> str:
        return str(self.elf.header["e_type"])  # "ET_EXEC", "ET_DYN"

    @property
    def machine(self) -> str:
        return str(self.elf.header["e_machine"])

    def section(self, name: str) -> tuple[int, int, int] | None:
        """(file offset, size, vaddr) of a section with contents, or None."""
        sec = self.sections.get(name)
        if sec is None or sec.type == "SHT_NOBITS" or sec.offset + sec.size > self.size:
            return None
        return sec.offset, sec.size, sec.addr

    def has_section(self, name: str) -> bool:
        return name in self.sections

    def section_bytes(self, name: str) -> memoryview | None:
        s = self.section(name)
        if s is None:
            return None
        off, size, _ = s
        return memoryview(self.data)[off : min(off + size, self.size)]

    def contains(self, needle: bytes, section: str | None = None) -> bool:
        """Whether `needle` occurs in the file, or in one section (much faster on big binaries)."""
        if section is None:
            return self.data.find(needle) >= 0
        s = self.section(section)
        if s is None:
            return False
        off, size, _ = s
        return self.data.find(needle, off, off + size) >= 0

    # --- addresses -------------------------------------------------------------------------------------------
    def vaddr_to_offset(self, vaddr: int) -> int | None:
        """File offset of a virtual address, through the PT_LOAD segment holding it."""
        for ld in self.loads:
            if ld.vaddr <= vaddr < ld.vaddr + ld.filesz:
                return vaddr - ld.vaddr + ld.offset
        return None

    # --- dynamic section -------------------------------------------------------------------------------------
    def dynamic(self) -> dict[str, list[str]]:
        """DT_NEEDED, DT_RUNPATH, DT_RPATH, DT_SONAME strings."""
        out: dict[str, list[str]] = {"needed": [], "runpath": [], "rpath": [], "soname": []}
        hdr = self.sections.get(".dynamic")
        dyn = self.elf.get_section(hdr.index) if hdr is not None else None
        if dyn is None:
            return out
        for tag in dyn.iter_tags():
            d = tag.entry.d_tag
            if d == "DT_NEEDED":
                out["needed"].append(tag.needed)
            elif d == "DT_RUNPATH":
                out["runpath"].append(tag.runpath)
            elif d == "DT_RPATH":
                out["rpath"].append(tag.rpath)
            elif d == "DT_SONAME":
                out["soname"].append(tag.soname)
        return out

    def interpreter(self) -> str:
        """PT_INTERP: the dynamic loader; "" for static executables (Go, static-pie)."""
        return self.interp

    # --- symbols ---------------------------------------------------------------------------------------------
    def lookup(
        self, names: list[str] | tuple[str, ...], tables: tuple[str, ...] = (".dynsym", ".symtab")
    ) -> dict[str, Symbol]:
        """Defined function symbols among `names`, first table that has them wins."""
        found: dict[str, Symbol] = {}
        for table in tables:
            missing = [n for n in names if n not in found]
            if not missing:
                break
            for sym in self._lookup_table(table, missing):
                found.setdefault(sym.name, sym)
        return found

    def _lookup_table(self, table: str, names: list[str]) -> list[Symbol]:
        sec = self.sections.get(table)
        if sec is None or sec.type == "SHT_NOBITS" or sec.entsize == 0 or sec.link >= len(self.by_index):
            return []
        strsec = self.by_index[sec.link]
        if sec.offset + sec.size > self.size or strsec.offset + strsec.size > self.size:
            return []  # truncated file
        if not self.is64 or not self.elf.little_endian or sec.entsize != ELF64_SYM.size:
            return self._lookup_slow(self.elf.get_section(sec.index), names, table)
        if table == ".dynsym":
            gnu_hash = self.sections.get(".gnu.hash")
            if gnu_hash is not None and gnu_hash.link == sec.index:
                return self._lookup_gnu_hash(gnu_hash.offset, sec.offset, strsec.offset, names)
        str_off, str_size = strsec.offset, strsec.size
        # string table offsets at which each wanted name (NUL terminated) starts; a name may also be the tail of a
        # longer string (the linker merges suffixes), so every occurrence counts
        want: dict[int, str] = {}
        for name in names:
            needle = name.encode() + b"\0"
            pos = self.data.find(needle, str_off, str_off + str_size)
            while pos >= 0:
                want[pos - str_off] = name
                pos = self.data.find(needle, pos + 1, str_off + str_size)
        if not want:
            return []
        off, size = sec.offset, sec.size
        end = off + size - size % ELF64_SYM.size
        best: dict[str, tuple[int, Symbol]] = {}
        for st_name, name in want.items():
            # st_name is the first field of an entry: search its bytes, keep entry-aligned hits only
            needle = st_name.to_bytes(4, "little")
            pos = self.data.find(needle, off, end)
            while pos >= 0:
                if (pos - off) % ELF64_SYM.size == 0:
                    _, info, _, shndx, value, sz = ELF64_SYM.unpack_from(self.data, pos)
                    sym = self._symbol(name, info, shndx, value, sz, table)
                    if sym is not None:
                        rank = _bind_rank(info >> 4)
                        if name not in best or rank < best[name][0]:
                            best[name] = (rank, sym)
                pos = self.data.find(needle, pos + 1, end)
        return [s for _, s in best.values()]

    def _lookup_gnu_hash(self, hash_off: int, sym_off: int, str_off: int, names: list[str]) -> list[Symbol]:
        """The dynamic loader's own lookup (DT_GNU_HASH): a few reads per name instead of a table scan."""
        nbuckets, symoffset, bloom_size, _ = struct.unpack_from("<IIII", self.data, hash_off)
        if nbuckets == 0:
            return []
        buckets_off = hash_off + 16 + bloom_size * 8
        chain_off = buckets_off + nbuckets * 4
        out = []
        for name in names:
            raw = name.encode()
            want = raw + b"\0"
            h = _gnu_hash(raw)
            (idx,) = struct.unpack_from("<I", self.data, buckets_off + (h % nbuckets) * 4)
            if idx < symoffset:
                continue
            best: tuple[int, Symbol] | None = None
            while True:
                (ch,) = struct.unpack_from("<I", self.data, chain_off + (idx - symoffset) * 4)
                if (ch | 1) == (h | 1):
                    st_name, info, _, shndx, value, sz = ELF64_SYM.unpack_from(
                        self.data, sym_off + idx * ELF64_SYM.size
                    )
                    at = str_off + st_name
                    if self.data[at : at + len(want)] == want:
                        sym = self._symbol(name, info, shndx, value, sz, ".dynsym")
                        if sym is not None and (best is None or _bind_rank(info >> 4) < best[0]):
                            best = (_bind_rank(info >> 4), sym)
                if ch & 1:
                    break
                idx += 1
            if best is not None:
                out.append(best[1])
        return out

    def _lookup_slow(self, sec, names: list[str], table: str) -> list[Symbol]:  # type: ignore[no-untyped-def]
        """pyelftools walk, for 32-bit or big-endian files (not on the hot path of x86-64/arm64 hosts)."""
        out = []
        for name in names:
            for s in sec.get_symbol_by_name(name) or []:
                info = (s["st_info"]["bind"], s["st_info"]["type"])
                if s["st_shndx"] == "SHN_UNDEF" or info[1] not in ("STT_FUNC", "STT_GNU_IFUNC"):
                    continue
                off = self.vaddr_to_offset(s["st_value"])
                if off is not None and s["st_value"]:
                    out.append(Symbol(name, s["st_value"], s["st_size"], table, off))
                    break
        return out

    def _symbol(self, name: str, info: int, shndx: int, value: int, size: int, table: str) -> Symbol | None:
        if shndx == SHN_UNDEF or value == 0 or (info & 0xF) not in (STT_FUNC, STT_GNU_IFUNC):
            return None
        off = self.vaddr_to_offset(value)
        if off is None:
            return None
        return Symbol(name, value, size, table, off)

    # --- Go ----------------------------------------------------------------------------------------------------
    def go_buildinfo(self) -> GoBuildInfo | None:
        """Go build info (`.go.buildinfo`, or its magic in the data segment when sections are gone)."""
        start = -1
        s = self.section(".go.buildinfo")
        if s is not None:
            off, size, _ = s
            start = self.data.find(GO_BUILDINFO_MAGIC, off, off + size)
        elif self.elf.num_sections() == 0:
            for ld in self.loads:
                if ld.flags & 2:  # writable: Go puts build info in data
                    start = self.data.find(GO_BUILDINFO_MAGIC, ld.offset, ld.offset + ld.filesz)
                    while start >= 0 and start % GO_BUILDINFO_ALIGN:
                        start = self.data.find(GO_BUILDINFO_MAGIC, start + 1, ld.offset + ld.filesz)
                    if start >= 0:
                        break
        if start < 0:
            return None
        hdr = self.data[start : start + GO_BUILDINFO_HEADER]
        if len(hdr) < GO_BUILDINFO_HEADER:
            return None
        ptr_size, flags = hdr[14], hdr[15]
        if flags & GO_BUILDINFO_INLINE:
            pos = start + GO_BUILDINFO_HEADER
            version, pos = self._varint_string(pos)
            modinfo, _ = self._varint_string(pos)
        else:
            # Go < 1.18: two pointers to Go string headers (ptr, len) at offset 16
            version = self._go_string_at(hdr, 16, ptr_size, flags)
            modinfo = self._go_string_at(hdr, 16 + ptr_size, ptr_size, flags)
        return GoBuildInfo(version=version, main_path=_main_path(modinfo))

    def is_go(self) -> bool:
        return (
            self.has_section(".go.buildinfo")
            or self.has_section(".gopclntab")
            or self.has_section(".note.go.buildid")
            or self.go_buildinfo() is not None
        )

    def _varint_string(self, pos: int) -> tuple[str, int]:
        n, shift = 0, 0
        while pos < self.size:
            b = self.data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80 or shift > 63:
                break
        raw = self.data[pos : pos + n]
        return raw.decode("utf-8", "replace"), pos + n

    def _go_string_at(self, hdr: bytes, at: int, ptr_size: int, flags: int) -> str:
        fmt = (">" if flags & 1 else "<") + ("Q" if ptr_size == 8 else "I")
        if ptr_size not in (4, 8) or at + ptr_size > len(hdr):
            return ""
        (ptr,) = struct.unpack_from(fmt, hdr, at)
        off = self.vaddr_to_offset(ptr)
        if off is None:
            return ""
        sptr, slen = struct.unpack_from(fmt * 2, self.data, off)
        soff = self.vaddr_to_offset(sptr)
        if soff is None or slen > 1 << 20:
            return ""
        return self.data[soff : soff + slen].decode("utf-8", "replace")


def _gnu_hash(name: bytes) -> int:
    h = 5381
    for c in name:
        h = (h * 33 + c) & 0xFFFFFFFF
    return h


def _bind_rank(bind: int) -> int:
    """Prefer GLOBAL over WEAK over LOCAL when a name is defined more than once."""
    return {STB_GLOBAL: 0, STB_WEAK: 1}.get(bind, 2)


def _main_path(modinfo: str) -> str:
    # modinfo is wrapped in 16-byte binary sentinels, then "path\t<main>\nmod\t...": the first "path\t" is it
    at = modinfo.find("path\t")
    if at < 0:
        return ""
    return modinfo[at + 5 :].split("\n", 1)[0]


def open_elf(path: str) -> ElfImage:
    """Open and mmap an ELF file; raises NotElf for anything else (scripts, empty files, garbage)."""
    f = open(path, "rb")  # noqa: SIM115 - owned by the returned ElfImage, closed by its close()
    try:
        size = os.fstat(f.fileno()).st_size
        if size < 64:
            raise NotElf(f"{path}: too small for ELF")
        data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    except BaseException:
        f.close()
        raise
    try:
        if data[:4] != ELF_MAGIC:
            raise NotElf(f"{path}: no ELF magic")
        elf = ELFFile(data)
        # raw headers again: iter_segments() builds a DynamicSegment that walks the symbol table
        phdrs = [elf._get_segment_header(i) for i in range(elf.num_segments())]
        loads = [
            Load(h["p_vaddr"], h["p_offset"], h["p_filesz"], h["p_memsz"], h["p_flags"])
            for h in phdrs
            if h["p_type"] == "PT_LOAD"
        ]
        interp = ""
        for h in phdrs:
            if h["p_type"] == "PT_INTERP":
                interp = (
                    bytes(data[h["p_offset"] : h["p_offset"] + h["p_filesz"]])
                    .split(b"\0")[0]
                    .decode("utf-8", "replace")
                )
        by_index = []
        for i in range(elf.num_sections()):
            h = elf._get_section_header(i)  # headers only: no section object is built
            by_index.append(
                SectionHeader(
                    i,
                    elf._get_section_name(h),
                    h["sh_type"],
                    h["sh_offset"],
                    h["sh_size"],
                    h["sh_addr"],
                    h["sh_link"],
                    h["sh_entsize"],
                )
            )
    except NotElf:
        data.close()
        f.close()
        raise
    except (ELFError, struct.error, ValueError) as e:
        data.close()
        f.close()
        raise NotElf(f"{path}: {e}") from e
    return ElfImage(
        path=path,
        size=size,
        data=data,
        elf=elf,
        _file=f,
        loads=loads,
        interp=interp,
        sections={s.name: s for s in reversed(by_index) if s.name},
        by_index=by_index,
    )
