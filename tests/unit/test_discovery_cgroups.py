"""Container attribution from /proc/PID/cgroup text, as the engines and systemd write it."""

from __future__ import annotations

import os

import pytest

from llmspyd.discovery.cgroups import container_of, container_of_path
from llmspyd.process import read_process

ID = "3f4e8a1b2c9d0e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f"


@pytest.mark.parametrize(
    ("path", "want"),
    [
        (f"/system.slice/docker-{ID}.scope", f"docker:{ID[:12]}"),
        (f"/docker/{ID}", f"docker:{ID[:12]}"),
        (f"/docker/{ID}/nested/child", f"docker:{ID[:12]}"),
        (f"/machine.slice/libpod-{ID}.scope/container", f"podman:{ID[:12]}"),
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope", f"podman:{ID[:12]}"),
        (f"/machine.slice/libpod-conmon-{ID}.scope", "unit:libpod-conmon-" + ID + ".scope"),
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{ID}.scope",
            f"containerd:{ID[:12]}",
        ),
        (f"/kubepods/besteffort/pod0c7f/{ID}", f"containerd:{ID[:12]}"),
        (f"/kubepods.slice/kubepods-pod1.slice/crio-{ID}.scope", f"cri-o:{ID[:12]}"),
        ("/machine.slice/systemd-nspawn@deb12.service/payload", "nspawn:deb12"),
        ("/machine.slice/machine-my\\x2dbox.scope/payload", "nspawn:my-box"),
        ("/lxc.payload.web1/init.scope", "lxc:web1"),
        ("/system.slice/sshd.service", "unit:sshd.service"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", "unit:foo.service"),
        ("/", ""),
        ("", ""),
        ("/process_api/98611c8c463682aaa8c3ee52d37d0009", ""),
    ],
)
def test_container_of_path(path: str, want: str) -> None:
    assert container_of_path(path) == want


def test_hybrid_hierarchy_uses_v1_lines_when_unified_is_root() -> None:
    text = f"12:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
    assert container_of(text) == f"docker:{ID[:12]}"


def test_container_beats_unit_across_lines() -> None:
    text = f"1:name=systemd:/system.slice/containerd.service\n0::/system.slice/docker-{ID}.scope\n"
    assert container_of(text) == f"docker:{ID[:12]}"
    assert container_of("0::/system.slice/cron.service\n") == "unit:cron.service"
    assert container_of("garbage\n\n") == ""


def test_read_process_fills_container_consistently() -> None:
    info = read_process(os.getpid())
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        assert info.container == container_of(f.read())
