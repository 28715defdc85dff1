"""llmspy status / tail / doctor, without a daemon: status file, journal entries and jsonl files made here."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from llmspyd import cli
from llmspyd.sinks.journald import journal_fields

RECORD = {
    "id": "ex-9",
    "provider": "anthropic",
    "api": "messages",
    "model": "claude-sonnet-4",
    "latency_ms": 900.0,
    "process": {"pid": 31, "comm": "claude"},
    "timing": {"request_start": "2026-11-25T18:00:01.123456Z"},
    "request": {"messages": [{"role": "user", "content": "What is 2+2?"}], "system": "be brief"},
    "response": {"status": 200, "text": "4", "tool_calls": [{"name": "calc", "arguments": '{"x":2}'}]},
    "usage": {"input_tokens": 10, "output_tokens": 1},
}


def test_journal_entry_rebuilds_the_record() -> None:
    entry = {name: (v.decode() if isinstance(v, bytes) else v) for name, v in journal_fields(RECORD)}
    assert cli.journal_record(entry) == RECORD
    # journalctl prints a non-UTF-8 value as a list of byte values
    entry["LLM_RESPONSE"] = list(json.dumps(RECORD["response"]).encode())
    assert cli.journal_record(entry)["response"] == RECORD["response"]


def test_format_exchange_readable() -> None:
    text = cli.format_exchange(RECORD)
    assert "claude[31] → anthropic claude-sonnet-4" in text and "18:00:01.123" in text
    assert "user> What is 2+2?" in text and "model> 4" in text and 'tool> calc({"x":2})' in text
    long = dict(RECORD, request={"messages": [{"role": "user", "content": "x" * 5000}]})
    assert len(cli.format_exchange(long)) < 600 and len(cli.format_exchange(long, full=True)) > 5000


def test_tail_file_json(tmp_path: Path, capsys) -> None:
    f = tmp_path / "ex.jsonl"
    f.write_text("".join(json.dumps(dict(RECORD, id=f"ex-{i}")) + "\n" for i in range(5)))
    assert cli.main(["tail", "--file", str(f), "--no-follow", "-n", "2", "--json"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["id"] for x in out] == ["ex-3", "ex-4"]


def test_status_running_and_stale(tmp_path: Path, capsys) -> None:
    st = {
        "pid": os.getpid(), "started": time.time() - 65, "updated": time.time(), "health": "ok",
        "config": ["<built-in defaults>"], "scope": "all", "processes_traced": 2, "exchanges": 7,
        "bpf": {"bytes": 1000, "records": 3, "calls": 3}, "losses": {"lost_records": 1, "lost_bytes": 0},
        "sinks": {"journald": {"errors": 0}},
        "probes": [{"path": "/usr/lib/x86_64-linux-gnu/libssl.so.3", "stack": "openssl", "roles": ["SSL_write"]}],
        "pipeline": {"connections": 4, "http1": 2, "h2": 1, "unknown_protocol": 1, "muted": 1, "gaps": 1,
                     "gap_bytes": 512, "parse_errors": 0, "stage_errors": 0},
    }  # fmt: skip
    f = tmp_path / "status.json"
    f.write_text(json.dumps(st))
    assert cli.main(["status", "--file", str(f)]) == 0
    out = capsys.readouterr().out
    assert "running" in out and "exchanges:  7" in out and "lost_records=1" in out and "libssl.so.3" in out
    assert "4 connections (http/1 2, h2 1, other 1, muted 1); gaps 1 (512 bytes)" in out
    st["pid"] = 2**22 + 1  # above pid_max: no such process
    f.write_text(json.dumps(st))
    assert cli.main(["status", "--file", str(f)]) == 3
    assert "NOT running" in capsys.readouterr().out
    assert cli.main(["status", "--file", str(tmp_path / "none.json")]) == 3


def test_status_names_uncovered_programs_running_or_gone() -> None:
    disc = {
        "processes_with_tls": 2, "covered": ["10 curl"],
        "uncovered": [{"pid": 11, "comm": "codex", "exe": "/usr/bin/codex", "container": "docker:abc",
                       "reasons": ["rustls: no sound plaintext hook"]}],
        "uncovered_seen": [
            {"exe": "/usr/bin/codex", "comm": "codex", "container": "", "reasons": ["x"], "last_pid": 9, "seen": 0},
            {"exe": "/opt/old", "comm": "old", "container": "", "reasons": ["stripped"], "last_pid": 5,
             "seen": time.time() - 3600},
        ],
    }  # fmt: skip
    out = cli.format_status({"pid": 1, "discovery": disc})
    assert "2 running processes with TLS, 1 covered, 1 not covered" in out
    assert "NOT COVERED pid 11 codex (/usr/bin/codex, docker:abc): rustls: no sound plaintext hook" in out
    assert "NOT COVERED old (/opt/old, last pid 5, exited 01:00:0" in out and ": stripped" in out
    assert out.count("/usr/bin/codex") == 1  # running: not listed twice


def test_doctor_gives_a_verdict_and_fix_for_each(tmp_path: Path, capsys) -> None:
    (tmp_path / "llmspyd.toml").write_text("[trace]\nbogus = 1\n")
    rc = cli.main(["doctor", "--config-dir", str(tmp_path), "--status-file", str(tmp_path / "s.json"), "--json"])
    checks = json.loads(capsys.readouterr().out)
    by = {c["check"]: c for c in checks}
    assert rc == 1  # the bad configuration is a failure
    assert by["configuration"]["verdict"] == "FAIL" and "trace.bogus" in by["configuration"]["detail"]
    assert by["daemon"]["verdict"] == "warn"
    for c in checks:
        assert c["verdict"] in ("ok", "warn", "FAIL")
        if c["verdict"] != "ok":
            assert c["fix"], c
