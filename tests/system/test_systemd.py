"""llmspyd as a real service: the .deb in a Debian 12 container booted by systemd-nspawn.

The root is made once by debootstrap and cached in CACHE (about 3 minutes the
first time); each run boots an overlay of it, so the cache stays pristine.
Inside: `apt-get install ./llmspyd_*.deb`, `systemctl enable --now llmspyd`,
a curl → TLS server exchange found with `journalctl -u llmspyd LLM_MODEL=…`,
reload with a bad and a good drop-in, a SIGSTOPped daemon restarted by the
watchdog, and stop. BPF is loaded by the unit (a shell entered with nsenter
would not pass nspawn's seccomp filter the same way).

Known limit (see README): the kernel reports host pids, so a daemon inside a
pid namespace cannot resolve processes that exec after it started; the TLS
server is therefore started before llmspyd, whose start-up scan finds libssl,
and one attach per file then covers curl too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LLMSPY_TEST_CACHE", "/var/cache/llmspyd-test"))
ROOT_CACHE = CACHE / "debian12-root"


def host_mirror() -> str:
    """The Debian archive this machine's apt uses (deb822 or one-line sources), for debootstrap."""
    import glob
    import re

    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")) + ["/etc/apt/sources.list"]:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            if re.search(r"^Suites:.*\bbookworm\b", stanza, re.M):
                m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if m:
                    return m.group(1)
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M)
        if m:
            return m.group(1)
    pytest.skip("no Debian bookworm archive in this machine's apt sources to debootstrap from")


# what the root needs beyond minbase: an init, the package's dependencies, a TLS client and server
INCLUDE = "systemd,systemd-sysv,dbus,libbpf1,python3.11,procps,curl,ca-certificates,openssl,iproute2"
API_KEY = "sk-proj-SYSTEMTEST" + secrets.token_hex(12)
PORT = 8443

SERVER = r"""
import json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        said = body["messages"][-1]["content"]
        out = json.dumps({"id": "chatcmpl-sys", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong: " + said},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass

srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("/opt/llt/cert.pem", "/opt/llt/key.pem")
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


def _need() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, overlayfs, systemd-nspawn)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb", "openssl"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (packaging/build-deps.sh installs it)")


def _debootstrap() -> Path:
    if (ROOT_CACHE / "usr/lib/systemd/systemd").exists() or (ROOT_CACHE / "lib/systemd/systemd").exists():
        return ROOT_CACHE
    tmp = CACHE / "debian12-root.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", "bookworm", str(tmp), host_mirror()],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.fail(f"debootstrap failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    tmp.rename(ROOT_CACHE)
    return ROOT_CACHE


def _build_deb() -> Path:
    r = subprocess.run(["make", "-s", "deb"], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"make deb failed: {r.stderr[-3000:]}")
    debs = sorted((REPO / "dist").glob("llmspyd_*.deb"), key=lambda p: p.stat().st_mtime)
    assert debs, "make deb produced no package"
    return debs[-1]


class Cgroup:
    """A cgroup of our own for nspawn (in every hierarchy nspawn may look at), removed afterwards."""

    def __init__(self, name: str) -> None:
        base = Path("/sys/fs/cgroup")
        if (base / "cgroup.controllers").exists():  # pure cgroup v2
            roots = [base]
        else:  # hybrid/legacy: systemd's named hierarchy and the unified one
            roots = [p for p in (base / "systemd", base / "unified") if p.is_dir()]
        self.dirs = [r / name for r in roots]
        for d in self.dirs:
            d.mkdir(exist_ok=True)

    def enter(self) -> None:  # in the child, before exec
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for d in self.dirs:
            if not d.exists():
                continue
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    sub.rmdir()
                except OSError:
                    pass
            try:
                d.rmdir()
            except OSError as e:
                print(f"cannot remove cgroup {d}: {e}")


class Container:
    def __init__(self, nspawn: subprocess.Popen[bytes], pid1: int, root: Path) -> None:
        self.nspawn = nspawn
        self.pid1 = pid1
        self.root = root

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *cmd], capture_output=True, text=True, timeout=timeout
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def prop(self, unit: str, name: str) -> str:
        return self.run("systemctl", "show", "-p", name, "--value", unit).stdout.strip()

    def wait(self, cond, timeout: float, what: str, every: float = 0.5):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if time.monotonic() > deadline:
                log = self.run("journalctl", "-u", "llmspyd", "--no-pager", "-n", "40", check=False).stdout
                raise AssertionError(f"timed out waiting for {what}\n{log}")
            time.sleep(every)

    def journal(self, *matches: str) -> list[dict]:
        out = self.run("journalctl", "-o", "json", "--all", "--no-pager", *matches, check=False).stdout
        return [json.loads(x) for x in out.splitlines() if x.strip()]

    def curl_chat(self, model: str, prompt: str) -> str:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]})
        return self.run(
            "curl", "-sS", "--cacert", "/opt/llt/cert.pem", f"https://127.0.0.1:{PORT}/v1/chat/completions",
            "-H", f"Authorization: Bearer {API_KEY}", "-H", "content-type: application/json", "-d", body,
        ).stdout  # fmt: skip


def _find_pid1(nspawn_pid: int, timeout: float = 30) -> int:
    """The container's init: a process whose NSpid line is '<host pid> 1', descended from nspawn."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                status = Path(f"/proc/{name}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("NSpid", "").split() == [name, "1"] and int(fields["PPid"]) == nspawn_pid:
                return int(name)
        time.sleep(0.1)
    raise AssertionError("container init not found")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    _need()
    lower = _debootstrap()
    deb = _build_deb()
    work = tmp_path_factory.mktemp("nspawn")
    root = work / "root"
    for d in ("upper", "work", "root"):
        (work / d).mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={work}/upper,workdir={work}/work",
         str(root)],
        check=True,
    )  # fmt: skip
    cg = Cgroup(f"llmspytest-{os.getpid()}")
    nspawn = None
    try:
        # the user's path: apt install ./llmspyd_*.deb (dependencies are in the root already: works offline)
        shutil.copy(deb, root / "var/tmp" / deb.name)
        r = subprocess.run(
            ["chroot", str(root), "apt-get", "install", "-y", "-q", "--no-install-recommends", f"/var/tmp/{deb.name}"],
            capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        (root / "opt/llt").mkdir(parents=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(root / "opt/llt/key.pem"),
             "-out", str(root / "opt/llt/cert.pem")],
            check=True, capture_output=True,
        )  # fmt: skip
        (root / "opt/llt/server.py").write_text(SERVER)

        nspawn = subprocess.Popen(
            ["systemd-nspawn", "-b", "-D", str(root), "--keep-unit", "--register=no", "--private-network",
             "--system-call-filter=bpf perf_event_open", "--capability=all", "-M", "llmspytest"],
            stdin=subprocess.DEVNULL, stdout=open(work / "console.log", "wb"), stderr=subprocess.STDOUT,
            preexec_fn=cg.enter,
        )  # fmt: skip
        box = Container(nspawn, _find_pid1(nspawn.pid), root)
        box.wait(
            lambda: box.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded"),
            90,
            "the container to boot",
        )
        # a TLS server that maps libssl is running before the daemon starts (see the module docstring)
        box.run("systemd-run", "--unit=llt-server", "/usr/bin/python3.11", "/opt/llt/server.py", str(PORT))
        box.wait(lambda: box.run("curl", "-s", "-o", "/dev/null", "--cacert", "/opt/llt/cert.pem",
                                 f"https://127.0.0.1:{PORT}/", check=False).returncode == 0 or None,
                 20, "the TLS server")  # fmt: skip
        yield box
    finally:
        if nspawn is not None:
            nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                nspawn.wait(30)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait(10)
        subprocess.run(["umount", "-l", str(root)], check=False)
        cg.remove()
        shutil.rmtree(work, ignore_errors=True)


def _active(box: Container) -> bool:
    return box.run("systemctl", "is-active", "llmspyd", check=False).stdout.strip() == "active"


def test_enable_now_becomes_active(box: Container) -> None:
    box.run("systemctl", "enable", "--now", "llmspyd", timeout=120)
    assert _active(box)  # Type=notify: `enable --now` returned after READY=1
    assert box.prop("llmspyd", "Type") == "notify"
    box.wait(lambda: "files probed" in box.prop("llmspyd", "StatusText"), 20, "STATUS= with counters")
    st = json.loads(box.run("llmspy", "status", "--json").stdout)
    assert st["ready"] and st["health"] == "ok" and st["probes"], st
    assert "/etc/llmspy/llmspyd.toml" in st["config"]


def test_exchange_found_by_model_in_the_journal(box: Container) -> None:
    model = "gpt-systest-" + secrets.token_hex(4)
    assert "pong: hello from the container" in box.curl_chat(model, "hello from the container")
    [e] = box.wait(lambda: box.journal("-u", "llmspyd", f"LLM_MODEL={model}"), 30, "the exchange in the journal")
    assert e["LLM_COMM"] == "curl" and e["LLM_STATUS"] == "200" and e["LLM_API"] == "chat.completions"
    assert e["LLM_INPUT_TOKENS"] == "7" and e["LLM_OUTPUT_TOKENS"] == "3" and e["SYSLOG_IDENTIFIER"] == "llmspyd"
    assert json.loads(e["LLM_RESPONSE"])["text"] == "pong: hello from the container"
    assert model in e["MESSAGE"]
    everything = box.run("journalctl", "-u", "llmspyd", "-o", "export", "--all", "--no-pager").stdout
    assert API_KEY not in everything and "Bearer REDACTED" in everything
    # llmspy tail reads the same records back
    tail = box.run("llmspy", "tail", "--no-follow", "-n", "5").stdout
    assert model in tail and "user> hello from the container" in tail


def test_reload_refuses_bad_config_and_applies_good(box: Container) -> None:
    pid = box.prop("llmspyd", "MainPID")
    dropin = box.root / "etc/llmspy/llmspyd.d/50-test.toml"
    dropin.write_text("[output]\nsinks = ['carrier-pigeon']\n")
    # systemctl reload checks first: the administrator sees the error, the daemon is not even signalled
    r = box.run("systemctl", "reload", "llmspyd", check=False)
    assert r.returncode != 0
    assert _active(box) and box.prop("llmspyd", "MainPID") == pid
    # a SIGHUP that bypasses the check: the daemon refuses the file itself and keeps running
    box.run("systemctl", "kill", "-s", "HUP", "--kill-who=main", "llmspyd")
    box.wait(
        lambda: any("reload refused" in x.get("MESSAGE", "") for x in box.journal("-u", "llmspyd", "-n", "20")),
        15,
        "the refusal in the log",
    )
    assert _active(box) and box.prop("llmspyd", "MainPID") == pid
    st = json.loads(box.run("llmspy", "status", "--json").stdout)
    assert "50-test.toml" in st["last_reload_error"] and "output.sinks" in st["last_reload_error"]
    # still recording with the old configuration
    model = "gpt-after-bad-reload-" + secrets.token_hex(3)
    box.curl_chat(model, "still there?")
    box.wait(lambda: box.journal("-u", "llmspyd", f"LLM_MODEL={model}"), 30, "an exchange after the refused reload")
    # a good file is applied without a restart
    dropin.write_text("[daemon]\nlog_level = 'debug'\n")
    r = box.run("systemctl", "reload", "llmspyd", check=False)
    assert r.returncode == 0, box.run("journalctl", "-u", "llmspyd", "--no-pager", "-n", "30").stdout
    box.wait(lambda: json.loads(box.run("llmspy", "status", "--json").stdout)["reloads"]["ok"] >= 1, 15, "reload")
    assert _active(box) and box.prop("llmspyd", "MainPID") == pid
    dropin.unlink()


def test_watchdog_restarts_a_hung_daemon(box: Container) -> None:
    # a short watchdog for the test, through a unit drop-in
    d = box.root / "etc/systemd/system/llmspyd.service.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / "test-watchdog.conf").write_text("[Service]\nWatchdogSec=4s\nTimeoutAbortSec=3s\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", "llmspyd", timeout=120)
    pid = box.prop("llmspyd", "MainPID")
    restarts = int(box.prop("llmspyd", "NRestarts"))
    time.sleep(6)  # healthy: pings keep it alive past one watchdog period
    assert box.prop("llmspyd", "MainPID") == pid and _active(box)
    box.run("systemctl", "kill", "-s", "STOP", "--kill-who=main", "llmspyd")
    box.wait(
        lambda: box.prop("llmspyd", "MainPID") not in ("0", pid) and _active(box),
        60,
        "systemd to restart the hung daemon",
    )
    assert int(box.prop("llmspyd", "NRestarts")) == restarts + 1
    log = box.run("journalctl", "-u", "llmspyd", "--no-pager", "-n", "60").stdout
    assert "Watchdog timeout" in log
    (d / "test-watchdog.conf").unlink()
    box.run("systemctl", "daemon-reload")


def test_stop_is_clean(box: Container) -> None:
    box.run("systemctl", "stop", "llmspyd", timeout=60)
    state = box.run("systemctl", "is-active", "llmspyd", check=False).stdout.strip()
    assert state == "inactive", box.run("journalctl", "-u", "llmspyd", "--no-pager", "-n", "30").stdout
    assert box.prop("llmspyd", "Result") == "success"
    log = box.run("journalctl", "-u", "llmspyd", "--no-pager", "-n", "20").stdout
    assert "stopped" in log
