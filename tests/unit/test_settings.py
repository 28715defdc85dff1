"""Configuration layers: defaults, drop-in order, every kind of bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmspyd import settings as S


def write(d: Path, rel: str, text: str) -> Path:
    p = d / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_defaults_with_no_files(tmp_path: Path) -> None:
    s = S.load(tmp_path)
    assert s.trace.scope == "all"
    assert s.output.sinks == ["auto"]
    assert s.redaction.secrets is True and s.redaction.content is False
    assert s.capture.ringbuf_bytes & (s.capture.ringbuf_bytes - 1) == 0
    assert s.sources == [S.BUILTIN]


def test_embedded_defaults_equal_schema_defaults() -> None:
    # the shipped TOML and the pydantic defaults must not drift apart
    assert S.Settings.model_validate(S.builtin_defaults()) == S.Settings()


def test_missing_config_dir_is_fine(tmp_path: Path) -> None:
    assert S.load(tmp_path / "nope").trace.scope == "all"


def test_main_then_dropins_in_lexical_order(tmp_path: Path) -> None:
    write(tmp_path, "llmspyd.toml", '[daemon]\nlog_level = "debug"\n[limits]\nidle_timeout_s = 10\n')
    write(tmp_path, "llmspyd.d/20-b.toml", '[daemon]\nlog_level = "error"\n')
    write(tmp_path, "llmspyd.d/10-a.toml", '[daemon]\nlog_level = "warning"\n[output]\nsinks = ["stdout"]\n')
    write(tmp_path, "llmspyd.d/README", "not toml, ignored")
    s = S.load(tmp_path)
    assert s.daemon.log_level == "error"  # 20-b wins over 10-a over the main file
    assert s.limits.idle_timeout_s == 10  # untouched keys of a merged table stay
    assert s.limits.max_call_bytes == S.LimitSettings().max_call_bytes
    assert s.output.sinks == ["stdout"]
    assert s.sources == [
        S.BUILTIN,
        str(tmp_path / "llmspyd.toml"),
        str(tmp_path / "llmspyd.d/10-a.toml"),
        str(tmp_path / "llmspyd.d/20-b.toml"),
    ]


def test_lists_are_replaced_not_appended(tmp_path: Path) -> None:
    write(tmp_path, "llmspyd.toml", '[output]\nsinks = ["stdout", "jsonl:/tmp/a"]\n')
    write(tmp_path, "llmspyd.d/50.toml", '[output]\nsinks = ["journald"]\n')
    assert S.load(tmp_path).output.sinks == ["journald"]


def test_overrides_win(tmp_path: Path) -> None:
    write(tmp_path, "llmspyd.toml", '[output]\nsinks = ["journald"]\n')
    s = S.load(tmp_path, overrides={"output": {"sinks": ["stdout"]}})
    assert s.output.sinks == ["stdout"]
    assert s.sources[-1] == S.CMDLINE


@pytest.mark.parametrize(
    "rel,text,needle",
    [
        ("llmspyd.toml", "[trace\nscope=1", "invalid TOML"),
        ("llmspyd.toml", b"\xff\xfe[trace]".decode("latin-1"), "invalid TOML"),
        ("llmspyd.d/10-x.toml", "[trace]\nscoop = 'all'\n", "trace.scoop: unknown key"),
        ("llmspyd.d/10-x.toml", "[tracing]\n", "tracing: unknown key"),
        ("llmspyd.d/10-x.toml", "[trace]\nscope = 'some'\n", "trace.scope"),
        ("llmspyd.d/10-x.toml", "[capture]\nringbuf_bytes = 5000\n", "capture.ringbuf_bytes"),
        ("llmspyd.d/10-x.toml", "[capture]\nringbuf_bytes = 'big'\n", "capture.ringbuf_bytes"),
        ("llmspyd.d/10-x.toml", "[limits]\nidle_timeout_s = -1\n", "limits.idle_timeout_s"),
        ("llmspyd.d/10-x.toml", "[output]\nsinks = ['syslog']\n", "output.sinks"),
        ("llmspyd.d/10-x.toml", "[output]\nsinks = []\n", "output.sinks"),
        ("llmspyd.d/10-x.toml", "[trace]\nexecutables = ['node']\n", "trace.executables"),
        ("llmspyd.d/10-x.toml", "[trace]\ncomms = ['a-very-long-process-name']\n", "trace.comms"),
        ("llmspyd.d/10-x.toml", "trace = 3\n", "trace"),
        ("llmspyd.d/10-x.toml", "[daemon]\nlog_level = 'loud'\n", "daemon.log_level"),
        ("llmspyd.d/10-x.toml", "[trace]\nscope = 'selected'\n", "trace.scope"),
    ],
)
def test_bad_file_names_file_and_key(tmp_path: Path, rel: str, text: str, needle: str) -> None:
    write(tmp_path, "llmspyd.toml", "# fine\n[daemon]\nlog_level='info'\n") if rel != "llmspyd.toml" else None
    bad = write(tmp_path, rel, text)
    with pytest.raises(S.ConfigError) as ei:
        S.load(tmp_path)
    assert ei.value.source == str(bad)
    assert str(bad) in str(ei.value)
    assert needle in str(ei.value)


def test_error_blames_the_file_that_broke_it_not_a_later_one(tmp_path: Path) -> None:
    write(tmp_path, "llmspyd.d/10-bad.toml", "[capture]\npoll_ms = 0\n")
    write(tmp_path, "llmspyd.d/20-good.toml", "[capture]\npoll_ms = 50\n")
    with pytest.raises(S.ConfigError) as ei:
        S.load(tmp_path)
    assert ei.value.source.endswith("10-bad.toml")


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "llmspyd.d").mkdir()
    link = tmp_path / "llmspyd.d" / "10-dangling.toml"
    link.symlink_to(tmp_path / "missing")
    # a dangling link is not a file: skipped rather than read
    assert S.load(tmp_path).trace.scope == "all"
    d = write(tmp_path, "llmspyd.d/20-dir.toml/x", "")  # a folder named like a drop-in is skipped too
    assert d.exists() and S.load(tmp_path).trace.scope == "all"


def test_selected_scope_with_selector(tmp_path: Path) -> None:
    write(tmp_path, "llmspyd.toml", "[trace]\nscope = 'selected'\nunits = ['agent.service']\nusers = [1000, 'bob']\n")
    s = S.load(tmp_path)
    assert s.trace.units == ["agent.service"] and s.trace.users == [1000, "bob"]


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = S.load(tmp_path)
    with pytest.raises(Exception):
        s.trace.scope = "selected"  # type: ignore[misc]
