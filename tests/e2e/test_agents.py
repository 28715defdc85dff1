"""The real agents: Bun and Claude Code (stripped BoringSSL), installed from npm at pinned versions.

1. The finder locates SSL_write/SSL_read in every pinned release (tests/agents/versions.txt).
2. An independent oracle proves the offsets right: bpftrace (not our BPF code) puts a uprobe at each
   found offset while the real program talks HTTPS to the local TLS server, and every byte the probes
   saw (RSI with length EDX at SSL_write; the buffer after SSL_read returns) must be exactly what the
   server received and sent on that connection, in order.

Needs root (uprobes), bpftrace, and the npm registry the first time (tests/agents/install.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

from llmspyd.discovery import boringssl
from tests.agents import Agent, ensure_installed, pinned

pytestmark = pytest.mark.e2e

# bytes of each call bpftrace prints: its string limit (BPFTRACE_STRLEN) is at most 200 in 0.17
SHOWN = 200
AGENT_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def agents() -> dict[str, Agent]:
    return {a.key: a for a in ensure_installed()}


ALL = [a.key for a in pinned()]
BUNS = [k for k in ALL if k.startswith("bun-")]
CLAUDES = [k for k in ALL if k.startswith("claude-code-")]
KEYS = BUNS + CLAUDES  # the stripped-BoringSSL executables
GEMINIS = [k for k in ALL if k.startswith("gemini-cli-")]
CODEXES = [k for k in ALL if k.startswith("codex-")]


@pytest.fixture(scope="module")
def found(agents: dict[str, Agent]) -> dict[str, boringssl.Analysis]:
    return {k: boringssl.analyse(str(agents[k].exe)) for k in KEYS}


@pytest.mark.parametrize("key", KEYS)
def test_finder_locates_ssl_write_and_read(found: dict[str, boringssl.Analysis], key: str) -> None:
    a = found[key]
    print(f"{key}: {a.seconds:.2f}s, {a.sites} error sites in {a.functions} functions, {a.vaddrs}")
    assert a.reason == ""
    assert set(a.offsets) == {"SSL_write", "SSL_read"}


# ---------------------------------------------------------------------------
# the uprobe oracle


def _need_bpftrace() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root for uprobes")
    bt = shutil.which("bpftrace")
    if bt is None:
        pytest.fail("bpftrace is not installed (packaging/build-deps.sh)")
    return bt


_LINE = re.compile(r"^(W|R) (\d+) (\d+) (-?\d+) (.*)$")


def _unescape(s: str) -> bytes:
    """bpftrace's %r: printable ASCII as is, everything else as \\xNN."""
    out = bytearray()
    i = 0
    while i < len(s):
        if s.startswith("\\x", i) and i + 4 <= len(s):
            out.append(int(s[i + 2 : i + 4], 16))
            i += 4
        else:
            out += s[i].encode("latin-1")
            i += 1
    return bytes(out)


class Oracle:
    """bpftrace with uprobes at the found offsets; collects (pid, ssl, len, first bytes) per call."""

    def __init__(self, exe: Path, write_off: int, read_off: int) -> None:
        bt = _need_bpftrace()
        prog = (
            f'uprobe:"{exe}":{write_off:#x} {{\n'
            f'  printf("W %d %lu %d %r\\n", pid, arg0, (int32)arg2, buf(arg1, {SHOWN})); }}\n'
            f'uprobe:"{exe}":{read_off:#x} {{ @buf[tid] = arg1; @ssl[tid] = arg0; }}\n'
            f'uretprobe:"{exe}":{read_off:#x} /@buf[tid]/ {{\n'
            f'  printf("R %d %lu %d %r\\n", pid, @ssl[tid], (int32)retval, buf(@buf[tid], {SHOWN}));\n'
            "  delete(@buf[tid]); delete(@ssl[tid]); }\n"
        )
        env = dict(os.environ, BPFTRACE_STRLEN=str(SHOWN))
        self.out = tempfile.NamedTemporaryFile("w+", prefix="oracle.", suffix=".txt")
        # --unsafe: bpftrace refuses raw offsets in a stripped binary without it
        self.proc = subprocess.Popen(
            [bt, "--unsafe", "-e", prog], stdout=self.out, stderr=subprocess.STDOUT, env=env, text=True
        )
        deadline = time.monotonic() + 30
        while "Attaching" not in Path(self.out.name).read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("bpftrace did not attach:\n" + Path(self.out.name).read_text())
            time.sleep(0.1)
        time.sleep(1.0)  # "Attaching" is printed just before the probes are live

    def stop(self) -> dict[tuple[str, int, int], list[tuple[int, bytes]]]:
        """(dir, pid, ssl) -> [(call length, first bytes)] in call order."""
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        calls: dict[tuple[str, int, int], list[tuple[int, bytes]]] = defaultdict(list)
        for line in Path(self.out.name).read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if m and int(m.group(4)) > 0:
                n = int(m.group(4))
                head = _unescape(m.group(5))[: min(n, SHOWN)]
                calls[(m.group(1), int(m.group(2)), int(m.group(3)))].append((n, head))
        self.out.close()
        return calls


def _matches(calls: list[tuple[int, bytes]], stream: bytes) -> bool:
    """The calls, in order, are exactly `stream`: lengths add up and each call's first bytes sit at its offset."""
    pos = 0
    for n, head in calls:
        if stream[pos : pos + len(head)] != head:
            return False
        pos += n
    return pos == len(stream)


def _check(calls, pid: int, tls_server, marker: bytes) -> tuple[int, int]:
    """Every connection of `pid` the probes saw matches a server connection byte for byte, in both directions."""
    conns = {c for (_d, p, c) in calls if p == pid}
    assert conns, f"the probes saw no call of pid {pid}: {sorted(calls)[:5]}"
    matched_w = matched_r = 0
    records = tls_server.connections()
    for ssl in conns:
        w = calls.get(("W", pid, ssl), [])
        r = calls.get(("R", pid, ssl), [])
        rec = [x for x in records if w and _matches(w, bytes(x.received))]
        assert rec, f"SSL_write calls on {ssl:#x} match no server connection: {w[:3]}"
        matched_w += sum(n for n, _ in w)
        # the reads are a prefix of what the server sent (the client may stop reading early)
        sent = bytes(rec[0].sent)
        pos = 0
        for n, head in r:
            assert sent[pos : pos + len(head)] == head, f"SSL_read bytes at {pos} differ from what the server sent"
            pos += n
        assert pos <= len(sent)
        matched_r += pos
    assert any(marker in bytes(x.received) for x in records)
    return matched_w, matched_r


@pytest.mark.parametrize("key", BUNS)
def test_bun_fetch_seen_byte_exact_at_found_offsets(agents, found, tls_server, tls_env, key: str) -> None:
    a, f = agents[key], found[key]
    assert f.offsets, f.reason
    oracle = Oracle(a.exe, f.offsets["SSL_write"][0], f.offsets["SSL_read"][0])
    marker = f"/oracle-{key}".encode()
    script = (
        f"const r = await fetch('{tls_server.url}{marker.decode()}', {{headers: {{'x-oracle': '{key}'}}}});"
        f"console.log(r.status, await r.text());"
        f"const r2 = await fetch('{tls_server.url}/bytes/50000');"
        f"console.log(r2.status, (await r2.arrayBuffer()).byteLength);"
    )
    try:
        p = subprocess.run([str(a.exe), "-e", script], env=tls_env, capture_output=True, text=True, timeout=60)
    finally:
        calls = oracle.stop()
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["200", "ok", "200", "50000"]
    w, r = _check(calls, _pid_of(calls, marker), tls_server, marker)
    assert w > 0 and r >= 50000


def test_other_bun_builds_of_each_release(agents, tls_server, tls_env) -> None:
    """npm also installs Bun's other x64 builds (baseline CPUs, musl): each is found; the glibc ones pass the oracle."""
    checked = []
    for key in BUNS:
        for exe in sorted((agents[key].prefix / "node_modules" / "@oven").glob("bun-linux-x64*/bin/bun*")):
            if exe.resolve() == agents[key].exe.resolve() or exe.read_bytes()[:4] != b"\x7fELF":
                continue
            a = boringssl.analyse(str(exe))
            assert a.reason == "" and set(a.offsets) == {"SSL_write", "SSL_read"}, (exe, a.reason)
            checked.append(exe)
            if "musl" in exe.parent.parent.name:
                continue  # needs the musl loader, which Debian does not have: found, not run
            oracle = Oracle(exe, a.offsets["SSL_write"][0], a.offsets["SSL_read"][0])
            marker = f"/oracle-{key}-{exe.parent.parent.name}".encode()
            script = f"const r = await fetch('{tls_server.url}{marker.decode()}'); console.log(await r.text())"
            try:
                p = subprocess.run([str(exe), "-e", script], env=tls_env, capture_output=True, text=True, timeout=60)
            finally:
                calls = oracle.stop()
            assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
            _check(calls, _pid_of(calls, marker), tls_server, marker)
    assert checked, "npm installed no other Bun build to check"
    print("checked:", *checked, sep="\n  ")


@pytest.mark.parametrize("key", CLAUDES)
def test_claude_request_seen_byte_exact_at_found_offsets(agents, found, tls_server, tls_env, key, tmp_path) -> None:
    a, f = agents[key], found[key]
    assert f.offsets, f.reason
    oracle = Oracle(a.exe, f.offsets["SSL_write"][0], f.offsets["SSL_read"][0])
    env = dict(
        tls_env,
        HOME=str(tmp_path),
        ANTHROPIC_BASE_URL=tls_server.url,
        ANTHROPIC_API_KEY="sk-ant-dummy-oracle",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
    )
    try:
        # the server answers "ok", not an API reply: claude fails after its request, which is all we need
        subprocess.run(
            [str(a.exe), "-p", f"oracle {key}", "--max-turns", "1"],
            env=env,
            capture_output=True,
            timeout=AGENT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
        )
    finally:
        calls = oracle.stop()
    marker = f"oracle {key}".encode()
    w, r = _check(calls, _pid_of(calls, b"/v1/messages"), tls_server, marker)
    assert w > 1000 and r > 0


def _pid_of(calls, marker: bytes) -> int:
    pids = {p for (d, p, _c), v in calls.items() if d == "W" and any(marker in head for _n, head in v)}
    assert len(pids) == 1, f"writes carrying {marker!r} came from pids {pids}"
    return pids.pop()


# ---------------------------------------------------------------------------
# through the project: capture core probes at the found offsets -> pipeline -> LLM exchange record


@pytest.mark.parametrize("key", CLAUDES)
def test_claude_exchange_through_capture_and_pipeline(
    agents, capture, certs, key, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`claude -p` against the fake Anthropic provider: the exchange (prompt, model, joined reply, usage) comes out."""
    from llmspyd.chunks import TlsChunk
    from llmspyd.discovery.target import Target
    from llmspyd.pipeline import Pipeline
    from tests.fakeprovider import FakeProvider, answer_text

    monkeypatch.setenv(boringssl.CACHE_ENV, str(tmp_path / "cache"))
    a = agents[key]
    st = os.stat(a.exe)
    target = boringssl.boringssl_target(str(a.exe), st.st_dev, st.st_ino)
    assert isinstance(target, Target), target
    session, log = capture
    assert sorted(session.probes.attach(target)) == ["SSL_read", "SSL_write"]

    prompt = f"say hello to llmspy from {key}"
    with FakeProvider(certs.cert, certs.key, alpn=("http/1.1",)) as fp:
        env = dict(
            os.environ,
            HOME=str(tmp_path),
            ANTHROPIC_BASE_URL=fp.url,
            ANTHROPIC_API_KEY="sk-ant-dummy-e2e",
            NODE_EXTRA_CA_CERTS=str(certs.ca),
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            DISABLE_AUTOUPDATER="1",
        )
        p = subprocess.Popen(
            [str(a.exe), "-p", prompt, "--tools", ""],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = p.communicate(timeout=AGENT_TIMEOUT_S)
    assert p.returncode == 0, err
    assert out.startswith("Hello from")

    def reply_seen() -> bool:  # the reply streams in small deltas: look for the end of the stream
        return any(b"message_stop" in c.data for c in log.chunks(pid=p.pid))

    assert log.wait_for(reply_seen, timeout=10), (
        f"no plaintext of pid {p.pid} captured; {len(log.chunks(pid=p.pid))} chunks; stats {session.stats()}"
    )
    exchanges: list = []
    pipe = Pipeline(emit=exchanges.append)
    pipe.feed(log.events(pid=p.pid))
    pipe.close()
    mine = [x for x in exchanges if any(prompt in (m.content or "") for m in x.request.messages)]
    assert mine, f"no exchange with the prompt among {[x.summary() for x in exchanges]}"
    x = mine[-1]
    print(x.summary())
    assert x.provider == "anthropic" and x.stream
    assert x.request.path.startswith("/v1/messages")
    assert x.model and x.response is not None and x.response.status == 200
    # the fake echoes the first text block of the last user message (claude may put a reminder before the prompt)
    assert x.response.text.startswith(answer_text(x.response.model or x.model, ""))
    assert x.response.text.strip() == out.strip()  # what claude printed is what we captured
    assert x.usage.input_tokens and x.usage.output_tokens
    assert all(isinstance(c, TlsChunk) for c in log.chunks(pid=p.pid))
    # the key was captured (x-api-key), and the redaction every sink applies removes it
    from llmspyd.sinks.redact import Redactor

    assert "sk-ant-dummy-e2e" in x.model_dump_json()
    assert "sk-ant-dummy-e2e" not in json.dumps(Redactor()(x.model_dump(mode="json")))


# ---------------------------------------------------------------------------
# the other agents: Gemini CLI (node, static OpenSSL) is captured; Codex (rustls) is named as not covered


def _gemini_env(base: dict[str, str], home: Path, url: str, ca: Path) -> dict[str, str]:
    (home / ".gemini").mkdir(parents=True, exist_ok=True)
    (home / ".gemini" / "settings.json").write_text('{"security": {"auth": {"selectedType": "gemini-api-key"}}}')
    return dict(
        base,
        HOME=str(home),
        GEMINI_API_KEY="dummy-gemini-e2e",
        GOOGLE_GEMINI_BASE_URL=url,
        NODE_EXTRA_CA_CERTS=str(ca),
        GEMINI_CLI_TRUST_WORKSPACE="true",
    )


@pytest.mark.parametrize("key", GEMINIS)
def test_gemini_exchange_through_capture_and_pipeline(agents, capture, certs, key, tmp_path) -> None:
    """`gemini -p` on node (static OpenSSL, SSL_* exported) against the fake Gemini API: the exchange comes out."""
    from llmspyd.chunks import TlsChunk
    from llmspyd.pipeline import Pipeline
    from tests.fakeprovider import FakeProvider, answer_text

    if shutil.which("node") is None:
        pytest.fail("node is not installed (packaging/build-deps.sh)")
    session, log = capture
    model = "gemini-2.5-flash"  # a fixed model skips the CLI's model router (one more request to the fake)
    start = time.monotonic_ns()
    with FakeProvider(certs.cert, certs.key) as fp:
        p = subprocess.run(
            [str(agents[key].cli), "-m", model, "-p", f"say hello to llmspy from {key}"],
            env=_gemini_env(dict(os.environ), tmp_path / "home", fp.url, certs.ca),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT_S,
        )
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"Hello from {model}!" in p.stdout

    def pids() -> set[int]:  # gemini relaunches itself: the requests come from a child node process
        mark = b"enerateContent"  # generateContent and streamGenerateContent
        return {c.pid for c in log.events(TlsChunk) if c.ts_ns >= start and mark in c.data}

    if not log.wait_for(lambda: bool(pids()), timeout=10):
        seen = sorted({(c.pid, c.comm) for c in log.events(TlsChunk) if c.ts_ns >= start})
        attached = [a.target.path for a in session.probes.attached().values()]
        heads = [c.data[:60] for c in log.events(TlsChunk) if c.ts_ns >= start and c.comm == "node"][:6]
        raise AssertionError(f"no Gemini request captured; processes seen {seen[:20]}; attached {attached}; {heads}")
    exchanges: list = []
    pipe = Pipeline(emit=exchanges.append)
    for pid in sorted(pids()):
        pipe.feed(log.events(pid=pid))
    pipe.close()
    mine = [x for x in exchanges if x.provider == "gemini" and x.response and x.response.status == 200]
    assert mine, f"no Gemini exchange among {[x.summary() for x in exchanges]}"
    print("\n".join(x.summary() for x in mine))
    x = mine[-1]
    assert x.model and x.model.startswith(model)
    assert x.response.text.startswith(answer_text(model, ""))
    assert x.response.text in p.stdout
    assert x.usage.input_tokens and x.usage.output_tokens


@pytest.mark.parametrize("key", CODEXES)
def test_codex_is_recognised_and_reported_not_covered(agents, certs, key, tmp_path, monkeypatch) -> None:
    """Codex runs (against the fake Responses API), and discovery names it: rustls, not covered, and why."""
    from llmspyd.chunks import Stack
    from llmspyd.discovery import procmaps
    from llmspyd.discovery.scanner import Scanner
    from llmspyd.discovery.target import Uncovered
    from tests.fakeprovider import FakeProvider

    monkeypatch.setenv(boringssl.CACHE_ENV, str(tmp_path / "cache"))
    exe = agents[key].exe
    st = os.stat(exe)
    mine = boringssl.boringssl_target(str(exe), st.st_dev, st.st_ino)
    assert isinstance(mine, Uncovered) and mine.stack == Stack.RUSTLS and "rustls" in mine.reason
    f = procmaps.OpenedFile(str(exe), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, "host")
    verdict, _ = Scanner().analyse(f)
    assert verdict.target is None
    assert verdict.uncovered is not None and verdict.uncovered.stack == Stack.RUSTLS, verdict

    home = tmp_path / "codex"
    home.mkdir()
    with FakeProvider(certs.cert, certs.key) as fp:
        (home / "config.toml").write_text(
            'model = "gpt-5-codex"\nmodel_provider = "fake"\n[model_providers.fake]\nname = "fake"\n'
            f'base_url = "{fp.url}/v1"\nenv_key = "FAKE_API_KEY"\nwire_api = "responses"\n'
        )
        p = subprocess.run(
            [str(agents[key].cli), "exec", "--skip-git-repo-check", f"say hello to llmspy from {key}"],
            env=dict(os.environ, CODEX_HOME=str(home), FAKE_API_KEY="sk-dummy-codex", SSL_CERT_FILE=str(certs.ca)),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT_S,
        )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Hello from gpt-5-codex!" in p.stdout


# ---------------------------------------------------------------------------
# the daemon as a user runs it: a claude started after the daemon is covered from its first request


@pytest.mark.parametrize("key", CLAUDES[-1:])
def test_daemon_covers_a_new_claude_from_its_first_request(agents, certs, key, tmp_path) -> None:
    """`llmspyd` running, then `claude -p`: the daemon attaches at exec (cached analysis) and records the exchange.

    The cache is warmed first, as after any earlier run of this claude: the very first analysis of a new binary
    can finish after the first request (see README, "Which agents are covered").
    """
    from tests.fakeprovider import start_subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    cache = tmp_path / "cache"
    exe = agents[key].exe
    st = os.stat(exe)
    os.environ[boringssl.CACHE_ENV] = str(cache)
    try:
        assert boringssl.boringssl_target(str(exe), st.st_dev, st.st_ino) is not None
    finally:
        del os.environ[boringssl.CACHE_ENV]
    out, log = tmp_path / "exchanges.jsonl", tmp_path / "daemon.log"
    root = Path(__file__).resolve().parents[2]
    fp_proc, url = start_subprocess(certs.cert, certs.key)
    with open(log, "wb") as logf:
        daemon = subprocess.Popen(
            [str(root / ".venv/bin/llmspyd"), "--no-config", "--output", f"jsonl:{out}"],
            env=dict(os.environ, **{boringssl.CACHE_ENV: str(cache)}),
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while b"probes attached" not in log.read_bytes():  # the startup scan is done
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        prompt = f"first request of a new claude {key}"
        env = dict(
            os.environ,
            HOME=str(tmp_path),
            ANTHROPIC_BASE_URL=url,
            ANTHROPIC_API_KEY="sk-ant-dummy-daemon",
            NODE_EXTRA_CA_CERTS=str(certs.ca),
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            DISABLE_AUTOUPDATER="1",
        )
        started = time.strftime("%H:%M:%S", time.gmtime()) + f".{time.time() % 1:.3f}"[2:]
        p = subprocess.run(
            [str(agents[key].cli), "-p", prompt, "--tools", ""],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT_S,
        )
        assert p.returncode == 0, p.stderr[-2000:]

        def mine() -> list[dict]:
            if not out.exists():
                return []
            recs = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
            return [r for r in recs if r.get("provider") == "anthropic" and prompt in json.dumps(r["request"])]

        deadline = time.monotonic() + 20
        while not mine() and time.monotonic() < deadline:
            time.sleep(0.2)
        recs = mine()
        about = [ln for ln in log.read_text(errors="replace").splitlines() if "claude" in ln]
        assert recs, f"no record of claude's request (started {started}); daemon log on claude:\n" + "\n".join(about)
        r = recs[0]
        assert r["response"]["status"] == 200 and r["response"]["text"].strip() == p.stdout.strip()
        assert r["usage"]["input_tokens"] and r["usage"]["output_tokens"]
        assert "sk-ant-dummy-daemon" not in out.read_text()  # the sinks redact the key
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)  # detaching many uprobes takes a while
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        fp_proc.kill()
        fp_proc.wait()
