"""Just enough x86-64 code analysis to find functions in a stripped ELF executable.

Pure: reads a file through mmap, never runs it. Used by the BoringSSL finder
(boringssl.py). Three jobs:

- map the file and translate virtual addresses to file offsets (PT_LOAD);
- find the instructions that reference an address (RIP-relative LEA, absolute
  imm32 MOV in non-PIE code, direct CALL rel32) without decoding the whole
  .text (a 245 MB binary has ~130 MB of code): see find_rel32_refs;
- decode one function linearly and walk its control-flow graph.

Function bounds come from direct call targets, not from .eh_frame: Bun and
Claude Code ship without .eh_frame (or with a partial one).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import capstone
from capstone import x86_const as X

# window for the rel32 scan: within it, the top 16 bits of the displacement to
# a fixed target take at most two values, so we can search for those 2 bytes
# with mmap.find (memchr speed) instead of decoding every instruction
_REL_WINDOW = 0x8000
# the longest function we decode; BoringSSL's SSL_read/SSL_write are < 1 KiB
MAX_FUNCTION_BYTES = 0x4000

PT_LOAD = 1
PF_X = 1

# System V argument registers, in order
ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
CALLER_SAVED = frozenset(("rax", "rdi", "rsi", "rdx", "rcx", "r8", "r9", "r10", "r11"))


class ElfError(ValueError):
    """The file is not an ELF we can analyse (not 64-bit little-endian x86-64)."""


@dataclass(slots=True)
class Segment:
    vaddr: int
    offset: int
    filesz: int
    flags: int


@dataclass(slots=True)
class Section:
    name: str
    addr: int
    offset: int
    size: int


@dataclass
class Image:
    """A mapped x86-64 ELF file. Use as a context manager."""

    path: str
    data: mmap.mmap
    segments: list[Segment]
    sections: dict[str, Section]
    _fd: int = -1

    @classmethod
    def open(cls, path: str) -> Image:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            os.close(fd)
            raise
        try:
            segments, sections = _parse_elf(data)
        except (ElfError, struct.error) as e:
            data.close()
            os.close(fd)
            raise ElfError(f"{path}: {e}") from None
        return cls(path, data, segments, sections, fd)

    def close(self) -> None:
        self.data.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def va_to_offset(self, va: int) -> int | None:
        for s in self.segments:
            if s.vaddr <= va < s.vaddr + s.filesz:
                return va - s.vaddr + s.offset
        return None

    def offset_to_va(self, off: int) -> int | None:
        for s in self.segments:
            if s.offset <= off < s.offset + s.filesz:
                return off - s.offset + s.vaddr
        return None

    def code_ranges(self) -> list[tuple[int, int, int]]:
        """(file offset, end offset, vaddr) of the executable code: .text, else executable segments."""
        t = self.sections.get(".text")
        if t is not None and t.size:
            return [(t.offset, t.offset + t.size, t.addr)]
        return [(s.offset, s.offset + s.filesz, s.vaddr) for s in self.segments if s.flags & PF_X]

    def is_code(self, va: int) -> bool:
        return any(v <= va < v + (e - o) for o, e, v in self.code_ranges())

    def bytes_at(self, va: int, n: int) -> bytes:
        off = self.va_to_offset(va)
        if off is None:
            return b""
        return self.data[off : off + n]


def _parse_elf(m: mmap.mmap) -> tuple[list[Segment], dict[str, Section]]:
    if m[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    if m[4] != 2 or m[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF")
    (machine,) = struct.unpack_from("<H", m, 18)
    if machine != 62:  # EM_X86_64
        raise ElfError(f"machine {machine} is not x86-64")
    phoff, shoff = struct.unpack_from("<QQ", m, 32)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", m, 54)
    segments = []
    for i in range(phnum):
        p_type, p_flags, p_offset, p_vaddr, _pa, p_filesz = struct.unpack_from("<IIQQQQ", m, phoff + i * phentsize)
        if p_type == PT_LOAD:
            segments.append(Segment(p_vaddr, p_offset, p_filesz, p_flags))
    sections: dict[str, Section] = {}
    if shoff and shnum and shstrndx < shnum:
        raw = [struct.unpack_from("<IIQQQQ", m, shoff + i * shentsize) for i in range(shnum)]
        strtab_off = raw[shstrndx][4]
        for name_off, _type, _flags, addr, offset, size in raw:
            end = m.find(b"\0", strtab_off + name_off)
            name = m[strtab_off + name_off : end].decode("latin-1")
            if name and name not in sections:
                sections[name] = Section(name, addr, offset, size)
    if not segments:
        raise ElfError("no PT_LOAD segment")
    return segments, sections


# ---------------------------------------------------------------------------
# finding references without decoding everything


@dataclass(frozen=True, slots=True)
class RelShape:
    """An instruction with a rel32 operand: how to recognise it and where its displacement sits."""

    name: str
    disp_at: int  # displacement offset inside the instruction
    length: int  # instruction length; rel32 is relative to the next instruction

    def matches(self, m: mmap.mmap, off: int) -> bool:
        if self.name == "call":
            return m[off] == 0xE8
        if self.name == "lea":  # REX.W lea r64, [rip + disp32]
            return m[off] in (0x48, 0x4C) and m[off + 1] == 0x8D and (m[off + 2] & 0xC7) == 0x05
        raise AssertionError(self.name)


CALL_REL32 = RelShape("call", 1, 5)
LEA_RIP = RelShape("lea", 3, 7)


def find_rel32_refs(
    img: Image,
    targets: tuple[int, int] | list[tuple[int, int]],
    shape: RelShape,
    ranges: Iterable[tuple[int, int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Every `shape` instruction in the code whose rel32 target lies in [lo, hi) (one span or several).

    Returns (instruction vaddr, target vaddr). Instead of decoding, search per
    window for the 2 high bytes the displacement must have there, then check the
    candidates; one pass over the code serves all spans. Bytes that merely look
    like such an instruction (inside another instruction) are possible but need
    a 4-byte exact match; callers verify.
    """
    spans = [targets] if isinstance(targets, tuple) else sorted(targets)
    out: list[tuple[int, int]] = []
    for start, end, base_va in ranges if ranges is not None else img.code_ranges():
        for w in range(start, end, _REL_WINDOW):
            _scan_window(img, shape, spans, start, end, base_va, w, out)
    out.sort()
    return out


def first_rel32_ref(img: Image, target: int, shape: RelShape) -> int | None:
    """Some `shape` instruction referring to `target`, searched outwards from it (callers are often near)."""
    for start, end, base_va in img.code_ranges():
        if not base_va <= target < base_va + (end - start):
            continue
        home = start + (target - base_va) // _REL_WINDOW * _REL_WINDOW
        left, right = home, home + _REL_WINDOW
        out: list[tuple[int, int]] = []
        _scan_window(img, shape, [(target, target + 1)], start, end, base_va, home, out)
        while not out and (left > start or right < end):
            if left > start:
                left -= _REL_WINDOW
                _scan_window(img, shape, [(target, target + 1)], start, end, base_va, max(left, start), out)
            if right < end:
                _scan_window(img, shape, [(target, target + 1)], start, end, base_va, right, out)
                right += _REL_WINDOW
        if out:
            return out[0][0]
    return None


def _scan_window(
    img: Image,
    shape: RelShape,
    spans: list[tuple[int, int]],
    start: int,
    end: int,
    base_va: int,
    w: int,
    out: list[tuple[int, int]],
) -> None:
    m = img.data
    hi_at = shape.disp_at + 2
    wend = min(w + _REL_WINDOW, end - shape.length + 1)
    if wend <= w:
        return
    va0 = base_va + (w - start) + shape.length
    va1 = base_va + (wend - 1 - start) + shape.length
    his: set[int] = set()
    for lo, hi in spans:
        # displacement range for targets in [lo, hi) from instructions in [w, wend)
        dmin, dmax = lo - va1, hi - 1 - va0
        his.update((d & 0xFFFFFFFF) >> 16 for d in range(dmin & ~0xFFFF, dmax + 1, 0x10000))
        his.add((dmax & 0xFFFFFFFF) >> 16)
    for h in his:
        pat = h.to_bytes(2, "little")
        q = m.find(pat, w + hi_at, wend + hi_at)
        while q != -1:
            p = q - hi_at
            if shape.matches(m, p):
                d = int.from_bytes(m[p + shape.disp_at : p + shape.disp_at + 4], "little", signed=True)
                va = base_va + (p - start)
                t = va + shape.length + d
                if any(lo <= t < hi for lo, hi in spans):
                    out.append((va, t))
            q = m.find(pat, q + 1, wend + hi_at)


def find_abs32_refs(img: Image, target: int) -> list[int]:
    """Instructions that load `target` as an imm32 into a register (non-PIE code): mov r32, imm32 / mov r64, simm32."""
    if target >= 1 << 31:
        return []
    imm = target.to_bytes(4, "little")
    out = []
    for start, end, base_va in img.code_ranges():
        q = img.data.find(imm, start, end)
        while q != -1:
            for back in (1, 2, 3):  # B8+r | 41 B8+r | 48/49 C7 C0+r
                p = q - back
                ins = _decode_one(img.data[p : q + 4], base_va + (p - start))
                if ins is not None and ins.size == back + 4 and _is_mov_reg_imm(ins, target):
                    out.append(ins.address)
                    break
            q = img.data.find(imm, q + 1, end)
    return out


# ---------------------------------------------------------------------------
# decoding


_MD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_MD.detail = True

_JCC = frozenset(
    getattr(X, n)
    for n in dir(X)
    if n.startswith("X86_INS_J") and n not in ("X86_INS_JMP", "X86_INS_JRCXZ", "X86_INS_JECXZ", "X86_INS_JCXZ")
)


def _decode_one(code: bytes, va: int) -> capstone.CsInsn | None:
    for ins in _MD.disasm(code, va, 1):
        return ins
    return None


def _is_mov_reg_imm(ins: capstone.CsInsn, value: int) -> bool:
    ops = ins.operands
    return (
        ins.id == X.X86_INS_MOV
        and len(ops) == 2
        and ops[0].type == X.X86_OP_REG
        and ops[1].type == X.X86_OP_IMM
        and ops[1].imm == value
    )


_REG64: dict[str, str] = {}
for _r in ("ax", "bx", "cx", "dx"):
    for _n in (f"r{_r}", f"e{_r}", _r, f"{_r[0]}l", f"{_r[0]}h"):
        _REG64[_n] = f"r{_r}"
for _r in ("si", "di", "bp", "sp"):
    for _n in (f"r{_r}", f"e{_r}", _r, f"{_r}l"):
        _REG64[_n] = f"r{_r}"
for _i in range(8, 16):
    for _n in (f"r{_i}", f"r{_i}d", f"r{_i}w", f"r{_i}b"):
        _REG64[_n] = f"r{_i}"


def reg64(name: str) -> str:
    """Full register a sub-register belongs to: edx -> rdx, r8d -> r8; others unchanged."""
    return _REG64.get(name, name)


@dataclass(slots=True)
class Insn:
    address: int
    size: int
    mnemonic: str
    op_str: str
    id: int
    reads: frozenset[str]
    writes: frozenset[str]
    mem_bases: frozenset[str]  # registers used as base/index of a memory operand
    mem_write_bases: frozenset[str]  # bases of memory operands that are written
    imm_to_reg: tuple[str, int] | None  # mov reg, imm / xor reg, reg -> (reg64, value)
    branch_target: int | None  # direct jmp/jcc/call target
    is_call: bool
    is_jmp: bool  # unconditional jump
    is_jcc: bool
    is_ret: bool
    rip_target: int | None  # address a [rip + disp] operand or absolute imm refers to

    @property
    def end(self) -> int:
        return self.address + self.size


def _convert(ins: capstone.CsInsn) -> Insn:
    try:
        r, w = ins.regs_access()
    except capstone.CsError:
        r, w = [], []
    reads = {reg64(ins.reg_name(x)) for x in r}
    writes = {reg64(ins.reg_name(x)) for x in w}
    bases: set[str] = set()
    wbases: set[str] = set()
    rip_target = None
    imm_to_reg = None
    branch_target = None
    ops = ins.operands
    for i, op in enumerate(ops):
        if op.type == X.X86_OP_MEM:
            for reg in (op.mem.base, op.mem.index):
                if reg and reg != X.X86_REG_RIP:
                    bases.add(reg64(ins.reg_name(reg)))
                    if op.access & capstone.CS_AC_WRITE:
                        wbases.add(reg64(ins.reg_name(reg)))
            if op.mem.base == X.X86_REG_RIP:
                rip_target = ins.address + ins.size + op.mem.disp
    is_call = ins.id == X.X86_INS_CALL
    is_jmp = ins.id == X.X86_INS_JMP
    is_jcc = ins.id in _JCC
    if (is_call or is_jmp or is_jcc) and ops and ops[0].type == X.X86_OP_IMM:
        branch_target = ops[0].imm
    if ins.id == X.X86_INS_MOV and len(ops) == 2 and ops[0].type == X.X86_OP_REG and ops[1].type == X.X86_OP_IMM:
        imm_to_reg = (reg64(ins.reg_name(ops[0].reg)), ops[1].imm)
        rip_target = rip_target if rip_target is not None else ops[1].imm
    elif (
        ins.id == X.X86_INS_XOR
        and len(ops) == 2
        and ops[0].type == X.X86_OP_REG
        and ops[1].type == X.X86_OP_REG
        and ops[0].reg == ops[1].reg
    ):
        imm_to_reg = (reg64(ins.reg_name(ops[0].reg)), 0)
        reads.discard(reg64(ins.reg_name(ops[0].reg)))  # xor r, r reads nothing
    if ins.id == X.X86_INS_LEA and rip_target is not None and ops[0].type == X.X86_OP_REG:
        imm_to_reg = (reg64(ins.reg_name(ops[0].reg)), rip_target)
    reads.discard("rflags")
    writes.discard("rflags")
    return Insn(
        ins.address,
        ins.size,
        ins.mnemonic,
        ins.op_str,
        ins.id,
        frozenset(reads),
        frozenset(writes),
        frozenset(bases),
        frozenset(wbases),
        imm_to_reg,
        branch_target,
        is_call,
        is_jmp,
        is_jcc,
        ins.id == X.X86_INS_RET,
        rip_target,
    )


# bytes handed to capstone at a time: it decodes a whole buffer up front, and callers often stop early
_DECODE_CHUNK = 512
_MAX_INSN = 15


def decode_linear(img: Image, start: int, limit: int) -> Iterator[Insn]:
    """Instructions from `start` until `limit` bytes or the first byte capstone cannot decode."""
    pos, end = start, start + limit
    while pos < end:
        code = img.bytes_at(pos, min(_DECODE_CHUNK + _MAX_INSN, end - pos))
        if not code:
            return
        last_end = pos
        for ins in _MD.disasm(code, pos):
            if ins.address >= pos + _DECODE_CHUNK:
                break  # decoded again from here, with the bytes that follow
            yield _convert(ins)
            last_end = ins.address + ins.size
        if last_end == pos or last_end < pos + min(_DECODE_CHUNK, end - pos) and last_end + _MAX_INSN <= end:
            return  # capstone stopped: undecodable bytes
        pos = last_end


def _is_padding(ins: Insn) -> bool:
    return ins.id in (X.X86_INS_INT3, X.X86_INS_NOP)


@dataclass
class Function:
    """One function decoded linearly from its entry up to where its code provably ends."""

    start: int
    insns: list[Insn]
    by_addr: dict[int, int] = field(default_factory=dict)  # address -> index
    jump_targets: set[int] = field(default_factory=set)

    @property
    def end(self) -> int:
        return self.insns[-1].end if self.insns else self.start

    def contains(self, va: int) -> bool:
        return self.start <= va < self.end

    def at(self, va: int) -> Insn | None:
        i = self.by_addr.get(va)
        return None if i is None else self.insns[i]

    def calls(self) -> list[Insn]:
        return [i for i in self.insns if i.is_call]


def decode_function(img: Image, start: int, stop_at: int | None = None) -> Function | None:
    """Decode from `start` and stop at the function's end.

    The end is the first unconditional exit (ret, jmp, int3/ud2, or a call
    followed only by padding) past which no jump of this function lands. A
    branch target outside the decoded range is allowed (shared cold code,
    tail calls). `stop_at` (the next known function entry) caps the range.
    Returns None when the bytes do not decode as a function.
    """
    limit = MAX_FUNCTION_BYTES if stop_at is None else min(MAX_FUNCTION_BYTES, stop_at - start)
    if limit <= 0:
        return None
    insns: list[Insn] = []
    furthest = start
    fn = Function(start, insns)
    expect = start
    for ins in decode_linear(img, start, limit):
        if ins.address != expect:
            break
        expect = ins.end
        if ins.id == X.X86_INS_INT3 and ins.address >= furthest:
            break
        insns.append(ins)
        if ins.branch_target is not None and not ins.is_call:
            fn.jump_targets.add(ins.branch_target)
            if start <= ins.branch_target < start + limit:
                furthest = max(furthest, ins.branch_target)
        exits = ins.is_ret or ins.is_jmp or ins.id == X.X86_INS_UD2
        if exits and ins.end > furthest:
            break
        if ins.is_call and ins.end > furthest and _only_padding_after(img, ins.end):
            break  # a call that never returns (abort, __stack_chk_fail) ends the function
    else:
        if not insns:
            return None
    if not insns:
        return None
    fn.by_addr = {ins.address: k for k, ins in enumerate(insns)}
    return fn


def _only_padding_after(img: Image, va: int) -> bool:
    """True when `va` is followed by int3, or by nops up to a 16-byte boundary (or nothing)."""
    if va % 16 == 0:
        return False  # undecidable: a function's code may go straight on
    code = img.bytes_at(va, 32)
    pos = va
    for ins in _MD.disasm(code, va):
        if ins.id == X.X86_INS_INT3:
            return True
        if ins.id != X.X86_INS_NOP:
            return False
        pos += ins.size
        if pos % 16 == 0:
            return True
    return False


def arg_regs_read(
    fn: Function, call_reads: dict[int, frozenset[str]] | None = None, max_states: int = 4096
) -> set[str]:
    """Argument registers some path reads before anything writes them: the arguments the function uses.

    Walks the CFG from the entry; a call clobbers the caller-saved registers.
    `call_reads` names the argument registers known callees read (a wrapper
    passes its arguments straight on).
    """
    call_reads = call_reads or {}
    seen: set[tuple[int, frozenset[str]]] = set()
    used: set[str] = set()
    work: list[tuple[int, frozenset[str]]] = [(0, frozenset())]
    args = frozenset(ARG_REGS)
    while work and len(seen) < max_states:
        idx, written = work.pop()
        if (idx, written) in seen:
            continue
        seen.add((idx, written))
        while idx < len(fn.insns):
            ins = fn.insns[idx]
            used |= (ins.reads & args) - written
            if ins.is_call and ins.branch_target in call_reads:
                used |= call_reads[ins.branch_target] - written
            if ins.is_call:
                written = written | CALLER_SAVED
            else:
                written = written | (ins.writes & args)
            if ins.is_ret or ins.id == X.X86_INS_UD2:
                break
            t = ins.branch_target
            if ins.is_jcc and t is not None and t in fn.by_addr:
                work.append((fn.by_addr[t], written))
            if ins.is_jmp:
                if t is not None and t in fn.by_addr:
                    idx = fn.by_addr[t]
                    continue
                break
            idx += 1
    return used


_NOPS = (
    b"\x90",
    b"\x66\x90",
    b"\x0f\x1f\x00",
    b"\x0f\x1f\x40\x00",
    b"\x0f\x1f\x44\x00\x00",
    b"\x66\x0f\x1f\x44\x00\x00",
    b"\x0f\x1f\x80\x00\x00\x00\x00",
    b"\x0f\x1f\x84\x00\x00\x00\x00\x00",
    b"\x66\x0f\x1f\x84\x00\x00\x00\x00\x00",
    b"\x66\x2e\x0f\x1f\x84\x00\x00\x00\x00\x00",
)


def looks_like_entry(img: Image, va: int) -> bool:
    """Padding before `va`: int3 fill (clang's default), or a 16-aligned `va` after nop padding or an exit."""
    before = img.bytes_at(va - 16, 16)
    if len(before) < 16 or not img.is_code(va):
        return False
    if before[-1] == 0xCC:
        return True
    if va % 16:
        return False
    # no padding: the code before ends with an unconditional exit (ret, jmp, ud2, a noreturn call)
    if before[-1] == 0xC3 or before[-2] == 0xEB or before[-2:] == b"\x0f\x0b" or before[-5] in (0xE8, 0xE9):
        return True
    # nop padding: 0x66 prefixes may repeat in front of the long nop
    return any(before.endswith(n) for n in _NOPS)
