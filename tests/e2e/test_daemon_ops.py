"""Operations of the real `llmspyd` process: every sink at once, SIGHUP, SIGTERM, the status file.

(tests/e2e/test_daemon.py covers the records themselves with real SDKs.)

The daemon writes to a standalone journald (see test_journald.py), a JSON lines
file and its standard output; curl sends an API key in a header and in a URL
parameter, and the key must be in none of the three. Then SIGHUP with a broken
drop-in (refused, the daemon keeps recording), and SIGTERM (clean exit 0).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_journald import Journal, journal  # noqa: F401  (the journald fixture)
from tests.fakeprovider import FakeProvider

pytestmark = pytest.mark.e2e

API_KEY = "sk-proj-DAEMONE2E" + secrets.token_hex(12)
GOOGLE_KEY = "AIzaDAEMONE2E" + secrets.token_hex(10)


class Daemon:
    def __init__(self, proc: subprocess.Popen[str], out: Path, jsonl: Path, err: Path, cfg: Path) -> None:
        self.proc, self.out, self.jsonl, self.err, self.cfg = proc, out, jsonl, err, cfg

    def records(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(x) for x in self.jsonl.read_text().splitlines() if x.strip()]

    def wait_record(self, model: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.records():
                if r.get("model") == model:
                    return r
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"no record for {model}; daemon log:\n{self.err.read_text()[-3000:]}")

    def log_has(self, text: str, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.err.read_text():
                return True
            time.sleep(0.1)
        return False


@pytest.fixture(scope="module")
def provider(certs) -> Iterator[FakeProvider]:  # type: ignore[no-untyped-def]
    with FakeProvider(certs.cert, certs.key) as fp:
        yield fp


@pytest.fixture(scope="module")
def daemon(journal: Journal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:  # noqa: F811
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    d = tmp_path_factory.mktemp("daemon")
    cfg = d / "etc"
    (cfg / "llmspyd.d").mkdir(parents=True)
    (cfg / "llmspyd.toml").write_text(
        f'[daemon]\nstatus_file = "{d}/run/status.json"\nstatus_interval_s = 1\n'
    )
    out, err, jsonl = d / "stdout", d / "stderr", d / "ex.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmspyd", "--config-dir", str(cfg), "--output", f"journald:{journal.socket}",
         "--output", f"jsonl:{jsonl}", "--output", "stdout"],
        stdout=open(out, "w"), stderr=open(err, "w"), text=True,
    )  # fmt: skip
    dm = Daemon(proc, out, jsonl, err, cfg)
    try:
        assert dm.log_has("probes attached", timeout=60), err.read_text()[-3000:]
        yield dm
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def curl(provider: FakeProvider, certs, model: str, prompt: str) -> str:  # type: ignore[no-untyped-def]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]})
    r = subprocess.run(
        ["curl", "-sS", "--http1.1", "--cacert", str(certs.ca), f"{provider.url}/v1/chat/completions?key={GOOGLE_KEY}",
         "-H", f"Authorization: Bearer {API_KEY}", "-H", "content-type: application/json", "-d", body],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return r.stdout


def test_api_key_in_no_output_of_the_real_daemon(daemon: Daemon, journal: Journal, provider, certs) -> None:  # noqa: F811
    model = "gpt-e2e-" + secrets.token_hex(4)
    curl(provider, certs, model, f"remember {API_KEY}")
    rec = daemon.wait_record(model)
    assert rec["process"]["comm"] == "curl" and rec["response"]["status"] == 200
    assert ["authorization", "Bearer REDACTED"] in rec["request"]["headers"]
    assert "key=REDACTED" in rec["request"]["path"]
    [entry] = journal.query(f"LLM_MODEL={model}")
    assert entry["LLM_COMM"] == "curl" and entry["LLM_STATUS"] == "200"
    outputs = {
        "journal entry": json.dumps(entry),
        "jsonl file": daemon.jsonl.read_text(),
        "stdout": daemon.out.read_text(),
        "daemon log": daemon.err.read_text(),
    }
    assert model in outputs["stdout"]
    for where, text in outputs.items():
        assert API_KEY not in text, f"API key in {where}"
        assert GOOGLE_KEY not in text, f"URL key in {where}"


def test_status_file_reports_live_counters(daemon: Daemon) -> None:
    status = daemon.cfg.parent / "run" / "status.json"
    deadline = time.monotonic() + 10
    st: dict = {}
    while time.monotonic() < deadline:  # rewritten every status_interval_s (1 s here)
        if status.exists():
            st = json.loads(status.read_text())
            if st.get("exchanges", 0) >= 1:
                break
        time.sleep(0.2)
    assert st["pid"] == daemon.proc.pid and st["ready"] and st["health"] == "ok"
    assert st["exchanges"] >= 1 and st["probes"] and st["bpf"]["bytes"] > 0


def test_sighup_with_bad_config_keeps_recording(daemon: Daemon, provider, certs) -> None:  # type: ignore[no-untyped-def]
    bad = daemon.cfg / "llmspyd.d" / "90-bad.toml"
    bad.write_text("[limits]\nidle_timeout_s = 'soon'\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.log_has("reload refused")
    assert str(bad) in daemon.err.read_text() and daemon.proc.poll() is None
    model = "gpt-after-hup-" + secrets.token_hex(3)
    curl(provider, certs, model, "still recording?")
    daemon.wait_record(model)
    bad.write_text("[daemon]\nlog_level = 'debug'\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.log_has("configuration reloaded")


def test_sigterm_stops_cleanly(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert "stopped" in daemon.err.read_text()
