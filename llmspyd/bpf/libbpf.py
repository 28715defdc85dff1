"""Our own ctypes binding over the system libbpf.so.1 (Debian libbpf 1.1.x).

Only what llmspyd needs: open/load objects, set `const volatile` knobs before
load, share maps between objects, attach tracepoints and uprobes, read and
write maps, and consume BPF ring buffers. Every signature and `*_opts` layout
below was checked against /usr/include/bpf/{libbpf,bpf,btf}.h of libbpf 1.1.2.

libbpf 1.x conventions: functions returning a pointer return NULL and set
errno; functions returning int return a negative errno. Both become
LibbpfError, whose message names what failed and the errno.

Lifetime: BpfMap and BpfProgram are views into their BpfObject and must not be
used after it is closed. A Link owns its attachment independently of the
object and stays attached until destroy().
"""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

LIBBPF_SONAME = "libbpf.so.1"

# enum libbpf_print_level
LIBBPF_WARN = 0
LIBBPF_INFO = 1
LIBBPF_DEBUG = 2

# linux/btf.h
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15

# linux/bpf.h map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# enum bpf_map_type values we name in checks
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH})


class LibbpfError(OSError):
    """A libbpf call failed. `errno` is set; the message names what failed."""

    def __init__(self, err: int, what: str) -> None:
        err = abs(err) or _errno.EINVAL
        name = _errno.errorcode.get(err, str(err))
        super().__init__(err, f"{what}: {name} ({os.strerror(err)})")
        self.what = what

    def __str__(self) -> str:
        return self.args[1]


# --- raw declarations ------------------------------------------------------

_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_size_t = ctypes.c_size_t


class _BpfObjectOpenOpts(ctypes.Structure):
    # struct bpf_object_open_opts (libbpf 1.1.2)
    _fields_ = [
        ("sz", _size_t),
        ("object_name", _c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", _c_char_p),
        ("_unused_attach_prog_fd", ctypes.c_uint32),  # was attach_prog_fd, kept for layout
        ("kconfig", _c_char_p),
        ("btf_custom_path", _c_char_p),
        ("kernel_log_buf", _c_char_p),
        ("kernel_log_size", _size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class _BpfUprobeOpts(ctypes.Structure):
    # struct bpf_uprobe_opts (libbpf 1.1.2); `size_t :0` adds no bytes
    _fields_ = [
        ("sz", _size_t),
        ("ref_ctr_offset", _size_t),
        ("bpf_cookie", ctypes.c_uint64),
        ("retprobe", ctypes.c_bool),
        ("func_name", _c_char_p),
    ]


class _RingBufferOpts(ctypes.Structure):
    _fields_ = [("sz", _size_t)]


class _BtfType(ctypes.Structure):
    # struct btf_type; `size` and `type` share the last word
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _c_char_p, _c_void_p)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _c_void_p, _c_void_p, _size_t)


def _fn(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


class _Lib:
    """The libbpf functions we use, with their C signatures."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
        libc = ctypes.CDLL(None, use_errno=True)
        # vasprintf: a verifier log arrives as one message of any length
        self.vasprintf = _fn(libc, "vasprintf", ctypes.c_int, ctypes.POINTER(_c_void_p), _c_char_p, _c_void_p)
        self.free = _fn(libc, "free", None, _c_void_p)
        self.set_print = _fn(lib, "libbpf_set_print", _c_void_p, _PRINT_FN)
        self.num_possible_cpus = _fn(lib, "libbpf_num_possible_cpus", ctypes.c_int)
        # object
        self.obj_open_file = _fn(lib, "bpf_object__open_file", _c_void_p, _c_char_p, ctypes.POINTER(_BpfObjectOpenOpts))
        self.obj_load = _fn(lib, "bpf_object__load", ctypes.c_int, _c_void_p)
        self.obj_close = _fn(lib, "bpf_object__close", None, _c_void_p)
        self.obj_btf = _fn(lib, "bpf_object__btf", _c_void_p, _c_void_p)
        self.obj_name = _fn(lib, "bpf_object__name", _c_char_p, _c_void_p)
        self.obj_find_map = _fn(lib, "bpf_object__find_map_by_name", _c_void_p, _c_void_p, _c_char_p)
        self.obj_next_map = _fn(lib, "bpf_object__next_map", _c_void_p, _c_void_p, _c_void_p)
        self.obj_find_prog = _fn(lib, "bpf_object__find_program_by_name", _c_void_p, _c_void_p, _c_char_p)
        self.obj_next_prog = _fn(lib, "bpf_object__next_program", _c_void_p, _c_void_p, _c_void_p)
        # map
        self.map_name = _fn(lib, "bpf_map__name", _c_char_p, _c_void_p)
        self.map_fd = _fn(lib, "bpf_map__fd", ctypes.c_int, _c_void_p)
        self.map_type = _fn(lib, "bpf_map__type", ctypes.c_int, _c_void_p)
        self.map_key_size = _fn(lib, "bpf_map__key_size", ctypes.c_uint32, _c_void_p)
        self.map_value_size = _fn(lib, "bpf_map__value_size", ctypes.c_uint32, _c_void_p)
        self.map_max_entries = _fn(lib, "bpf_map__max_entries", ctypes.c_uint32, _c_void_p)
        self.map_set_max_entries = _fn(lib, "bpf_map__set_max_entries", ctypes.c_int, _c_void_p, ctypes.c_uint32)
        self.map_reuse_fd = _fn(lib, "bpf_map__reuse_fd", ctypes.c_int, _c_void_p, ctypes.c_int)
        self.map_is_internal = _fn(lib, "bpf_map__is_internal", ctypes.c_bool, _c_void_p)
        self.map_initial_value = _fn(lib, "bpf_map__initial_value", _c_void_p, _c_void_p, ctypes.POINTER(_size_t))
        self.map_set_initial_value = _fn(lib, "bpf_map__set_initial_value", ctypes.c_int, _c_void_p, _c_void_p, _size_t)
        # map syscalls (bpf.h)
        self.map_lookup_elem = _fn(lib, "bpf_map_lookup_elem", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p)
        self.map_update_elem = _fn(
            lib, "bpf_map_update_elem", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p, ctypes.c_uint64
        )
        self.map_delete_elem = _fn(lib, "bpf_map_delete_elem", ctypes.c_int, ctypes.c_int, _c_void_p)
        self.map_get_next_key = _fn(lib, "bpf_map_get_next_key", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p)
        # program
        self.prog_name = _fn(lib, "bpf_program__name", _c_char_p, _c_void_p)
        self.prog_section = _fn(lib, "bpf_program__section_name", _c_char_p, _c_void_p)
        self.prog_fd = _fn(lib, "bpf_program__fd", ctypes.c_int, _c_void_p)
        self.prog_set_autoload = _fn(lib, "bpf_program__set_autoload", ctypes.c_int, _c_void_p, ctypes.c_bool)
        self.prog_autoload = _fn(lib, "bpf_program__autoload", ctypes.c_bool, _c_void_p)
        self.prog_set_expected_attach_type = _fn(
            lib, "bpf_program__set_expected_attach_type", ctypes.c_int, _c_void_p, ctypes.c_int
        )
        self.syscall = libc.syscall
        self.syscall.restype = ctypes.c_long
        self.prog_attach = _fn(lib, "bpf_program__attach", _c_void_p, _c_void_p)
        self.prog_attach_uprobe_opts = _fn(
            lib,
            "bpf_program__attach_uprobe_opts",
            _c_void_p,
            _c_void_p,
            ctypes.c_int,
            _c_char_p,
            _size_t,
            ctypes.POINTER(_BpfUprobeOpts),
        )
        self.link_destroy = _fn(lib, "bpf_link__destroy", ctypes.c_int, _c_void_p)
        # BTF
        self.btf_find_by_name_kind = _fn(lib, "btf__find_by_name_kind", ctypes.c_int32, _c_void_p, _c_char_p, ctypes.c_uint32)
        self.btf_type_by_id = _fn(lib, "btf__type_by_id", ctypes.POINTER(_BtfType), _c_void_p, ctypes.c_uint32)
        self.btf_name_by_offset = _fn(lib, "btf__name_by_offset", _c_char_p, _c_void_p, ctypes.c_uint32)
        self.btf_type_cnt = _fn(lib, "btf__type_cnt", ctypes.c_uint32, _c_void_p)
        # ring buffer
        self.rb_new = _fn(
            lib, "ring_buffer__new", _c_void_p, ctypes.c_int, _SAMPLE_FN, _c_void_p, ctypes.POINTER(_RingBufferOpts)
        )
        self.rb_free = _fn(lib, "ring_buffer__free", None, _c_void_p)
        self.rb_poll = _fn(lib, "ring_buffer__poll", ctypes.c_int, _c_void_p, ctypes.c_int)
        self.rb_consume = _fn(lib, "ring_buffer__consume", ctypes.c_int, _c_void_p)
        self.rb_epoll_fd = _fn(lib, "ring_buffer__epoll_fd", ctypes.c_int, _c_void_p)


_lib_instance: _Lib | None = None
_lib_lock = threading.Lock()


def _lib() -> _Lib:
    global _lib_instance
    if _lib_instance is None:
        with _lib_lock:
            if _lib_instance is None:
                _lib_instance = _Lib()
                # libbpf's default printer writes to stderr; route it to our logger from the start
                set_log_handler(_default_log_handler)
    return _lib_instance


def _errno_now() -> int:
    return ctypes.get_errno() or _errno.EINVAL


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise LibbpfError(-ret, what)
    return ret


def _s(b: bytes | None) -> str:
    return b.decode(errors="replace") if b is not None else ""


# --- logging ---------------------------------------------------------------

_LEVELS = {LIBBPF_WARN: logging.WARNING, LIBBPF_INFO: logging.INFO, LIBBPF_DEBUG: logging.DEBUG}
_print_cb: Any = None  # the live CFUNCTYPE: libbpf keeps a raw pointer to it


def _default_log_handler(level: int, line: str) -> None:
    log.log(_LEVELS.get(level, logging.DEBUG), "%s", line)  # lines start with "libbpf: "


def set_log_handler(fn: Callable[[int, str], None]) -> None:
    """Send libbpf's log lines to `fn(level, line)`; level is LIBBPF_WARN/INFO/DEBUG."""
    global _print_cb
    lib = _lib()

    def _print(level: int, fmt: bytes | None, ap: int | None) -> int:
        try:
            out = _c_void_p()
            # va_list is passed by pointer on x86-64 and arm64, so libc can format it for us
            n = lib.vasprintf(ctypes.byref(out), fmt, ap)
            if n < 0 or not out.value:
                return 0
            try:
                text = ctypes.string_at(out.value, n)
            finally:
                lib.free(out)
            fn(level, text.decode(errors="replace").rstrip("\n"))
            return n
        except Exception:  # a log handler must never unwind into C
            log.exception("libbpf log handler failed")
            return 0

    cb = _PRINT_FN(_print)
    lib.set_print(cb)
    _print_cb = cb


def num_possible_cpus() -> int:
    return _check(_lib().num_possible_cpus(), "libbpf_num_possible_cpus")


# --- objects ---------------------------------------------------------------


class BpfObject:
    """One opened (then loaded) .bpf.o file."""

    def __init__(self, ptr: int, path: str) -> None:
        self._ptr: int | None = ptr
        self.path = path
        self.loaded = False

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> BpfObject:
        lib = _lib()
        p = os.fspath(path)
        opts = _BpfObjectOpenOpts()
        opts.sz = ctypes.sizeof(_BpfObjectOpenOpts)
        ptr = lib.obj_open_file(p.encode(), ctypes.byref(opts))
        if not ptr:
            raise LibbpfError(_errno_now(), f"open BPF object {p}")
        return cls(ptr, p)

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError(f"BPF object {self.path} is closed")
        return self._ptr

    @property
    def name(self) -> str:
        return _s(_lib().obj_name(self.ptr))

    def __repr__(self) -> str:
        return f"<BpfObject {self.path}{' closed' if self._ptr is None else ''}>"

    # maps and programs

    def map(self, name: str) -> BpfMap:
        ptr = _lib().obj_find_map(self.ptr, name.encode())
        if not ptr:
            raise KeyError(f"no map {name!r} in {self.path}")
        return BpfMap(self, ptr)

    def maps(self) -> list[BpfMap]:
        lib, out, cur = _lib(), [], None
        while True:
            cur = lib.obj_next_map(self.ptr, cur)
            if not cur:
                return out
            out.append(BpfMap(self, cur))

    def program(self, name: str) -> BpfProgram:
        ptr = _lib().obj_find_prog(self.ptr, name.encode())
        if not ptr:
            raise KeyError(f"no program {name!r} in {self.path}")
        return BpfProgram(self, ptr)

    def programs(self) -> list[BpfProgram]:
        lib, out, cur = _lib(), [], None
        while True:
            cur = lib.obj_next_prog(self.ptr, cur)
            if not cur:
                return out
            out.append(BpfProgram(self, cur))

    # read-only configuration

    def rodata_vars(self) -> dict[str, tuple[str, int, int]]:
        """Globals in .rodata* sections: name -> (section, offset, size), from the BTF DATASECs."""
        lib = _lib()
        btf = lib.obj_btf(self.ptr)
        if not btf:
            return {}
        out: dict[str, tuple[str, int, int]] = {}
        for type_id in range(1, lib.btf_type_cnt(btf)):
            t = lib.btf_type_by_id(btf, type_id)
            if not t or (t.contents.info >> 24) & 0x1F != BTF_KIND_DATASEC:
                continue
            sec = _s(lib.btf_name_by_offset(btf, t.contents.name_off))
            if not sec.startswith(".rodata"):
                continue
            vlen = t.contents.info & 0xFFFF
            infos = ctypes.cast(
                ctypes.cast(t, _c_void_p).value + ctypes.sizeof(_BtfType),  # type: ignore[operator]
                ctypes.POINTER(_BtfVarSecinfo * vlen),
            ).contents
            for vi in infos:
                vt = lib.btf_type_by_id(btf, vi.type)
                if not vt or (vt.contents.info >> 24) & 0x1F != BTF_KIND_VAR:
                    continue
                out[_s(lib.btf_name_by_offset(btf, vt.contents.name_off))] = (sec, vi.offset, vi.size)
        return out

    def _section_map(self, sec: str) -> BpfMap:
        # libbpf names an internal map "<obj name prefix><sec>", or just "<sec>" for ".rodata.foo"
        for m in self.maps():
            if m.is_internal and (m.name == sec or (m.name.endswith(sec) and "." not in m.name[: -len(sec)])):
                return m
        raise KeyError(f"no internal map for section {sec} in {self.path}")

    def set_rodata(self, name: str, value: int | bytes) -> None:
        """Set a `const volatile` global before load(). Ints are written little-endian at the variable's size."""
        if self.loaded:
            raise ValueError(f"set_rodata({name!r}) after load of {self.path}")
        found = self.rodata_vars().get(name)
        if found is None:
            raise KeyError(f"no const volatile global {name!r} in {self.path}")
        sec, off, size = found
        if isinstance(value, int):
            signed = value < 0
            try:
                raw = value.to_bytes(size, "little", signed=signed)
            except OverflowError:
                raise ValueError(f"rodata {name!r} is {size} bytes: {value} does not fit") from None
        else:
            raw = bytes(value)
            if len(raw) != size:
                raise ValueError(f"rodata {name!r} is {size} bytes, got {len(raw)}")
        m = self._section_map(sec)
        lib = _lib()
        psize = _size_t()
        cur = lib.map_initial_value(m.ptr, ctypes.byref(psize))
        if not cur:
            raise LibbpfError(_errno_now(), f"initial value of {m.name} in {self.path}")
        if off + size > psize.value:
            raise ValueError(f"rodata {name!r} at {off}+{size} beyond section size {psize.value}")
        data = bytearray(ctypes.string_at(cur, psize.value))
        data[off : off + size] = raw
        buf = (ctypes.c_char * len(data)).from_buffer(data)
        _check(lib.map_set_initial_value(m.ptr, buf, len(data)), f"set rodata {name} in {self.path}")

    # lifecycle

    def load(self) -> None:
        _check(_lib().obj_load(self.ptr), f"load BPF object {self.path}")
        self.loaded = True

    def close(self) -> None:
        if self._ptr is not None:
            _lib().obj_close(self._ptr)
            self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BpfMap:
    """A map of a BpfObject. Key/value operations need the object loaded."""

    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self._obj = obj  # keeps the object (and so the map) referenced
        self.ptr = ptr
        lib = _lib()
        self.name = _s(lib.map_name(ptr))

    def __repr__(self) -> str:
        return f"<BpfMap {self.name} type={self.type} of {self._obj.path}>"

    @property
    def fd(self) -> int:
        fd = _lib().map_fd(self.ptr)
        if fd < 0:  # -1 before load: not an errno
            raise LibbpfError(_errno.EBADF if fd == -1 else -fd, f"fd of map {self.name} (is {self._obj.path} loaded?)")
        return fd

    @property
    def type(self) -> int:
        return _lib().map_type(self.ptr)

    @property
    def key_size(self) -> int:
        return _lib().map_key_size(self.ptr)

    @property
    def value_size(self) -> int:
        return _lib().map_value_size(self.ptr)

    @property
    def max_entries(self) -> int:
        return _lib().map_max_entries(self.ptr)

    @property
    def is_internal(self) -> bool:
        return bool(_lib().map_is_internal(self.ptr))

    def set_max_entries(self, n: int) -> None:
        _check(_lib().map_set_max_entries(self.ptr, n), f"set max_entries={n} on map {self.name}")

    def reuse_fd(self, fd: int) -> None:
        _check(_lib().map_reuse_fd(self.ptr, fd), f"reuse fd {fd} for map {self.name}")

    # element access

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {self.key_size} bytes, got {len(key)}")
        return ctypes.create_string_buffer(bytes(key), len(key))

    def _lookup_raw(self, key: bytes, value_len: int) -> bytes | None:
        k = self._key(key)
        v = ctypes.create_string_buffer(value_len)
        if _lib().map_lookup_elem(self.fd, k, v) < 0:
            err = _errno_now()
            if err == _errno.ENOENT:
                return None
            raise LibbpfError(err, f"lookup in map {self.name}")
        return v.raw

    def lookup(self, key: bytes) -> bytes | None:
        if self.type in PERCPU_MAP_TYPES:
            raise ValueError(f"map {self.name} is per-CPU: use lookup_percpu()")
        return self._lookup_raw(key, self.value_size)

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        """One value per possible CPU; [] when the key is absent."""
        if self.type not in PERCPU_MAP_TYPES:
            raise ValueError(f"map {self.name} is not per-CPU: use lookup()")
        ncpu = num_possible_cpus()
        stride = (self.value_size + 7) & ~7  # the kernel pads each CPU's value to 8 bytes
        raw = self._lookup_raw(key, stride * ncpu)
        if raw is None:
            return []
        return [raw[i * stride : i * stride + self.value_size] for i in range(ncpu)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        k = self._key(key)
        v = ctypes.create_string_buffer(bytes(value), len(value))
        if _lib().map_update_elem(self.fd, k, v, flags) < 0:
            raise LibbpfError(_errno_now(), f"update map {self.name}")

    def delete(self, key: bytes) -> bool:
        """Remove `key`; False when it was not there."""
        if _lib().map_delete_elem(self.fd, self._key(key)) < 0:
            err = _errno_now()
            if err == _errno.ENOENT:
                return False
            raise LibbpfError(err, f"delete from map {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        lib, fd, ks = _lib(), self.fd, self.key_size
        prev = None
        nxt = ctypes.create_string_buffer(ks)
        while True:
            if lib.map_get_next_key(fd, prev, nxt) < 0:
                err = _errno_now()
                if err == _errno.ENOENT:
                    return
                raise LibbpfError(err, f"iterate map {self.name}")
            key = nxt.raw
            yield key
            prev = ctypes.create_string_buffer(key, ks)


class BpfProgram:
    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self._obj = obj
        self.ptr = ptr
        lib = _lib()
        self.name = _s(lib.prog_name(ptr))
        self.section = _s(lib.prog_section(ptr))

    def __repr__(self) -> str:
        return f"<BpfProgram {self.name} SEC({self.section}) of {self._obj.path}>"

    @property
    def fd(self) -> int:
        fd = _lib().prog_fd(self.ptr)
        if fd < 0:
            raise LibbpfError(_errno.EBADF if fd == -1 else -fd, f"fd of program {self.name} (not loaded?)")
        return fd

    @property
    def autoload(self) -> bool:
        return bool(_lib().prog_autoload(self.ptr))

    def set_autoload(self, on: bool) -> None:
        _check(_lib().prog_set_autoload(self.ptr, on), f"set autoload of program {self.name}")

    def set_expected_attach_type(self, attach_type: int) -> None:
        """Before load: e.g. BPF_TRACE_UPROBE_MULTI, so that attach_uprobe_multi() can bind the program (the kernel
        then refuses the classic perf-event attach for it)."""
        _check(
            _lib().prog_set_expected_attach_type(self.ptr, attach_type),
            f"set expected attach type of program {self.name}",
        )

    def attach_uprobe_multi(
        self,
        path: str | os.PathLike[str],
        offsets: list[int],
        *,
        retprobe: bool = False,
        pid: int = -1,
        cookies: list[int] | None = None,
    ) -> Link:
        """One link probing every FILE offset in `offsets` of `path` (BPF_LINK_CREATE, uprobe_multi).

        libbpf 1.1 predates uprobe_multi, so this issues the bpf() call itself. The program must have been
        loaded with set_expected_attach_type(BPF_TRACE_UPROBE_MULTI)."""
        p = os.fspath(path)
        if not offsets:
            raise ValueError(f"attach {self.name} to {p}: no offsets")
        if cookies is not None and len(cookies) != len(offsets):
            raise ValueError(f"attach {self.name} to {p}: {len(cookies)} cookies for {len(offsets)} offsets")
        c_path = ctypes.create_string_buffer(p.encode())
        c_offs = (ctypes.c_uint64 * len(offsets))(*offsets)
        c_cookies = (ctypes.c_uint64 * len(offsets))(*cookies) if cookies else None
        attr = ctypes.create_string_buffer(_BPF_ATTR_SIZE)
        _LINK_CREATE.pack_into(
            attr, 0, self.fd, 0, BPF_TRACE_UPROBE_MULTI, 0,
            ctypes.addressof(c_path), ctypes.addressof(c_offs), 0,
            ctypes.addressof(c_cookies) if c_cookies is not None else 0,
            len(offsets), BPF_F_UPROBE_MULTI_RETURN if retprobe else 0, max(pid, 0),
        )  # fmt: skip
        fd = _lib().syscall(_SYS_BPF, _BPF_LINK_CREATE, attr, _BPF_ATTR_SIZE)
        kind = "uretprobe" if retprobe else "uprobe"
        where = ",".join(f"{o:#x}" for o in offsets)
        desc = f"{kind}.multi {where} in {p}" + (f" pid {pid}" if pid > 0 else "") + f" ({self.name})"
        if fd < 0:
            raise LibbpfError(ctypes.get_errno(), f"attach {desc}")
        return Link(None, desc, fd=int(fd))

    def attach(self) -> Link:
        """Attach as the section says (tracepoint, tp_btf, raw_tp, ...)."""
        ptr = _lib().prog_attach(self.ptr)
        if not ptr:
            raise LibbpfError(_errno_now(), f"attach {self.name} ({self.section})")
        return Link(ptr, f"{self.name} ({self.section})")

    def attach_uprobe(
        self,
        path: str | os.PathLike[str],
        *,
        offset: int = 0,
        func_name: str | None = None,
        pid: int = -1,
        retprobe: bool = False,
        cookie: int = 0,
    ) -> Link:
        """Attach to `path` at a function (by name, plus `offset` inside it) or at a FILE offset.

        pid -1 traces every process that maps the file, now or later; another pid traces only it.
        `cookie` is what bpf_get_attach_cookie() returns in the program for this attachment.
        """
        p = os.fspath(path)
        opts = _BpfUprobeOpts()
        opts.sz = ctypes.sizeof(_BpfUprobeOpts)
        opts.retprobe = retprobe
        opts.bpf_cookie = cookie
        opts.func_name = func_name.encode() if func_name else None
        ptr = _lib().prog_attach_uprobe_opts(self.ptr, pid, p.encode(), offset, ctypes.byref(opts))
        kind = "uretprobe" if retprobe else "uprobe"
        where = func_name if func_name else f"offset {offset:#x}"
        if func_name and offset:
            where += f"+{offset:#x}"
        desc = f"{kind} {where} in {p}" + (f" pid {pid}" if pid != -1 else "") + f" ({self.name})"
        if not ptr:
            raise LibbpfError(_errno_now(), f"attach {desc}")
        return Link(ptr, desc)


# enum bpf_attach_type / bpf_cmd values from the kernel UAPI (include/uapi/linux/bpf.h)
BPF_TRACE_UPROBE_MULTI = 48
BPF_F_UPROBE_MULTI_RETURN = 1
_BPF_LINK_CREATE = 28
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
# union bpf_attr, link_create member: prog_fd, target_fd, attach_type, flags, then uprobe_multi at offset 16:
# path, offsets, ref_ctr_offsets, cookies (u64 each), cnt, flags, pid (u32 each)
_LINK_CREATE = struct.Struct("<IIII QQQQ III")
_BPF_ATTR_SIZE = 128

_uprobe_multi: bool | None = None


def uprobe_multi_supported() -> bool:
    """Does the running kernel have uprobe_multi links (Linux 6.6+)? Read once from its BTF.

    One uprobe_multi link registers many offsets of one file with no perf event per probe: on this VM that
    attaches a fresh file in ~1 ms instead of 15-230 ms, and detaches a whole file in one RCU grace period."""
    global _uprobe_multi
    if _uprobe_multi is None:
        try:
            with open("/sys/kernel/btf/vmlinux", "rb") as f:
                _uprobe_multi = b"\0BPF_TRACE_UPROBE_MULTI\0" in f.read()
        except OSError:
            _uprobe_multi = False
    return _uprobe_multi


class Link:
    """One attachment: a libbpf `struct bpf_link *`, or a raw BPF link fd. destroy() detaches; safe to call twice."""

    def __init__(self, ptr: int | None, desc: str, *, fd: int | None = None) -> None:
        self._ptr: int | None = ptr
        self._fd: int | None = fd
        self.desc = desc

    def __repr__(self) -> str:
        return f"<Link {self.desc}{'' if self.attached else ' destroyed'}>"

    @property
    def attached(self) -> bool:
        return self._ptr is not None or self._fd is not None

    def destroy(self) -> None:
        ptr, self._ptr = self._ptr, None
        fd, self._fd = self._fd, None
        if ptr is not None:
            err = _lib().link_destroy(ptr)
            if err < 0:
                log.warning("detach %s: %s", self.desc, os.strerror(-err))
        if fd is not None:
            os.close(fd)  # the last reference to a BPF link detaches it

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class RingBuffer:
    """A libbpf ring_buffer over one BPF_MAP_TYPE_RINGBUF map.

    `callback` receives each record as a memoryview into the ring itself, valid
    only during the call: copy what you keep. If it returns RingBuffer.STOP, the
    current poll()/consume() returns after that record (a reader bounding its
    batch under a flood: libbpf otherwise keeps consuming while the producer
    keeps writing). An exception in the callback also ends the call and is
    re-raised from it; the records before it, and that one, are consumed.
    """

    STOP = True

    def __init__(self, map_fd: int, callback: Callable[[memoryview], bool | None]) -> None:
        self._lib = _lib()
        self._callback = callback
        self._error: BaseException | None = None
        self._count = 0

        def _sample(_ctx: int | None, data: int, size: int) -> int:
            self._count += 1
            try:
                if callback(memoryview((ctypes.c_char * size).from_address(data)).cast("B")) is RingBuffer.STOP:
                    return -_errno.ECANCELED  # stops libbpf's loop; this record counts as consumed
                return 0
            except BaseException as e:  # must not unwind into C
                self._error = e
                return -_errno.ECANCELED

        self._sample = _SAMPLE_FN(_sample)  # must outlive the ring_buffer
        opts = _RingBufferOpts()
        opts.sz = ctypes.sizeof(_RingBufferOpts)
        ptr = self._lib.rb_new(map_fd, self._sample, None, ctypes.byref(opts))
        if not ptr:
            raise LibbpfError(_errno_now(), f"ring buffer on map fd {map_fd}")
        self._ptr: int | None = ptr

    def _ring(self) -> int:
        if self._ptr is None:
            raise ValueError("ring buffer is closed")
        return self._ptr

    def _result(self, n: int, what: str) -> int:
        count, self._count = self._count, 0
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if n == -_errno.EINTR or n == -_errno.ECANCELED:
            return count  # a signal interrupted epoll_wait, or the callback said STOP
        _check(n, what)
        return count

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for data, then consume all available records; returns how many."""
        self._count = 0
        return self._result(self._lib.rb_poll(self._ring(), timeout_ms), "ring_buffer__poll")

    def consume(self) -> int:
        """Consume all available records without waiting; returns how many."""
        self._count = 0
        return self._result(self._lib.rb_consume(self._ring()), "ring_buffer__consume")

    def epoll_fd(self) -> int:
        return self._lib.rb_epoll_fd(self._ring())

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._lib.rb_free(ptr)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
