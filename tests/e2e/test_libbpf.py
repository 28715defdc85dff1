"""Our ctypes libbpf binding against the real kernel.

A tiny test object (tests/bpf/libbpf_test.bpf.c, compiled here) probes libc's
atoi() in child Python processes that call it on request, so every probe hit is
one we caused and can check: argument, return value, pid, knobs, counters.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmspyd.bpf.libbpf import BpfObject, LibbpfError, RingBuffer, num_possible_cpus
from llmspyd.bpf.loader import ObjectSet, read_stats
from llmspyd.capture.reader import RingReader
from llmspyd.chunks import Direction, Stack, TlsChunk
from tests.bpf.build import compile_test_object, have_clang

pytestmark = pytest.mark.e2e

# struct test_event in libbpf_test.bpf.c
EVENT = struct.Struct("<IIqQ8s")
KIND_ENTER, KIND_RETURN, KIND_RAW_TP, KIND_SECOND = 1, 2, 3, 4

CHILD = r"""
import ctypes, sys
libc = ctypes.CDLL(None)
libc.atoi.argtypes = [ctypes.c_char_p]
print("ready", flush=True)
for line in sys.stdin:
    print(libc.atoi(line.strip().encode()), flush=True)
"""


@pytest.fixture(scope="module")
def objs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    if not have_clang():
        pytest.skip("clang is not installed (make deps)")
    d = tmp_path_factory.mktemp("bpf")
    return {
        "main": compile_test_object(d / "t_main.bpf.o"),
        "second": compile_test_object(d / "t_second.bpf.o", "SECOND"),
        "bad": compile_test_object(d / "t_bad.bpf.o", "SECOND", "BAD_SHARED"),
        "unverifiable": compile_test_object(d / "t_unverifiable.bpf.o", "BAD_PROG"),
    }


def libc_path() -> str:
    # the libc this machine's processes map, as the dynamic loader resolves it
    with open(f"/proc/{os.getpid()}/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "/libc.so" in parts[5]:
                return os.path.realpath(parts[5])
    raise RuntimeError("libc not mapped")


def file_offset_of(path: str, symbol: str) -> int:
    """The FILE offset of `symbol`, which is what an offset uprobe wants (not its virtual address)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        sym = elf.get_section_by_name(".dynsym").get_symbol_by_name(symbol)[0]
        vaddr = sym["st_value"]
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_memsz"]:
                return vaddr - seg["p_vaddr"] + seg["p_offset"]
    raise LookupError(symbol)


class Child:
    """A Python process that calls libc atoi(line) for each line we send it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def atoi(self, s: str) -> int:
        self.proc.stdin.write(s + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(5)


@pytest.fixture
def children() -> Iterator[tuple[Child, Child]]:
    a, b = Child(), Child()
    yield a, b
    a.close()
    b.close()


class Events:
    """Collects test_event records from a ring buffer map."""

    def __init__(self, map_fd: int) -> None:
        self.got: list[tuple[int, int, int, int, bytes]] = []
        self.rb = RingBuffer(map_fd, lambda m: self.got.append(EVENT.unpack(bytes(m))))

    def drain(self) -> list[tuple[int, int, int, int, bytes]]:
        self.rb.poll(50)
        self.rb.consume()
        out, self.got = self.got, []
        return out

    def close(self) -> None:
        self.rb.close()


def of(events: list[tuple[int, int, int, int, bytes]], pid: int, kind: int) -> list[tuple[int, int, int, int, bytes]]:
    return [e for e in events if e[0] == pid and e[1] == kind]


def test_uprobe_by_name_uretprobe_and_rodata(objs: dict[str, Path], children: tuple[Child, Child]) -> None:
    a, b = children
    libc = libc_path()
    with BpfObject.open(objs["main"]) as obj:
        obj.set_rodata("tag", 0xDEADBEEF)
        obj.set_rodata("label", b"llmspy\0\0")
        obj.load()
        ev = Events(obj.map("events").fd)
        enter = obj.program("on_enter").attach_uprobe(libc, func_name="atoi")
        ret = obj.program("on_return").attach_uprobe(libc, func_name="atoi", retprobe=True)
        try:
            assert a.atoi("4242") == 4242
            assert b.atoi("77") == 77
            got = ev.drain()
        finally:
            enter.destroy()
            ret.destroy()
            ev.close()
    # entry sees the argument, return sees the result, in every process (pid -1)
    assert [e[2] for e in of(got, a.pid, KIND_ENTER)] == [4242]
    assert [e[2] for e in of(got, a.pid, KIND_RETURN)] == [4242]
    assert [e[2] for e in of(got, b.pid, KIND_RETURN)] == [77]
    # the knobs set before load reach the program
    for e in of(got, a.pid, KIND_ENTER):
        assert e[3] == 0xDEADBEEF and e[4] == b"llmspy\0\0"


def test_rodata_knob_filters_in_kernel(objs: dict[str, Path], children: tuple[Child, Child]) -> None:
    a, b = children
    with BpfObject.open(objs["main"]) as obj:
        obj.set_rodata("only_pid", a.pid)
        obj.load()
        ev = Events(obj.map("events").fd)
        link = obj.program("on_enter").attach_uprobe(libc_path(), func_name="atoi")
        try:
            a.atoi("1")
            b.atoi("2")
            got = ev.drain()
        finally:
            link.destroy()
            ev.close()
    assert [e[2] for e in of(got, a.pid, KIND_ENTER)] == [1]
    assert of(got, b.pid, KIND_ENTER) == []
    assert {e[0] for e in got} == {a.pid}


def test_uprobe_by_file_offset_with_pid_filter(objs: dict[str, Path], children: tuple[Child, Child]) -> None:
    a, b = children
    libc = libc_path()
    off = file_offset_of(libc, "atoi")
    with BpfObject.open(objs["main"]) as obj:
        obj.load()
        ev = Events(obj.map("events").fd)
        link = obj.program("on_enter").attach_uprobe(libc, offset=off, pid=b.pid)
        try:
            a.atoi("11")
            b.atoi("22")
            b.atoi("23")
            got = ev.drain()
        finally:
            link.destroy()
            ev.close()
    assert [e[2] for e in of(got, b.pid, KIND_ENTER)] == [22, 23]
    assert {e[0] for e in got} == {b.pid}  # the pid given to attach is the only one traced


def test_detach_stops_events_and_destroy_is_idempotent(objs: dict[str, Path], children: tuple[Child, Child]) -> None:
    a, _ = children
    with BpfObject.open(objs["main"]) as obj:
        obj.load()
        ev = Events(obj.map("events").fd)
        link = obj.program("on_enter").attach_uprobe(libc_path(), func_name="atoi", pid=a.pid)
        a.atoi("5")
        assert len(of(ev.drain(), a.pid, KIND_ENTER)) == 1
        link.destroy()
        link.destroy()
        assert not link.attached
        a.atoi("6")
        assert of(ev.drain(), a.pid, KIND_ENTER) == []
        ev.close()


def test_auto_attach_raw_tracepoint_and_percpu_counts(objs: dict[str, Path], children: tuple[Child, Child]) -> None:
    a, _ = children
    with BpfObject.open(objs["main"]) as obj:
        obj.set_rodata("only_pid", a.pid)
        obj.program("tls_like").set_autoload(False)
        obj.load()
        assert obj.program("on_sys_enter").section == "raw_tp/sys_enter"
        ev = Events(obj.map("events").fd)
        link = obj.program("on_sys_enter").attach()
        a.atoi("9")  # at least a read and a write syscall
        got = ev.drain()
        link.destroy()
        ev.close()
        per_cpu = obj.map("counts").lookup_percpu(struct.pack("<I", KIND_RAW_TP))
        assert len(per_cpu) == num_possible_cpus()
        total = sum(struct.unpack("<Q", v)[0] for v in per_cpu)
    n = len(of(got, a.pid, KIND_RAW_TP))
    assert n >= 2
    assert total == n  # every hit was counted on some CPU and delivered


def test_map_access(objs: dict[str, Path]) -> None:
    with BpfObject.open(objs["main"]) as obj:
        obj.load()
        m = obj.map("shared")
        assert (m.key_size, m.value_size, m.max_entries) == (4, 8, 64)
        k = struct.pack("<I", 7)
        assert m.lookup(k) is None
        m.update(k, struct.pack("<Q", 99))
        assert m.lookup(k) == struct.pack("<Q", 99)
        m.update(struct.pack("<I", 8), struct.pack("<Q", 1))
        assert sorted(m.keys()) == [struct.pack("<I", 7), struct.pack("<I", 8)]
        assert m.delete(k) is True
        assert m.delete(k) is False
        with pytest.raises(LibbpfError) as exc:
            m.update(struct.pack("<I", 8), struct.pack("<Q", 2), flags=1)  # BPF_NOEXIST on a present key
        assert "shared" in str(exc.value) and exc.value.errno == 17
        with pytest.raises(ValueError):
            m.lookup(b"\0")  # wrong key size is ours to catch, not the kernel's


def test_object_set_shares_maps_and_reader_decodes(objs: dict[str, Path], children: tuple[Child, Child]) -> None:
    a, _ = children
    libc = libc_path()
    batches: list[list] = []
    with ObjectSet([objs["main"], objs["second"]], rodata={"tag": 7}, max_entries={"events": 512 * 1024}) as s:
        first, second = s.objects
        assert s.map("events").max_entries == 512 * 1024
        assert second.map("events").max_entries == 512 * 1024  # the reused map is the owner's
        # internal maps are never shared: each object keeps its own .rodata
        rodata = [next(m for m in o.maps() if m.is_internal and m.name.endswith(".rodata")) for o in (first, second)]
        assert rodata[0].fd != rodata[1].fd
        ev = Events(s.map("events").fd)
        reader = RingReader(s.map("rb"), batches.append, poll_ms=20)
        reader.start()
        links = [
            s.program("on_enter").attach_uprobe(libc, func_name="atoi", pid=a.pid),
            s.program("second_enter").attach_uprobe(libc, func_name="atoi", pid=a.pid),
            s.program("tls_like").attach_uprobe(libc, func_name="atoi", pid=a.pid),
        ]
        try:
            a.atoi("31")
            a.atoi("32 hello")
            got = ev.drain()
            deadline = time.monotonic() + 5
            while sum(map(len, batches)) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            for link in links:
                link.destroy()
            reader.stop()
            ev.close()
        # the second object's program wrote into the first object's ring buffer and hash map
        assert [e[2] for e in of(got, a.pid, KIND_ENTER)] == [31, 32]
        assert len(of(got, a.pid, KIND_SECOND)) == 2
        assert all(e[3] == 7 for e in got)  # rodata set on both objects
        assert first.map("shared").lookup(struct.pack("<I", a.pid)) == struct.pack("<Q", 2)
        stats = read_stats(s.map("stats"))
    assert not reader.alive
    chunks = [e for b in batches for e in b]
    assert all(isinstance(c, TlsChunk) for c in chunks)
    assert [c.data for c in chunks] == [b"31", b"32 hello"]
    c = chunks[0]
    assert (c.pid, c.tid, c.conn, c.direction, c.stack, c.offset) == (a.pid, a.pid, 0x1234, Direction.WRITE, Stack.OPENSSL, 7)
    assert c.comm == "python3" or c.comm.startswith("python")
    assert c.peer is not None and (c.peer.addr, c.peer.port, c.peer.local_port) == ("127.0.0.1", 443, 40000)
    assert reader.counters["records"] == 2 and reader.counters["decode_errors"] == 0
    assert stats["records"] == 2 and stats["bytes"] == len(b"31") + len(b"32 hello") and stats["lost_records"] == 0


def test_errors_name_the_thing_and_errno(objs: dict[str, Path]) -> None:
    with pytest.raises(LibbpfError) as exc:
        BpfObject.open("/nonexistent/x.bpf.o")
    assert exc.value.errno == 2 and "/nonexistent/x.bpf.o" in str(exc.value)
    with BpfObject.open(objs["main"]) as obj:
        with pytest.raises(KeyError):
            obj.set_rodata("no_such_knob", 1)
        with pytest.raises(ValueError):
            obj.set_rodata("tag", b"\0" * 4)  # tag is a u64
        with pytest.raises(ValueError):
            obj.set_rodata("only_pid", 1 << 40)  # only_pid is a u32
        obj.load()
        prog = obj.program("on_enter")
        with pytest.raises(LibbpfError) as exc:
            prog.attach_uprobe("/nonexistent/libssl.so.3", func_name="SSL_write")
        assert exc.value.errno == 2
        assert "SSL_write" in str(exc.value) and "/nonexistent/libssl.so.3" in str(exc.value) and "ENOENT" in str(exc.value)
        with pytest.raises(LibbpfError) as exc:
            prog.attach_uprobe(libc_path(), func_name="llmspy_no_such_function")
        assert "llmspy_no_such_function" in str(exc.value) and exc.value.errno == 2
        with pytest.raises(KeyError):
            obj.program("nope")
        with pytest.raises(KeyError):
            obj.map("nope")


def test_log_lines_reach_python_logging(objs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with BpfObject.open(objs["main"]) as obj:
        obj.load()
        with caplog.at_level("WARNING", logger="llmspyd.bpf.libbpf"):
            with pytest.raises(LibbpfError):
                obj.program("on_enter").attach_uprobe(libc_path(), func_name="llmspy_no_such_function")
    assert any("llmspy_no_such_function" in r.getMessage() for r in caplog.records)


def test_verifier_refusal_raises_and_logs_the_verifier_log(
    objs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="llmspyd.bpf.libbpf"):
        with BpfObject.open(objs["unverifiable"]) as obj:
            with pytest.raises(LibbpfError) as exc:
                obj.load()
    assert "t_unverifiable.bpf.o" in str(exc.value) and exc.value.errno
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "bad_prog" in text
    assert "map_value_or_null" in text  # the verifier's own reason, whole, not cut at a buffer size


def test_ring_buffer_callback_exception_is_raised_from_poll(objs: dict[str, Path], children: tuple[Child, Child]) -> None:
    a, _ = children
    with BpfObject.open(objs["main"]) as obj:
        obj.load()

        def boom(_m: memoryview) -> None:
            raise RuntimeError("sink broke")

        rb = RingBuffer(obj.map("events").fd, boom)
        link = obj.program("on_enter").attach_uprobe(libc_path(), func_name="atoi", pid=a.pid)
        a.atoi("1")
        with pytest.raises(RuntimeError, match="sink broke"):
            rb.poll(200)
        link.destroy()
        rb.close()
        rb.close()


def test_ring_reader_survives_bad_records_and_sink_errors(objs: dict[str, Path], children: tuple[Child, Child]) -> None:
    a, _ = children
    libc = libc_path()
    batches: list[list] = []

    def sink(batch: list) -> None:
        batches.append(batch)
        if len(batches) == 1:
            raise RuntimeError("first batch fails")

    with BpfObject.open(objs["main"]) as obj:
        obj.set_rodata("no_wakeup", 1)  # records must still arrive, on the reader's poll timer
        obj.load()
        # the reader reads "events", where test_event records are not llmspy records: decode errors
        bad = RingReader(obj.map("events"), lambda b: None, poll_ms=20)
        good = RingReader(obj.map("rb"), sink, poll_ms=20)
        bad.start()
        good.start()
        links = [
            obj.program("on_enter").attach_uprobe(libc, func_name="atoi", pid=a.pid),
            obj.program("tls_like").attach_uprobe(libc, func_name="atoi", pid=a.pid),
        ]
        try:
            a.atoi("1")
            deadline = time.monotonic() + 5
            while not batches and time.monotonic() < deadline:
                time.sleep(0.01)
            a.atoi("2")
            while len(batches) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert good.alive and bad.alive
            before = good.last_poll_monotonic
            time.sleep(0.1)
            assert good.last_poll_monotonic > before  # the watchdog sees it come around while idle
        finally:
            for link in links:
                link.destroy()
            good.stop()
            bad.stop()
            good.stop()  # idempotent
    assert [[c.data for c in b] for b in batches] == [[b"1"], [b"2"]]
    assert good.counters["sink_errors"] == 1 and good.counters["events"] == 2
    assert bad.counters["records"] == 2 and bad.counters["decode_errors"] == 2 and bad.counters["events"] == 0
    assert not good.alive and not bad.alive


def test_ring_reader_batches_a_burst(objs: dict[str, Path], children: tuple[Child, Child]) -> None:
    """Many records between two polls reach the sink in few calls, in order, none lost."""
    a, _ = children
    batches: list[list] = []
    n = 300
    with BpfObject.open(objs["main"]) as obj:
        obj.load()
        reader = RingReader(obj.map("rb"), batches.append, poll_ms=200)
        link = obj.program("tls_like").attach_uprobe(libc_path(), func_name="atoi", pid=a.pid)
        # fill the ring before the reader starts: it finds them all at once
        script = "".join(f"{i}\n" for i in range(n))
        a.proc.stdin.write(script)
        a.proc.stdin.flush()
        for _ in range(n):
            a.proc.stdout.readline()
        reader.start()
        deadline = time.monotonic() + 5
        while sum(map(len, batches)) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        link.destroy()
        reader.stop()
    assert [c.data for b in batches for c in b] == [str(i).encode() for i in range(n)]
    assert len(batches) <= 2


def test_use_before_load_and_after_close(objs: dict[str, Path]) -> None:
    obj = BpfObject.open(objs["main"])
    m = obj.map("shared")
    with pytest.raises(LibbpfError) as exc:
        m.lookup(struct.pack("<I", 1))
    assert exc.value.errno == 9 and "shared" in str(exc.value)  # EBADF: there is no kernel map yet
    obj.load()
    with pytest.raises(ValueError):
        obj.set_rodata("tag", 1)  # .rodata is frozen once loaded
    obj.close()
    obj.close()
    with pytest.raises(ValueError):
        obj.map("shared")


def test_object_set_refuses_a_map_that_disagrees_and_closes_all(objs: dict[str, Path], monkeypatch) -> None:
    opened: list[BpfObject] = []
    real_open = BpfObject.open.__func__

    def spy(cls, path):  # type: ignore[no-untyped-def]
        obj = real_open(cls, path)
        opened.append(obj)
        return obj

    monkeypatch.setattr(BpfObject, "open", classmethod(spy))
    with pytest.raises(ValueError, match="shared"):
        ObjectSet([objs["main"], objs["bad"]])
    assert len(opened) == 2 and all(o._ptr is None for o in opened)  # nothing leaks
    opened.clear()
    with pytest.raises(LibbpfError) as exc:
        ObjectSet([objs["main"], Path("/nonexistent/x.bpf.o")])
    assert exc.value.errno == 2 and len(opened) == 1 and opened[0]._ptr is None


def test_lookup_kind_must_match_the_map(objs: dict[str, Path]) -> None:
    with BpfObject.open(objs["main"]) as obj:
        obj.load()
        with pytest.raises(ValueError):
            obj.map("counts").lookup(struct.pack("<I", 0))
        with pytest.raises(ValueError):
            obj.map("shared").lookup_percpu(struct.pack("<I", 0))
        assert obj.map("counts").lookup_percpu(struct.pack("<I", 0)) == [bytes(8)] * num_possible_cpus()
