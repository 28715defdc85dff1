"""Find SSL_write / SSL_read in an executable that links BoringSSL statically and has no SSL_* symbols.

Bun and Claude Code (a Bun-built single file) are such executables. Offsets
change with every build, so nothing here is keyed by version or hash; we use
facts of BoringSSL's source that survive rebuilds:

1. Every OPENSSL_PUT_ERROR(SSL, reason) in ssl/ssl_lib.cc passes the file name
   string "…/ssl_lib.cc" to the error function, next to the library code
   ERR_LIB_SSL and a reason code. Reason codes are stable (ssl.h says they are
   never renumbered).
2. The arguments keep their order but not their registers: older builds call
   ERR_put_error(lib, 0, reason, file, line) (file in RCX), LTO builds drop the
   unused argument (file in RDX). So the reason is the argument just before the
   file name, whatever register that is.
3. SSL_write raises UNINITIALIZED, SSL_HANDSHAKE_FAILURE and BAD_LENGTH;
   no other function in ssl_lib.cc raises all three.
   ssl_read_impl raises UNINITIALIZED and SSL_HANDSHAKE_FAILURE (not
   BAD_LENGTH); SSL_peek raises SHOULD_NOT_HAVE_BEEN_CALLED and calls it;
   SSL_read is SSL_peek plus consuming the data (it stores into ssl->s3),
   with SSL_peek inlined or called.

Every candidate is verified before it is returned: it is the target of direct
calls, starts on a function boundary, and its code reads RDI (dereferenced,
the SSL*), RSI and EDX as arguments and no 4th argument. Anything ambiguous
gives Uncovered with the reason: a uprobe at a wrong offset can corrupt the
traced program.

Results are cached on disk per (dev, ino, size, mtime): analysing a 245 MB
executable takes seconds, and every new `claude` process maps the same file.
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from llmspyd.chunks import Stack
from llmspyd.discovery import x86code
from llmspyd.discovery.target import Target, Uncovered
from llmspyd.discovery.x86code import ARG_REGS, CALL_REL32, LEA_RIP, Function, Image

# BoringSSL include/openssl/err.h and ssl.h: stable numbers
ERR_LIB_SSL = 16
ERR_R_SHOULD_NOT_HAVE_BEEN_CALLED = 66  # 2 | ERR_R_FATAL
SSL_R_BAD_LENGTH = 111
SSL_R_SSL_HANDSHAKE_FAILURE = 215
SSL_R_UNINITIALIZED = 226

WRITE_REASONS = frozenset({SSL_R_UNINITIALIZED, SSL_R_SSL_HANDSHAKE_FAILURE, SSL_R_BAD_LENGTH})
READ_IMPL_REASONS = frozenset({SSL_R_UNINITIALIZED, SSL_R_SSL_HANDSHAKE_FAILURE})

# reasons of the functions we look at; None: the quick look could not tell
RELEVANT_OR_UNKNOWN = frozenset(
    {ERR_R_SHOULD_NOT_HAVE_BEEN_CALLED, SSL_R_BAD_LENGTH, SSL_R_SSL_HANDSHAKE_FAILURE, SSL_R_UNINITIALIZED, None}
)

FILE_NAME = b"ssl_lib.cc"
# how far before an error site its function may start: SSL_write/ssl_read_impl are < 2 KiB,
# but we must also see the entries of the other functions in ssl_lib.cc that raise errors
MAX_SITE_DEPTH = 0x3000
# registers a function's body may use as memory base without touching the heap
_STACK_REGS = frozenset({"rsp", "rbp"})

CACHE_ENV = "LLMSPY_CACHE_DIR"
DEFAULT_CACHE_DIR = "/var/cache/llmspyd"
CACHE_FILE = "boringssl.json"
# bump when the analysis changes, so old cached verdicts are not reused
ANALYSIS_VERSION = 2
# rustls' crate path in panic locations ("…/rustls-0.23.46/src/…"): a rustls build whatever its version
RUSTLS_MARK = b"/rustls-0."
RUSTLS_REASON = (
    "rustls (Rust, static, no TLS symbols): not covered: rustls' plaintext read/write are generic Rust"
    " inlined per build, and its AEAD (ring or aws-lc) sees records without a connection identity"
)
# files remembered in the cache; the oldest go first (each agent update adds one)
MAX_CACHE_ENTRIES = 256


@dataclass(slots=True)
class ErrorSite:
    at: int  # vaddr of the instruction loading the file name
    lib: int | None
    reason: int | None
    file_reg: str


@dataclass
class Analysis:
    """What the fingerprint found in one file; `offsets` is empty when `reason` says why."""

    offsets: dict[str, list[int]] = field(default_factory=dict)
    reason: str = ""
    boringssl: bool = True
    rustls: bool = False  # no BoringSSL, but a Rust program with rustls compiled in
    seconds: float = 0.0
    vaddrs: dict[str, int] = field(default_factory=dict)
    sites: int = 0  # error sites that reference ssl_lib.cc
    functions: int = 0  # functions those sites belong to
    entries: str = ""  # how function entries were found: "int3 padding" (fast) or "call targets"


# ---------------------------------------------------------------------------
# public entry


NOT_CACHED = object()


def cached_target(path: str, dev: int, ino: int) -> Target | Uncovered | None | object:
    """What boringssl_target would answer, from the on-disk cache only (no analysis); NOT_CACHED if unknown.

    For callers that must not block on an analysis (exec handling): when this is NOT_CACHED, run
    boringssl_target in the background.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    cached = _cache_get(_cache_key(dev, ino, st))
    return NOT_CACHED if cached is None else _answer(path, dev, ino, cached)


def _cache_key(dev: int, ino: int, st: os.stat_result) -> str:
    return f"{dev}:{ino}:{st.st_size}:{st.st_mtime_ns}"


def boringssl_target(path: str, dev: int, ino: int) -> Target | Uncovered | None:
    """Probe offsets of SSL_write/SSL_read in `path`, Uncovered with a reason, or None when it has no BoringSSL."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = _cache_key(dev, ino, st)
    cached = _cache_get(key)
    if cached is None:
        try:
            a = analyse(path)
        except (OSError, ValueError) as e:
            a = Analysis(reason=f"cannot analyse: {e}", boringssl=False)
        cached = {
            "boringssl": a.boringssl,
            "rustls": a.rustls,
            "offsets": a.offsets,
            "reason": a.reason,
            "seconds": round(a.seconds, 3),
            "at": int(time.time()),
        }
        _cache_put(key, cached)
    return _answer(path, dev, ino, cached)


def _answer(path: str, dev: int, ino: int, cached: dict) -> Target | Uncovered | None:
    if cached.get("rustls"):
        return Uncovered(path=path, dev=dev, ino=ino, stack=Stack.RUSTLS, reason=RUSTLS_REASON)
    if not cached["boringssl"]:
        return None
    if cached["offsets"]:
        return Target(
            path=path, dev=dev, ino=ino, stack=Stack.BORINGSSL, offsets=dict(cached["offsets"]), how="fingerprint"
        )
    return Uncovered(path=path, dev=dev, ino=ino, stack=Stack.BORINGSSL, reason=f"boringssl: {cached['reason']}")


def analyse(path: str) -> Analysis:
    t0 = time.monotonic()
    with Image.open(path) as img:
        a = _analyse(img)
    a.seconds = time.monotonic() - t0
    return a


# ---------------------------------------------------------------------------
# analysis


def _analyse(img: Image) -> Analysis:
    strings = find_file_strings(img)
    if not strings:
        return Analysis(boringssl=False, rustls=_has_rustls(img), reason="no ssl_lib.cc")
    refs: list[int] = []
    for s in strings:
        refs += [va for va, _ in x86code.find_rel32_refs(img, (s, s + 1), LEA_RIP)]
        refs += x86code.find_abs32_refs(img, s)
    if not refs:
        # the string is there but no code uses it: BoringSSL text without its SSL layer
        return Analysis(reason="ssl_lib.cc is never referenced by code")
    # only the functions that raise these reasons matter: skip finding the entries of the others
    relevant = [r for r in refs if _quick_reason(img, r, set(strings)) in RELEVANT_OR_UNKNOWN]
    # fast: function entries from int3 padding (clang's default); else from every direct call into the area
    a = _classify(img, strings, _functions_by_padding(img, relevant), None)
    a.entries = "int3 padding"
    if not a.offsets:
        entries = _call_targets_near(img, relevant)
        a = _classify(img, strings, _functions_of(img, relevant, entries), entries)
        a.entries = "call targets"
    return a


def _classify(
    img: Image, strings: list[int], functions: dict[int, Function], entries: dict[int, list[int]] | None
) -> Analysis:
    """Recognise SSL_write and SSL_read among `functions` by the errors they raise, and verify them."""
    sites: dict[int, list[ErrorSite]] = defaultdict(list)
    string_set = set(strings)
    for fn in functions.values():
        for ins in fn.insns:
            if ins.imm_to_reg is not None and ins.imm_to_reg[1] in string_set:
                site = error_site(fn, ins.address)
                if site is not None:
                    sites[fn.start].append(site)
    a = Analysis(sites=sum(len(v) for v in sites.values()), functions=len(sites))
    reasons = {f: {s.reason for s in v if s.lib == ERR_LIB_SSL and s.reason is not None} for f, v in sites.items()}

    write = [f for f, r in reasons.items() if WRITE_REASONS <= r]
    read_impl = [f for f, r in reasons.items() if READ_IMPL_REASONS <= r and SSL_R_BAD_LENGTH not in r]
    why: list[str] = []
    w = _pick_write(img, functions, write, why)
    r = _pick_read(img, functions, entries or {}, reasons, read_impl, why)
    if w is None or r is None:
        a.reason = "; ".join(why) or "not found"
        return a
    for role, va in (("SSL_write", w), ("SSL_read", r)):
        off = img.va_to_offset(va)
        if off is None:
            a.reason = f"{role} at {va:#x} is outside the file"
            return a
        a.offsets[role] = [off]
        a.vaddrs[role] = va
    return a


def _has_rustls(img: Image) -> bool:
    for seg in img.segments:
        if not seg.flags & x86code.PF_X and img.data.find(RUSTLS_MARK, seg.offset, seg.offset + seg.filesz) != -1:
            return True
    return False


def find_file_strings(img: Image) -> list[int]:
    """Vaddrs of the NUL-terminated strings ending in ssl_lib.cc (the __FILE__ of ssl/ssl_lib.cc)."""
    out = []
    m = img.data
    ro = img.sections.get(".rodata")
    # .rodata when the section table says where it is (a Bun executable carries 100+ MB of JS besides)
    areas = [(ro.offset, ro.offset + ro.size, ro.addr)] if ro is not None and ro.size else [
        (seg.offset, seg.offset + seg.filesz, seg.vaddr) for seg in img.segments if not seg.flags & x86code.PF_X
    ]
    for area, end, vaddr in areas:
        q = m.find(FILE_NAME + b"\0", area, end)
        while q != -1:
            if q == area or m[q - 1] in (0, ord("/")):
                s = q
                while s > area and m[s - 1] != 0 and q - s < 4096:
                    s -= 1
                out.append(s - area + vaddr)
            q = m.find(FILE_NAME + b"\0", q + 1, end)
    return out


def _call_targets_near(img: Image, refs: list[int]) -> dict[int, list[int]]:
    """Direct call targets (function entries) up to MAX_SITE_DEPTH before any ref, with their callers."""
    ranges: list[list[int]] = []
    for r in sorted(refs):
        lo, hi = r - MAX_SITE_DEPTH, r + 1
        if ranges and lo <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], hi)
        else:
            ranges.append([lo, hi])
    entries: dict[int, list[int]] = defaultdict(list)
    for caller, target in x86code.find_rel32_refs(img, [(lo, hi) for lo, hi in ranges], CALL_REL32):
        entries[target].append(caller)
    return entries


def _functions_by_padding(img: Image, refs: list[int]) -> dict[int, Function]:
    """The function containing each ref, its entry found by walking back to int3 padding before a 16-byte boundary.

    A boundary inside a function (int3 after a call that does not return, then an aligned block) is
    rejected when the function decoded from the previous padded boundary runs past it.
    """
    out: dict[int, Function] = {}
    decoded: dict[int, Function | None] = {}

    def fn_at(a: int) -> Function | None:
        if a not in decoded:
            decoded[a] = x86code.decode_function(img, a)
        return decoded[a]

    def padded(a: int) -> bool:
        return img.bytes_at(a - 1, 1) == b"\xcc"

    for r in refs:
        a = r & ~0xF
        while r - a <= MAX_SITE_DEPTH:
            if padded(a):
                fn = fn_at(a)
                if fn is None or fn.at(r) is None:
                    break  # the nearest padded boundary does not reach the ref: leave it to the slow path
                prev = a - 16
                while a - prev <= MAX_SITE_DEPTH and not padded(prev):
                    prev -= 16
                before = fn_at(prev) if padded(prev) else None
                if before is not None and before.end > a:
                    a = prev  # `a` is inside the function before it
                    continue
                out[a] = fn
                break
            a -= 16
    return out


def _functions_of(img: Image, refs: list[int], entries: dict[int, list[int]]) -> dict[int, Function]:
    """The function containing each ref: the nearest entry-like call target before it whose code reaches it.

    A call target alone is not proof of an entry: bytes inside other instructions
    can look like a call to anywhere in a 12 KiB range (a few per scan of 100 MB),
    so the target must also look like a function start.
    """
    starts = sorted(s for s in entries if x86code.looks_like_entry(img, s))
    out: dict[int, Function] = {}
    for r in refs:
        i = bisect.bisect_right(starts, r) - 1
        while i >= 0 and r - starts[i] <= MAX_SITE_DEPTH:
            s = starts[i]
            if s not in out:
                fn = x86code.decode_function(img, s)
                if fn is None:
                    i -= 1
                    continue
                out[s] = fn
            if out[s].at(r) is not None:
                break
            i -= 1
    return {s: f for s, f in out.items() if any(f.at(r) is not None for r in refs)}


def _quick_reason(img: Image, at: int, strings: set[int]) -> int | None:
    """The reason code of the error call at `at`, from the straight line after it; None when not that simple."""
    insns = list(x86code.decode_linear(img, at, 64))
    if not insns or insns[0].imm_to_reg is None or insns[0].imm_to_reg[1] not in strings:
        return None
    file_reg = insns[0].imm_to_reg[0]
    if file_reg not in ARG_REGS or ARG_REGS.index(file_reg) < 2:
        return None
    reason_reg = ARG_REGS[ARG_REGS.index(file_reg) - 1]
    reason: int | None = None
    for x in insns[1:]:
        if x.is_call or x.is_jmp:
            return reason
        if x.is_jcc or x.is_ret:
            return None
        if reason_reg in x.writes:
            reason = x.imm_to_reg[1] if x.imm_to_reg is not None and x.imm_to_reg[0] == reason_reg else None
    return None


def error_site(fn: Function, at: int) -> ErrorSite | None:
    """Decode the error call around the instruction at `at` that loads the file name into an argument register."""
    k = fn.by_addr.get(at)
    if k is None:
        return None
    ins = fn.insns[k]
    assert ins.imm_to_reg is not None
    file_reg = ins.imm_to_reg[0]
    if file_reg not in ARG_REGS or ARG_REGS.index(file_reg) < 2:
        return None
    idx = ARG_REGS.index(file_reg)
    wanted = {ARG_REGS[0]: "lib", ARG_REGS[idx - 1]: "reason"}
    values: dict[str, int | None] = {}
    # forward to the call (possibly through one jmp to a shared call)
    j, hops = k + 1, 0
    while j < len(fn.insns):
        x = fn.insns[j]
        if x.is_call:
            break
        if x.is_jmp:
            t = x.branch_target
            if hops or t is None or t not in fn.by_addr:
                break
            j, hops = fn.by_addr[t], 1
            continue
        if x.is_jcc or x.is_ret:
            return None  # not a straight line to a call: not an error call
        _note(values, x, wanted)
        j += 1
    else:
        return None
    # backward to the start of the block
    j = k
    while j > 0 and fn.insns[j].address not in fn.jump_targets:
        x = fn.insns[j - 1]
        if x.is_call or x.is_jmp or x.is_jcc or x.is_ret:
            break
        _note(values, x, wanted, overwrite=False)
        j -= 1
    return ErrorSite(at, values.get("lib"), values.get("reason"), file_reg)


def _note(values: dict[str, int | None], x: x86code.Insn, wanted: dict[str, str], overwrite: bool = True) -> None:
    for reg in x.writes:
        role = wanted.get(reg)
        if role is None or (not overwrite and role in values):
            continue
        if x.imm_to_reg is not None and x.imm_to_reg[0] == reg:
            values[role] = x.imm_to_reg[1]
        else:
            values[role] = None


# ---------------------------------------------------------------------------
# recognising and verifying


def _pick_write(img: Image, functions: dict[int, Function], cands: list[int], why: list[str]) -> int | None:
    ok = [f for f in cands if _verify_entry(img, functions[f], why, "SSL_write")]
    if len(ok) == 1:
        return ok[0]
    if not cands:
        why.append("no function raises UNINITIALIZED+SSL_HANDSHAKE_FAILURE+BAD_LENGTH (SSL_write)")
    elif len(ok) > 1:
        why.append(f"{len(ok)} SSL_write candidates: " + ", ".join(f"{f:#x}" for f in ok))
    return None


def _pick_read(
    img: Image,
    functions: dict[int, Function],
    entries: dict[int, list[int]],
    reasons: dict[int, set[int]],
    read_impl: list[int],
    why: list[str],
) -> int | None:
    impl = set(read_impl)
    peekish = []
    for f, r in reasons.items():
        if ERR_R_SHOULD_NOT_HAVE_BEEN_CALLED not in r or SSL_R_BAD_LENGTH in r:
            continue
        calls = {c.branch_target for c in functions[f].calls()}
        if calls & impl or READ_IMPL_REASONS <= r:
            peekish.append(f)
    if not peekish:
        why.append("no SSL_peek/SSL_read shape (SHOULD_NOT_HAVE_BEEN_CALLED + ssl_read_impl)")
        return None
    # SSL_read = SSL_peek + consuming ssl->s3->pending_app_data: it stores to the heap, SSL_peek does not
    # (ssl_read_impl itself, if it raises SHOULD_NOT_HAVE_BEEN_CALLED too, takes one argument: _verify_entry drops it)
    consuming = [f for f in peekish if _stores_to_heap(functions[f])]
    ok = [f for f in consuming if _verify_entry(img, functions[f], why, "SSL_read")]
    if not ok:
        # SSL_peek not inlined: SSL_read is a wrapper with no error of its own that calls it with its own arguments
        ok = [q for f in peekish for q in _wrappers_of(img, f, entries, why)]
    if len(ok) == 1:
        return ok[0]
    if not ok:
        why.append("no SSL_read among SSL_peek-shaped functions " + ", ".join(f"{f:#x}" for f in peekish))
    else:
        why.append(f"{len(ok)} SSL_read candidates: " + ", ".join(f"{f:#x}" for f in ok))
    return None


def _wrappers_of(img: Image, callee: int, entries: dict[int, list[int]], why: list[str]) -> list[int]:
    """Functions that call `callee` first thing, with RDI/RSI/RDX untouched, and then store to the heap."""
    callers = entries.get(callee, [])
    near = _call_targets_near(img, callers)
    out = []
    for start, fn in _functions_of(img, callers, near).items():
        for ins in fn.insns:
            if ins.is_call:
                if ins.branch_target == callee:
                    break
                fn = None  # another call first
                break
            if ins.is_jcc or ins.is_jmp or ins.is_ret or ins.writes & {"rdi", "rsi", "rdx"}:
                fn = None  # arguments changed or not a straight line to the call
                break
        else:
            fn = None
        if fn is not None and _stores_to_heap(fn) and _verify_entry(img, fn, why, "SSL_read", passes_to=callee):
            out.append(start)
    return out


def _stores_to_heap(fn: Function) -> bool:
    return any(ins.mem_write_bases - _STACK_REGS for ins in fn.insns if not ins.is_call)


def _verify_entry(img: Image, fn: Function, why: list[str], role: str, passes_to: int | None = None) -> bool:
    """The dry check before a probe goes here: a real entry taking (SSL *ssl, void *buf, int num)."""
    start = fn.start
    if start % 16 != 0:
        prev = img.bytes_at(start - 1, 1)
        if prev not in (b"\xcc", b"\xc3", b"\x90"):
            why.append(f"{role} candidate {start:#x}: not on a function boundary")
            return False
    if x86code.first_rel32_ref(img, start, CALL_REL32) is None:
        why.append(f"{role} candidate {start:#x}: no direct call to it")
        return False
    first = fn.insns[0]
    if first.mnemonic in ("int3", "nop", "ud2") or first.mnemonic.startswith("j"):
        why.append(f"{role} candidate {start:#x}: starts with {first.mnemonic}")
        return False
    three = frozenset({"rdi", "rsi", "rdx"})
    used = x86code.arg_regs_read(fn, {passes_to: three} if passes_to is not None else None)
    if not {"rdi", "rsi", "rdx"} <= used:
        why.append(f"{role} candidate {start:#x}: reads args {sorted(used)}, not (ssl, buf, num)")
        return False
    if used & {"rcx", "r8", "r9"}:
        why.append(f"{role} candidate {start:#x}: reads more than 3 args {sorted(used)}")
        return False
    if not _derefs_first_arg(fn):
        why.append(f"{role} candidate {start:#x}: RDI (SSL *) is never dereferenced")
        return False
    return True


def _derefs_first_arg(fn: Function, window: int = 48) -> bool:
    """RDI, or a register it was copied to, is used as a memory base early in the function."""
    aliases = {"rdi"}
    for ins in fn.insns[:window]:
        if ins.mem_bases & aliases:
            return True
        if ins.is_call:
            aliases -= x86code.CALLER_SAVED
            if not aliases:
                return False
        elif ins.mnemonic == "mov" and ins.reads & aliases and len(ins.writes) == 1 and not ins.mem_bases:
            aliases |= ins.writes
        else:
            aliases -= ins.writes
    return False


# ---------------------------------------------------------------------------
# cache

_cache_lock = threading.Lock()


def cache_path() -> str:
    return os.path.join(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR, CACHE_FILE)


def _cache_load() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != ANALYSIS_VERSION:
        return {}
    return data


def _cache_get(key: str) -> dict | None:
    with _cache_lock:
        entry = _cache_load().get("files", {}).get(key)
    if isinstance(entry, dict) and {"boringssl", "offsets", "reason"} <= entry.keys():
        return entry
    return None


def _cache_put(key: str, entry: dict) -> None:
    """Best effort: a read-only cache directory only costs a re-analysis next time."""
    with _cache_lock:
        data = _cache_load()
        data["version"] = ANALYSIS_VERSION
        files = data.setdefault("files", {})
        files[key] = entry
        if len(files) > MAX_CACHE_ENTRIES:
            for old in sorted(files, key=lambda k: files[k].get("at", 0))[: len(files) - MAX_CACHE_ENTRIES]:
                del files[old]
        path = cache_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".boringssl.")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass
