"""The whole daemon, as a user runs it: `llmspyd` loads the real BPF objects, real SDKs and CLIs talk to a local fake
provider over TLS, and the records it writes hold what was asked and what came back.

The daemon runs as its own process with NOTIFY_SOCKET pointing at a socket of the test, so READY=1 is checked the way
systemd sees it. Clients run as subprocesses; records are matched to them by pid.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fakeprovider as fp

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-DO-NOT-LEAK-7f3a9c2e51"
READY_TIMEOUT_S = 60
RECORD_TIMEOUT_S = 20


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        pytest.skip("kernel has no BTF (/sys/kernel/btf/vmlinux)")


class Daemon:
    def __init__(self, out: Path, proc: subprocess.Popen, notify: socket.socket, log: Path) -> None:
        self.out, self.proc, self.notify, self.log = out, proc, notify, log

    def notifications(self, timeout: float) -> list[str]:
        self.notify.settimeout(timeout)
        got = []
        try:
            while True:
                got.extend(self.notify.recv(65536).decode().split("\n"))
                self.notify.settimeout(0.05)
        except (TimeoutError, BlockingIOError):
            pass
        return got

    def records(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def records_of(self, pid: int, n: int = 1, timeout: float = RECORD_TIMEOUT_S) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            recs = [r for r in self.records() if r["process"]["pid"] == pid]
            if len(recs) >= n or time.monotonic() > deadline:
                return recs
            time.sleep(0.2)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    _need_root()
    d = tmp_path_factory.mktemp("daemon")
    out, log = d / "exchanges.jsonl", d / "daemon.log"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(d / "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=str(d / "notify.sock"))
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/llmspyd"), "--no-config", "--output", f"jsonl:{out}"],
            env=env, stdout=logf, stderr=subprocess.STDOUT,
        )
    dm = Daemon(out, proc, notify, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    seen: list[str] = []
    while "READY=1" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += dm.notifications(1.0)
    if "READY=1" not in seen:
        proc.kill()
        pytest.fail(f"daemon never sent READY=1 (exit {proc.poll()}): {log.read_text()[-3000:]}")
    yield dm
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("daemon did not stop within 30 s of SIGTERM")
    notify.close()


@pytest.fixture(scope="module")
def provider(certs) -> Iterator[str]:
    # its own process: the daemon traces every process but itself, and records are matched by client pid
    proc, url = fp.start_subprocess(certs.cert, certs.key)
    yield url
    proc.kill()
    proc.wait()


def _run(argv: list[str], env: dict[str, str], stdin: str | None = None) -> tuple[int, str]:
    p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out, err = p.communicate(stdin, timeout=60)
    assert p.returncode == 0, f"{argv[0]} failed: {err[-2000:]}"
    return p.pid, out


def _python(code: str, env: dict[str, str]) -> tuple[int, str]:
    return _run([sys.executable, "-c", code], env)


def test_ready_and_status(daemon: Daemon) -> None:
    status = [n for n in daemon.notifications(8.0) if n.startswith("STATUS=")]
    assert status, "daemon sends STATUS= with live counters"


def test_openai_sdk_streamed_chat_with_usage(daemon: Daemon, provider: str, tls_env) -> None:
    prompt = "What is the capital of France, streamed?"
    pid, out = _python(f"""
import openai
c = openai.OpenAI(base_url={provider + '/v1'!r}, api_key={API_KEY!r})
s = c.chat.completions.create(model="gpt-4o-mini", stream=True, stream_options={{"include_usage": True}},
    messages=[{{"role": "system", "content": "Be brief."}}, {{"role": "user", "content": {prompt!r}}}])
print("".join(ch.choices[0].delta.content or "" for ch in s if ch.choices))
""", tls_env)
    (rec,) = daemon.records_of(pid)
    assert rec["provider"].startswith("openai")
    assert rec["api"] == "chat.completions"
    assert rec["model"] == "gpt-4o-mini"
    assert rec["stream"] is True and rec["complete"] is True, json.dumps(rec)
    assert rec["request"]["messages"][-1]["content"] == prompt
    assert rec["request"]["system"] == "Be brief."
    assert rec["response"]["text"] == out.strip() == fp.answer_text("gpt-4o-mini", prompt)
    assert rec["response"]["status"] == 200
    assert rec["usage"]["output_tokens"] and rec["usage"]["input_tokens"]
    assert rec["ttft_ms"] is not None and 0 < rec["ttft_ms"] <= rec["latency_ms"]
    assert rec["process"]["comm"].startswith("python")


def test_openai_sdk_over_http2_not_streamed(daemon: Daemon, provider: str, tls_env) -> None:
    prompt = "Plain JSON over h2, please"
    pid, out = _python(f"""
import httpx, openai
c = openai.OpenAI(base_url={provider + '/v1'!r}, api_key={API_KEY!r}, http_client=httpx.Client(http2=True))
r = c.chat.completions.create(model="gpt-4.1", messages=[{{"role": "user", "content": {prompt!r}}}])
print(r.choices[0].message.content)
""", tls_env)
    (rec,) = daemon.records_of(pid)
    assert rec["connection"]["http_version"] == "2"
    assert rec["stream"] is False
    assert rec["response"]["text"] == out.strip() == fp.answer_text("gpt-4.1", prompt)
    assert rec["usage"]["input_tokens"] and rec["usage"]["output_tokens"]


def test_anthropic_sdk_streamed_messages(daemon: Daemon, provider: str, tls_env) -> None:
    prompt = "Tell me about uprobes"
    pid, out = _python(f"""
import anthropic
c = anthropic.Anthropic(base_url={provider!r}, api_key={API_KEY!r})
with c.messages.stream(model="claude-sonnet-4-5", max_tokens=256, system="You are terse.",
                       messages=[{{"role": "user", "content": {prompt!r}}}]) as s:
    print("".join(s.text_stream))
""", tls_env)
    (rec,) = daemon.records_of(pid)
    assert (rec["provider"], rec["api"], rec["model"]) == ("anthropic", "messages", "claude-sonnet-4-5")
    assert rec["response"]["text"] == out.strip() == fp.answer_text("claude-sonnet-4-5", prompt)
    assert rec["response"]["finish_reason"] == "end_turn"
    assert rec["usage"]["input_tokens"] and rec["usage"]["output_tokens"]
    assert rec["request"]["parameters"].get("max_tokens") == 256


def test_curl_http2_gemini_sse(daemon: Daemon, provider: str, tls_env) -> None:
    prompt = "Gemini over curl"
    body = json.dumps({"contents": [{"role": "user", "parts": [{"text": prompt}]}]})
    pid, out = _run(["curl", "-sS", "--http2", f"{provider}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                     "-H", f"x-goog-api-key: {API_KEY}", "-H", "content-type: application/json", "-d", body], tls_env)
    (rec,) = daemon.records_of(pid)
    assert rec["provider"].startswith("gemini") and rec["model"] == "gemini-2.5-flash"
    assert rec["connection"]["http_version"] == "2"
    assert rec["stream"] is True
    assert rec["response"]["text"] == fp.answer_text("gemini-2.5-flash", prompt)


def test_node_fetch_responses_api(daemon: Daemon, provider: str, tls_env) -> None:
    prompt = "Hello from node"
    script = f"""
const r = await fetch({provider + '/v1/responses'!r}, {{method: "POST",
  headers: {{"authorization": "Bearer {API_KEY}", "content-type": "application/json"}},
  body: JSON.stringify({{model: "gpt-5", input: {prompt!r}, stream: true}})}});
const t = await r.text(); console.log(t.length);
"""
    pid, _ = _run(["node", "--input-type=module", "-e", script], tls_env)
    (rec,) = daemon.records_of(pid)
    assert (rec["api"], rec["model"]) == ("responses", "gpt-5")
    assert rec["response"]["text"] == fp.answer_text("gpt-5", prompt)
    assert rec["process"]["comm"] == "node"


def test_two_exchanges_on_one_keepalive_connection(daemon: Daemon, provider: str, tls_env) -> None:
    pid, _ = _python(f"""
import openai
c = openai.OpenAI(base_url={provider + '/v1'!r}, api_key={API_KEY!r})
for q in ("first question", "second question"):
    c.chat.completions.create(model="gpt-4o", messages=[{{"role": "user", "content": q}}])
""", tls_env)
    recs = daemon.records_of(pid, n=2)
    assert [r["request"]["messages"][-1]["content"] for r in recs] == ["first question", "second question"]
    assert recs[0]["connection"]["conn"] == recs[1]["connection"]["conn"]
    assert recs[0]["id"] != recs[1]["id"]


def test_non_llm_https_makes_no_record(daemon: Daemon, provider: str, tls_env) -> None:
    pid, _ = _run(["curl", "-sS", "-o", "/dev/null", f"{provider}/not-an-llm/health"], tls_env)
    time.sleep(2)
    assert daemon.records_of(pid, timeout=0) == []


RUSTLS_LIKE = r"""#include <stdio.h>
#include <unistd.h>
/* what a Rust program with rustls carries in its read-only data: no TLS symbols to probe */
const char *a = "/rustc/90b35a6239c3d8bdabc530a6a0816f7ff89a0aaf/library/core/src/fmt/mod.rs";
const char *b = "/root/.cargo/registry/src/index.crates.io-6f17d22bba15001f/rustls-0.23.12/src/conn.rs";
int main(void) { puts(a); puts(b); sleep(2); return 0; }
"""


def test_status_names_a_program_it_cannot_cover(daemon: Daemon, tmp_path: Path) -> None:
    src, exe = tmp_path / "rustagent.c", tmp_path / "rustagent"
    src.write_text(RUSTLS_LIKE)
    subprocess.run(["cc", "-O1", "-o", str(exe), str(src)], check=True)
    subprocess.run([str(exe)], check=True, capture_output=True)  # runs 2 s, then exits
    deadline = time.monotonic() + 20
    out = ""
    while time.monotonic() < deadline:  # the status file is rewritten every few seconds
        out = subprocess.run([str(ROOT / ".venv/bin/llmspy"), "status"], capture_output=True, text=True).stdout
        if str(exe) in out:
            break
        time.sleep(1)
    line = next((ln for ln in out.splitlines() if str(exe) in ln), "")
    assert "NOT COVERED" in line and "rustagent" in line and "rustls" in line, out


def test_no_secret_in_any_record(daemon: Daemon) -> None:
    # runs after the tests above (file order): every request they made carried API_KEY
    text = daemon.out.read_text()
    assert text.count('"provider"') >= 5
    assert API_KEY not in text
    assert API_KEY not in daemon.log.read_text()
