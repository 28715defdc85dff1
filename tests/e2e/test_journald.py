"""journald sink against a real systemd-journald started by the test.

journald runs in a private mount namespace whose /run/systemd/journal and
/run/log/journal are bind mounts of test folders: its socket is reachable at
a test path, its files are read back with `journalctl -D`, and the host's
/run is not touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmspyd.llm.record import LlmExchange
from llmspyd.sinks import JsonLinesSink, Outputs
from llmspyd.sinks.journald import JournaldSink

pytestmark = pytest.mark.e2e

JOURNALD = "/lib/systemd/systemd-journald"
API_KEY = "sk-proj-E2ESECRETKEY0123456789abcdefghij"

START = r"""
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal /run/log/journal
mount --bind "$1/sock" /run/systemd/journal
mount --bind "$1/log" /run/log/journal
[ -d /var/log/journal ] && mount -t tmpfs tmpfs /var/log/journal
exec "$2"
"""


class Journal:
    def __init__(self, root: Path, proc: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.proc = proc
        self.socket = str(root / "sock" / "socket")

    def query(self, *matches: str, wait_s: float = 10.0, expect: int = 1) -> list[dict]:
        """journalctl -D … -o json --all MATCH…, waiting for `expect` entries to be readable."""
        deadline = time.monotonic() + wait_s
        while True:
            out = subprocess.run(
                ["journalctl", "-D", str(self.root / "log"), "-o", "json", "--all", "--no-pager", *matches],
                capture_output=True,
                check=False,
            ).stdout
            entries = [json.loads(line) for line in out.splitlines() if line.strip()]
            if len(entries) >= expect or time.monotonic() > deadline:
                return entries
            time.sleep(0.1)

    def raw_files(self) -> bytes:
        return b"".join(p.read_bytes() for p in (self.root / "log").rglob("*.journal"))


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journal]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run systemd-journald in a private mount namespace")
    if not os.path.exists(JOURNALD) or not shutil.which("journalctl") or not shutil.which("unshare"):
        pytest.skip(f"{JOURNALD}, journalctl or unshare missing")
    root = tmp_path_factory.mktemp("journal")
    (root / "sock").mkdir()
    (root / "log").mkdir()
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", START, "sh", str(root), JOURNALD],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "journald.err", "wb"),
    )
    j = Journal(root, proc)
    deadline = time.monotonic() + 10
    while not os.path.exists(j.socket):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"journald did not start: {(root / 'journald.err').read_text()}")
        time.sleep(0.05)
    yield j
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def make(ex_id: str, prompt: str = "Say hi", model: str = "gpt-4o-mini", **kw) -> LlmExchange:
    data = {
        "id": ex_id,
        "conversation_id": "conv-" + ex_id,
        "provider": "openai",
        "api": "chat.completions",
        "model": model,
        "stream": True,
        "latency_ms": 1234.5,
        "ttft_ms": 210.0,
        "process": {"pid": 4242, "comm": "agent", "exe": "/usr/bin/python3.11", "cmdline": ["python3", "agent.py"]},
        "connection": {"peer_addr": "127.0.0.1", "peer_port": 8443, "authority": "api.openai.com"},
        "request": {
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [["authorization", f"Bearer {API_KEY}"], ["content-type", "application/json"]],
            "messages": [{"role": "user", "content": prompt}],
            "body": json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]}),
        },
        "response": {"status": 200, "text": "Hi!\nHow can I help?", "finish_reason": "stop"},
        "usage": {"input_tokens": 9, "output_tokens": 5, "cache_read_tokens": 0},
        "complete": True,
    }
    data.update(kw)
    return LlmExchange.model_validate(data)


def test_fields_queryable(journal: Journal) -> None:
    sink = JournaldSink(journal.socket)
    Outputs([sink])(make("q1"))
    Outputs([sink])(make("q2", model="claude-3-5-haiku", response={"status": 529}, error={"kind": "http_error"}))
    sink.close()

    [e] = journal.query("LLM_EXCHANGE_ID=q1")
    assert e["SYSLOG_IDENTIFIER"] == "llmspyd"
    assert e["LLM_PROVIDER"] == "openai" and e["LLM_API"] == "chat.completions"
    assert e["LLM_MODEL"] == "gpt-4o-mini" and e["LLM_STATUS"] == "200" and e["LLM_STREAM"] == "1"
    assert e["LLM_INPUT_TOKENS"] == "9" and e["LLM_OUTPUT_TOKENS"] == "5"
    assert e["LLM_LATENCY_MS"] == "1234.500" and e["LLM_TTFT_MS"] == "210"
    assert e["LLM_PID"] == "4242" and e["LLM_COMM"] == "agent" and e["LLM_EXE"] == "/usr/bin/python3.11"
    assert e["LLM_CONVERSATION_ID"] == "conv-q1" and e["LLM_PEER"] == "127.0.0.1:8443"
    assert e["LLM_HOST"] == "api.openai.com"
    assert "gpt-4o-mini" in e["MESSAGE"] and "agent[4242]" in e["MESSAGE"] and "tokens=9→5" in e["MESSAGE"]
    # values with newlines took the binary-safe encoding and came back whole
    assert json.loads(e["LLM_RESPONSE"])["text"] == "Hi!\nHow can I help?"
    assert json.loads(e["LLM_REQUEST"])["messages"][0]["content"] == "Say hi"
    assert e["PRIORITY"] == "6"

    # the queries an administrator would type
    assert [x["LLM_EXCHANGE_ID"] for x in journal.query("LLM_MODEL=claude-3-5-haiku")] == ["q2"]
    failed = journal.query("LLM_STATUS=529")
    assert [x["LLM_EXCHANGE_ID"] for x in failed] == ["q2"] and failed[0]["PRIORITY"] == "4"
    assert len(journal.query("SYSLOG_IDENTIFIER=llmspyd", "LLM_PID=4242", expect=2)) >= 2
    assert journal.query("LLM_ERROR_KIND=http_error")[0]["LLM_EXCHANGE_ID"] == "q2"
    assert [x["LLM_EXCHANGE_ID"] for x in journal.query("LLM_FAILED=1")] == ["q2"]
    # two matches on one field are alternatives
    both = journal.query("LLM_MODEL=claude-3-5-haiku", "LLM_MODEL=gpt-4o-mini", expect=2)
    assert {x["LLM_EXCHANGE_ID"] for x in both} >= {"q1", "q2"}


@pytest.mark.parametrize("max_datagram", [None, 0], ids=["default", "memfd"])
def test_one_mib_prompt_arrives_whole(journal: Journal, max_datagram: int | None) -> None:
    # 1 MiB with newlines and non-ASCII, so both the binary encoding and the size path are exercised
    unit = "line of prompt ✓ #\n"
    prompt = (unit * (1024 * 1024 // len(unit.encode()) + 1))[: 1024 * 1024]
    ex_id = f"big-{max_datagram}"
    sink = JournaldSink(journal.socket, max_datagram=max_datagram)
    Outputs([sink])(make(ex_id, prompt=prompt))
    if max_datagram == 0:
        assert sink.writer.memfd_entries == 1
    sink.close()
    [e] = journal.query(f"LLM_EXCHANGE_ID={ex_id}")
    req = json.loads(e["LLM_REQUEST"])
    assert req["messages"][0]["content"] == prompt
    assert len(req["messages"][0]["content"]) == len(prompt)


def test_api_key_in_no_sink_output(journal: Journal, tmp_path: Path) -> None:
    """journald's stored files, a JSON lines file and stdout: the key used in the request is nowhere."""
    out_file = tmp_path / "ex.jsonl"
    stdout_file = tmp_path / "stdout"
    with open(stdout_file, "w") as so:
        outs = Outputs([JournaldSink(journal.socket), JsonLinesSink(path=str(out_file)), JsonLinesSink(so)])
        ex = make("secret-1", prompt=f"my key is {API_KEY}, also in ?api_key={API_KEY}")
        outs(ex)
        outs.close()
    [e] = journal.query("LLM_EXCHANGE_ID=secret-1")
    assert "Bearer REDACTED" in e["LLM_REQUEST"]
    subprocess.run(["journalctl", "-D", str(journal.root / "log"), "--sync"], check=False, capture_output=True)
    everything = {
        "journal entry": json.dumps(e).encode(),
        "journal files": journal.raw_files(),
        "jsonl file": out_file.read_bytes(),
        "stdout": stdout_file.read_bytes(),
    }
    assert b"secret-1" in everything["jsonl file"] and b"secret-1" in everything["stdout"]
    for where, blob in everything.items():
        assert API_KEY.encode() not in blob, f"API key found in {where}"
