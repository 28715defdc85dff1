"""`llmspy`: the command for people. status, tail, doctor (and sniff, from llmspyd.capture.sniff).

Each subcommand registers itself in COMMANDS: name -> (add_arguments, run). A
module that adds one (sniff) needs only one line in `_register`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmspyd.settings import DEFAULT_CONFIG_DIR, ConfigError, DaemonSettings, load

DEFAULT_STATUS = DaemonSettings().status_file
# A status file older than this many of its write intervals means the daemon is not updating it.
STALE_INTERVALS = 3

# name -> (add_arguments(parser), run(args) -> exit code, help)
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
COMMANDS: dict[str, Command] = {}


# ---------------------------------------------------------------- status


def _args_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", default=DEFAULT_STATUS, help="status file the daemon writes (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the raw status JSON")


def cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        st = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"llmspyd is not running (no {path})", file=sys.stderr)
        return 3
    except (OSError, ValueError) as e:
        print(f"cannot read {path}: {e}", file=sys.stderr)
        return 1
    alive = _pid_alive(int(st.get("pid", 0)))
    age = time.time() - float(st.get("updated", 0))
    if args.json:
        st["stale"] = not alive or age > 60
        print(json.dumps(st, indent=1))
        return 0 if alive else 3
    print(format_status(st, alive=alive, age=age))
    return 0 if alive else 3


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except PermissionError:
        return True
    except OSError:
        return False


def _up(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def format_status(st: dict[str, Any], *, alive: bool = True, age: float = 0.0) -> str:
    lines = []
    state = "running" if alive else "NOT running (stale status)"
    lines.append(f"llmspyd: {state}, pid {st.get('pid')}, up {_up(time.time() - st.get('started', time.time()))}")
    lines.append(f"  health:     {st.get('health')}  (status {age:.0f}s old)")
    lines.append(f"  config:     {', '.join(st.get('config', []))}")
    rl = st.get("reloads", {})
    if rl.get("refused"):
        lines.append(f"  reloads:    {rl.get('ok', 0)} ok, {rl['refused']} refused; last error: {st.get('last_reload_error')}")
    lines.append(f"  scope:      {st.get('scope')}")
    lines.append(f"  processes:  {st.get('processes_traced', 0)} seen with TLS traffic")
    lines.append(f"  exchanges:  {st.get('exchanges', 0)}")
    bpf = st.get("bpf", {})
    lines.append(
        f"  captured:   {bpf.get('bytes', 0)} bytes in {bpf.get('records', 0)} records, {bpf.get('calls', 0)} TLS calls"
    )
    losses = {k: v for k, v in st.get("losses", {}).items() if v}
    lines.append("  losses:     " + (", ".join(f"{k}={v}" for k, v in losses.items()) if losses else "none"))
    pl = st.get("pipeline") or {}
    if pl:
        lines.append(
            f"  pipeline:   {pl.get('connections', 0)} connections (http/1 {pl.get('http1', 0)}, h2 {pl.get('h2', 0)}, "
            f"other {pl.get('unknown_protocol', 0)}, muted {pl.get('muted', 0)}); gaps {pl.get('gaps', 0)} "
            f"({pl.get('gap_bytes', 0)} bytes), parse errors {pl.get('parse_errors', 0)}, "
            f"stage errors {pl.get('stage_errors', 0)}"
        )
    sinks = st.get("sinks", {})
    lines.append("  outputs:    " + ", ".join(f"{n}" + (f" ({v['errors']} errors)" if v.get("errors") else "") for n, v in sinks.items()))
    probes = st.get("probes", [])
    lines.append(f"  probes:     {len(probes)} files")
    for p in probes:
        lines.append(f"    {p.get('stack', '?'):9} {p.get('path')}  [{','.join(p.get('roles', []))}]")
    lines.extend(_coverage_lines(st.get("discovery") or {}))
    return "\n".join(lines)


def _coverage_lines(disc: dict[str, Any]) -> list[str]:
    """Who is covered, and every program whose TLS stack is not, by name and with the reason."""
    if not disc:
        return []
    running = disc.get("uncovered", [])
    lines = [
        f"  coverage:   {disc.get('processes_with_tls', 0)} running processes with TLS, "
        f"{len(disc.get('covered', []))} covered, {len(running)} not covered"
    ]
    for u in running:
        where = f", {u['container']}" if u.get("container") else ""
        lines.append(f"    NOT COVERED pid {u['pid']} {u['comm']} ({u['exe']}{where}): {'; '.join(u['reasons'])}")
    running_exes = {u.get("exe") for u in running}
    gone = [u for u in disc.get("uncovered_seen", []) if u.get("exe") not in running_exes]
    for u in gone:
        ago = _up(time.time() - float(u.get("seen", time.time())))
        lines.append(
            f"    NOT COVERED {u['comm']} ({u['exe']}, last pid {u['last_pid']}, exited {ago} ago): "
            + "; ".join(u["reasons"])
        )
    return lines


# ---------------------------------------------------------------- tail


def _args_tail(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.add_argument("-n", "--lines", type=int, default=10, help="show the last N exchanges first (default: 10)")
    p.add_argument("--no-follow", action="store_true", help="print and exit instead of following")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--file", help="follow a JSON lines output file instead of the journal")
    src.add_argument("--directory", help="read journal files from this folder (journalctl -D)")
    src.add_argument("--namespace", help="read this journal namespace (with LogNamespace=, see README)")
    p.add_argument("--full", action="store_true", help="print whole prompts and responses, not excerpts")


def journal_record(entry: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a record from the journal fields the journald sink wrote."""
    rec: dict[str, Any] = {}
    for field, key in (("LLM_RECORD", None), ("LLM_REQUEST", "request"), ("LLM_RESPONSE", "response")):
        raw = entry.get(field)
        if isinstance(raw, list):  # journalctl prints non-UTF-8 values as byte arrays
            raw = bytes(raw).decode("utf-8", "replace")
        if not raw:
            continue
        try:
            val = json.loads(raw)
        except ValueError:
            continue
        if key is None:
            rec.update(val)
        else:
            rec[key] = val
    if not rec:  # an entry from an older writer: keep the flat fields
        rec = {k: v for k, v in entry.items() if k.startswith("LLM_")}
    return rec


def _journal_entries(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    cmd = ["journalctl", "-o", "json", "--all", "--no-pager", "-n", str(args.lines)]
    if not args.no_follow:
        cmd.append("-f")
    if args.directory:
        cmd += ["-D", args.directory]
    if args.namespace:
        cmd.append(f"--namespace={args.namespace}")
    cmd.append("SYSLOG_IDENTIFIER=llmspyd")  # the daemon's own log lines lack LLM_EXCHANGE_ID: filtered below
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if "LLM_EXCHANGE_ID" in entry:
                    yield journal_record(entry)
        finally:
            proc.terminate()


def _file_entries(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    with open(args.file, encoding="utf-8") as f:
        lines = f.readlines()
        for line in lines[-args.lines :] if args.lines else []:
            if line.strip():
                yield json.loads(line)
        while not args.no_follow:
            line = f.readline()
            if not line:
                time.sleep(0.2)
                continue
            if line.strip():
                yield json.loads(line)


def _excerpt(text: str | None, full: bool, n: int = 200) -> str:
    if not text:
        return ""
    text = text.strip()
    if full or len(text) <= n:
        return text
    return text[: n - 1].replace("\n", " ⏎ ") + "…"


def format_exchange(rec: dict[str, Any], full: bool = False) -> str:
    from llmspyd.sinks.journald import summary

    req = rec.get("request") or {}
    resp = rec.get("response") or {}
    when = (rec.get("timing") or {}).get("request_start") or ""
    out = [f"{when[11:23] if when else '':12} {summary(rec)}"]
    msgs = req.get("messages") or []
    last_user = next((m for m in reversed(msgs) if m.get("role") in ("user", "tool")), None)
    if req.get("system") and full:
        out.append("  system> " + _excerpt(req["system"], full))
    if last_user and last_user.get("content"):
        out.append(f"  {last_user['role']}> " + _excerpt(last_user["content"], full))
    if resp.get("thinking") and full:
        out.append("  thinking> " + _excerpt(resp["thinking"], full))
    if resp.get("text"):
        out.append("  model> " + _excerpt(resp["text"], full))
    for tc in resp.get("tool_calls") or []:
        out.append(f"  tool> {tc.get('name')}({_excerpt(tc.get('arguments'), full, 120)})")
    return "\n".join(out)


def cmd_tail(args: argparse.Namespace) -> int:
    if not args.file and not shutil.which("journalctl"):
        print("journalctl not found: use --file PATH with a jsonl output", file=sys.stderr)
        return 1
    entries = _file_entries(args) if args.file else _journal_entries(args)
    try:
        for rec in entries:
            if args.json:
                print(json.dumps(rec, ensure_ascii=False), flush=True)
            else:
                print(format_exchange(rec, args.full), flush=True)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    return 0


# ---------------------------------------------------------------- doctor

OK, WARN, FAIL = "ok", "warn", "FAIL"

# capability numbers (linux/capability.h). Loading BPF needs CAP_BPF + CAP_PERFMON, and creating uprobe perf
# events needed CAP_SYS_ADMIN as well on the kernels tested (6.18: EACCES without it); reading other users'
# /proc/PID/maps, /proc/PID/root and executables needs CAP_SYS_PTRACE + CAP_DAC_READ_SEARCH. CAP_SYS_RESOURCE
# (RLIMIT_MEMLOCK) only matters before Linux 5.11, which charged BPF memory to memlock instead of the memcg.
CAPS_REQUIRED = {"CAP_BPF": 39, "CAP_PERFMON": 38, "CAP_SYS_ADMIN": 21}
CAPS_DISCOVERY = {"CAP_SYS_PTRACE": 19, "CAP_DAC_READ_SEARCH": 2}
CAPS = {**CAPS_REQUIRED, **CAPS_DISCOVERY, "CAP_SYS_RESOURCE": 24}
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_RINGBUF = 27
SYS_BPF = {"x86_64": 321, "aarch64": 280}


def _bpf_ringbuf_probe() -> tuple[bool, str]:
    """Create and close a one-page BPF ring buffer: proves the bpf() syscall, permission and ring buffer support."""
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        return False, f"unknown bpf syscall number on {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)

    class Attr(ctypes.Structure):
        _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                    ("max_entries", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 112)]  # fmt: skip

    attr = Attr(BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    fd = libc.syscall(nr, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        return False, f"bpf(BPF_MAP_CREATE ringbuf) failed: {os.strerror(err)} (errno {err})"
    os.close(fd)
    return True, "bpf() works and ring buffers can be created"


def _cap_eff() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def doctor_checks(config_dir: str | None, status_file: str) -> list[tuple[str, str, str, str]]:
    """(check, verdict, detail, fix) for everything llmspyd needs."""
    out: list[tuple[str, str, str, str]] = []

    def add(name: str, verdict: str, detail: str, fix: str = "") -> None:
        out.append((name, verdict, detail, fix))

    rel = platform.release()
    try:
        major, minor = (int(x) for x in rel.split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    add("kernel", OK if (major, minor) >= (5, 17) else FAIL, rel, "Linux 5.17 or newer is needed (BTF, ring buffer, bpf_loop)")
    btf = Path("/sys/kernel/btf/vmlinux")
    add("BTF", OK if btf.exists() else FAIL, str(btf) + (" present" if btf.exists() else " missing"),
        "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's are)")  # fmt: skip
    up = Path("/sys/bus/event_source/devices/uprobe/type")
    add("uprobes", OK if up.exists() else FAIL, "uprobe PMU " + ("available" if up.exists() else "missing"),
        "kernel needs CONFIG_UPROBE_EVENTS=y")  # fmt: skip
    from llmspyd.bpf.libbpf import uprobe_multi_supported

    multi = uprobe_multi_supported()
    add("uprobe_multi links", OK if multi else WARN,
        "one link per program and file: a new file is probed in ~10 ms" if multi
        else "not in this kernel: one perf event per probe, slower attach (15-230 ms per new file) and detach",
        "Linux 6.6 or newer attaches faster; llmspyd works without")  # fmt: skip
    caps = _cap_eff()
    missing = [n for n, bit in CAPS_REQUIRED.items() if not caps >> bit & 1]
    add("capabilities (BPF)", OK if not missing else FAIL,
        " ".join(CAPS_REQUIRED) + " held" if not missing else "missing " + " ".join(missing),
        "run as root or with " + " ".join(CAPS))  # fmt: skip
    weak = [n for n, bit in CAPS_DISCOVERY.items() if not caps >> bit & 1]
    add("capabilities (discovery)", OK if not weak else WARN,
        "CAP_SYS_PTRACE CAP_DAC_READ_SEARCH held" if not weak else "missing " + " ".join(weak) + ": other users' processes cannot be scanned",
        "run as root or add " + " ".join(weak))  # fmt: skip
    if (major, minor) < (5, 11) and not caps >> CAPS["CAP_SYS_RESOURCE"] & 1:
        add("capabilities (memlock)", WARN, "kernel < 5.11 charges BPF maps to RLIMIT_MEMLOCK", "add CAP_SYS_RESOURCE")
    if not missing:
        ok, detail = _bpf_ringbuf_probe()
        add("bpf syscall + ring buffer", OK if ok else FAIL, detail,
            "in a container or unit: allow bpf() (seccomp), e.g. systemd-nspawn --system-call-filter='bpf perf_event_open'")  # fmt: skip
    try:
        lockdown = Path("/sys/kernel/security/lockdown").read_text().strip()
    except OSError:
        lockdown = ""
    if "[confidentiality]" in lockdown:
        add("lockdown", FAIL, lockdown, "kernel lockdown=confidentiality forbids reading user memory from BPF")
    tracefs = any(Path(p, "uprobe_events").exists() for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"))
    add("tracefs", OK if tracefs else WARN, "mounted" if tracefs else "not mounted (not needed on kernels >= 4.17)",
        "mount -t tracefs nodev /sys/kernel/tracing (only for debugging with bpftrace)")  # fmt: skip
    try:
        from llmspyd.bpf.loader import objects_dir

        objs = sorted(p.name for p in objects_dir().glob("*.bpf.o"))
        add("BPF objects", OK if objs else FAIL, f"{objects_dir()}: {', '.join(objs) or 'none'}",
            "run `make bpf` (or reinstall the llmspyd package)")  # fmt: skip
    except Exception as e:
        add("BPF objects", FAIL, str(e), "reinstall llmspyd")
    try:
        s = load(config_dir)
        add("configuration", OK, ", ".join(s.sources))
        sock = s.output.journal_socket
    except ConfigError as e:
        add("configuration", FAIL, str(e), "fix the file named, then `llmspyd --check-config`")
        sock = "/run/systemd/journal/socket"
    add("journald", OK if os.path.exists(sock) else WARN,
        f"{sock} " + ("present" if os.path.exists(sock) else "missing: records go to stdout"),
        "start systemd-journald, or set [output] sinks = ['jsonl:/var/log/llmspyd/exchanges.jsonl']")  # fmt: skip
    try:
        st = json.loads(Path(status_file).read_text())
        alive = _pid_alive(int(st.get("pid", 0)))
        health = st.get("health", "?")
        add("daemon", OK if alive and health == "ok" else WARN, f"pid {st.get('pid')} {'running' if alive else 'gone'}, health {health}",
            "systemctl status llmspyd; journalctl -u llmspyd")  # fmt: skip
    except (OSError, ValueError):
        add("daemon", WARN, "not running (no status file)", "systemctl enable --now llmspyd")
    return out


def _args_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", default=str(DEFAULT_CONFIG_DIR))
    p.add_argument("--status-file", default=DEFAULT_STATUS)
    p.add_argument("--json", action="store_true")


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = doctor_checks(args.config_dir, args.status_file)
    failed = any(v == FAIL for _, v, _, _ in checks)
    if args.json:
        print(json.dumps([dict(zip(("check", "verdict", "detail", "fix"), c)) for c in checks], indent=1))
    else:
        for name, verdict, detail, fix in checks:
            print(f"[{verdict:4}] {name:26} {detail}")
            if verdict != OK and fix:
                print(f"       {'':26} fix: {fix}")
        print("verdict: " + ("llmspyd cannot run here: fix the FAIL lines" if failed else "llmspyd can run here"))
    return 1 if failed else 0


# ---------------------------------------------------------------- main

COMMANDS["status"] = (_args_status, cmd_status, "live state of the running daemon: probes, counters, losses")
COMMANDS["tail"] = (_args_tail, cmd_tail, "follow LLM exchanges as they are recorded")
COMMANDS["doctor"] = (_args_doctor, cmd_doctor, "check that this machine can run llmspyd, with a fix for each problem")


def _register() -> None:
    """Subcommands that live in other modules add themselves here."""
    try:
        from llmspyd.capture import sniff
    except ImportError:
        return
    reg = getattr(sniff, "register", None)
    if reg is not None:
        reg(COMMANDS)


def parser() -> argparse.ArgumentParser:
    _register()
    p = argparse.ArgumentParser(prog="llmspy", description="See what LLM agents on this machine send and receive.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, _, help) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        add_args(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
