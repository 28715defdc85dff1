"""loader.objects_dir(): package data unless $LLMSPY_BPF_DIR says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

import llmspyd.bpf
from llmspyd.bpf.loader import OBJECTS_ENV, objects_dir


def test_objects_dir_default_is_package_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OBJECTS_ENV, raising=False)
    assert objects_dir() == Path(llmspyd.bpf.__file__).resolve().parent / "objects"


def test_objects_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(OBJECTS_ENV, str(tmp_path))
    assert objects_dir() == tmp_path
