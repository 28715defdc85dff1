"""The Python mirror (llmspyd/bpf/abi.py) against the compiled BPF objects' BTF and bpf/llmspy.h.

Every struct in abi.MIRRORS is compared, size and each field's offset and size,
with its BTF in every shipped object that contains it (llmspyd/bpf/objects/) and
in the test object tests/bpf/libbpf_test.bpf.c, which references all of them.
Also: the enums, the #define constants, and our ctypes copies of libbpf's
`*_opts` structs against a C program compiled with libbpf's own header.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llmspyd.bpf import abi
from llmspyd.bpf import libbpf as lb
from llmspyd.bpf.loader import objects_dir
from llmspyd.capture import reader
from llmspyd.chunks import Direction, Stack
from tests.bpf.build import ROOT, compile_test_object, have_clang

HEADER = ROOT / "bpf" / "llmspy.h"


def btf_types(obj: Path) -> dict[int, dict]:
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(obj), "format", "raw", "-j"], check=True, capture_output=True, text=True
    ).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


def btf_size(types: dict[int, dict], tid: int) -> int:
    t = types[tid]
    kind = t["kind"]
    if kind in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT", "TYPE_TAG"):
        return btf_size(types, t["type_id"])
    if kind == "ARRAY":
        return t["nr_elems"] * btf_size(types, t["type_id"])
    if kind == "PTR":
        return 8
    return t["size"]


def btf_named(types: dict[int, dict], kind: str, name: str) -> dict | None:
    return next((t for t in types.values() if t["kind"] == kind and t.get("name") == name), None)


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, dict]]:
    """BTF of the test object and of every shipped object, by file name."""
    if shutil.which("bpftool") is None:
        pytest.skip("bpftool is not installed (make deps)")
    if not have_clang():
        pytest.skip("clang is not installed (make deps)")
    test_obj = compile_test_object(tmp_path_factory.mktemp("abi") / "libbpf_test.bpf.o")
    paths = [test_obj, *sorted(objects_dir().glob("*.bpf.o"))]
    return {p.name: btf_types(p) for p in paths}


def check_struct(types: dict[int, dict], cname: str, mirror: type[ctypes.Structure]) -> None:
    st = btf_named(types, "STRUCT", cname)
    assert st is not None
    members = {m["name"]: m for m in st["members"]}
    assert st["size"] == ctypes.sizeof(mirror), f"sizeof(struct {cname})"
    names = [f[0] for f in mirror._fields_]
    flexible = [n for n, m in members.items() if btf_size(types, m["type_id"]) == 0]
    assert names == [n for n in members if n not in flexible], f"fields of struct {cname}, in order"
    for name, ctype in mirror._fields_:
        m = members[name]
        assert m["bits_offset"] == getattr(mirror, name).offset * 8, f"offsetof({cname}, {name})"
        assert btf_size(types, m["type_id"]) == ctypes.sizeof(ctype), f"sizeof({cname}.{name})"
    for name in flexible:
        # a trailing data[] must start at sizeof: records are sizeof + n bytes
        assert members[name]["bits_offset"] == st["size"] * 8, f"{cname}.{name}[] starts at sizeof"


@pytest.mark.parametrize("cname", sorted(abi.MIRRORS))
def test_struct_mirror_matches_btf(objects: dict[str, dict[int, dict]], cname: str) -> None:
    checked = []
    for obj_name, types in objects.items():
        if btf_named(types, "STRUCT", cname) is not None:
            check_struct(types, cname, abi.MIRRORS[cname])
            checked.append(obj_name)
    assert "libbpf_test.bpf.o" in checked  # the test object references every ABI struct


def test_shipped_objects_carry_the_abi_structs(objects: dict[str, dict[int, dict]]) -> None:
    """The per-struct test above checks shipped objects only if their BTF has the structs.

    clang emits BTF only for types of globals, maps and function signatures, not for
    locals, so an object must reference the structs on purpose (as the test object does).
    """
    shipped = [n for n in objects if n != "libbpf_test.bpf.o"]
    if not shipped:
        pytest.skip(f"no compiled objects in {objects_dir()} yet (make bpf)")
    carrying = [n for n in shipped if any(btf_named(objects[n], "STRUCT", c) for c in abi.MIRRORS)]
    if not carrying:
        pytest.skip(f"no shipped object has the ABI structs in its BTF: {shipped}")
    for name in carrying:
        for cname, mirror in abi.MIRRORS.items():
            if btf_named(objects[name], "STRUCT", cname) is not None:
                check_struct(objects[name], cname, mirror)


ENUMS = {
    "llmspy_kind": ("LLMSPY_EV_", abi.Kind),
    "llmspy_dir": ("LLMSPY_DIR_", Direction),
    "llmspy_stack": ("LLMSPY_STACK_", Stack),
    "llmspy_stat": ("LLMSPY_STAT_", abi.Stat),
    "llmspy_verdict": ("LLMSPY_VERDICT_", getattr(abi, "Verdict", None)),
}


@pytest.mark.parametrize("cname", sorted(ENUMS))
def test_enum_mirror_matches_btf(objects: dict[str, dict[int, dict]], cname: str) -> None:
    prefix, mirror = ENUMS[cname]
    if mirror is None:
        pytest.skip(f"abi.py has no mirror of enum {cname}")
    seen = 0
    for types in objects.values():
        en = btf_named(types, "ENUM", cname)
        if en is None:
            continue
        seen += 1
        values = {v["name"].removeprefix(prefix): v["val"] for v in en["values"]}
        if cname == "llmspy_stat":
            assert values.pop("_MAX") == abi.STAT_MAX
        assert values == {m.name: m.value for m in mirror}
    assert seen


def header_defines() -> dict[str, int]:
    out = {}
    for m in re.finditer(r"^#define LLMSPY_(\w+)\s+(\(1 << \d+\)|\d+)", HEADER.read_text(), re.M):
        out[m.group(1)] = eval(m.group(2), {})  # only "123" or "(1 << n)" match
    return out


def test_header_constants() -> None:
    d = header_defines()
    assert d["ABI_VERSION"] == abi.ABI_VERSION
    assert d["COMM_LEN"] == abi.COMM_LEN
    assert d["PATH_LEN"] == abi.PATH_LEN
    assert d["CHUNK_MAX"] == abi.CHUNK_MAX
    flags = {k: v for k, v in d.items() if k.startswith("F_")}
    assert flags == {k: getattr(abi, k) for k in flags}
    assert flags  # the regex did find them


def test_reader_formats_agree_with_the_mirror() -> None:
    # decode() uses struct formats for speed; they must cover exactly the mirror's fixed part
    assert reader._HDR.size == ctypes.sizeof(abi.Hdr)
    assert reader.TLS_DATA_OFFSET == ctypes.sizeof(abi.TlsData)
    assert reader._HDR.size + reader._CLOSE.size <= ctypes.sizeof(abi.ConnClose)
    assert reader._HDR.size + reader._EXEC.size == ctypes.sizeof(abi.Exec)
    assert reader._HDR.size + reader._EXIT.size <= ctypes.sizeof(abi.Exit)


OPTS_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <bpf/libbpf.h>
#define F(s, f) printf("%s.%s %zu %zu\n", #s, #f, offsetof(struct s, f), sizeof(((struct s *)0)->f))
#define S(s) printf("%s %zu\n", #s, sizeof(struct s))
int main(void)
{
	S(bpf_object_open_opts); F(bpf_object_open_opts, sz); F(bpf_object_open_opts, object_name);
	F(bpf_object_open_opts, relaxed_maps); F(bpf_object_open_opts, pin_root_path); F(bpf_object_open_opts, kconfig);
	F(bpf_object_open_opts, btf_custom_path); F(bpf_object_open_opts, kernel_log_buf);
	F(bpf_object_open_opts, kernel_log_size); F(bpf_object_open_opts, kernel_log_level);
	S(bpf_uprobe_opts); F(bpf_uprobe_opts, sz); F(bpf_uprobe_opts, ref_ctr_offset); F(bpf_uprobe_opts, bpf_cookie);
	F(bpf_uprobe_opts, retprobe); F(bpf_uprobe_opts, func_name);
	S(ring_buffer_opts); F(ring_buffer_opts, sz);
	return 0;
}
"""


def test_libbpf_opts_layouts_match_the_header(tmp_path: Path) -> None:
    if not have_clang() or not Path("/usr/include/bpf/libbpf.h").exists():
        pytest.skip("needs clang and libbpf-dev (make deps)")
    src = tmp_path / "opts.c"
    src.write_text(OPTS_PROBE)
    subprocess.run(["clang", "-o", str(tmp_path / "opts"), str(src)], check=True, capture_output=True)
    lines = subprocess.run([str(tmp_path / "opts")], check=True, capture_output=True, text=True).stdout.splitlines()
    mirrors = {
        "bpf_object_open_opts": lb._BpfObjectOpenOpts,
        "bpf_uprobe_opts": lb._BpfUprobeOpts,
        "ring_buffer_opts": lb._RingBufferOpts,
    }
    checked = 0
    for line in lines:
        parts = line.split()
        if len(parts) == 2:
            assert ctypes.sizeof(mirrors[parts[0]]) == int(parts[1]), parts[0]
        else:
            sname, field = parts[0].split(".")
            cf = getattr(mirrors[sname], field)
            assert (cf.offset, cf.size) == (int(parts[1]), int(parts[2])), parts[0]
        checked += 1
    assert checked == 18
