"""The daemon's wiring with a fake kernel side: readiness, flow to sinks, watchdog health, reload, shutdown."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llmspyd import app as A
from llmspyd import settings as S
from llmspyd.chunks import Direction, ProcessExec, TlsChunk


class Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def notify(self, state: str) -> None:
        self.events.append(state)


class FakeReader:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.alive = False
        self.stuck_since: float | None = None
        self.counters = {"records": 0, "decode_errors": 0}

    @property
    def last_poll_monotonic(self) -> float:
        # a live reader comes around every poll; a stuck one stopped at stuck_since
        return self.stuck_since if self.stuck_since is not None else time.monotonic()

    def start(self) -> None:
        self.alive = True
        self.log.events.append("reader.start")

    def stop(self) -> None:
        self.alive = False
        self.log.events.append("reader.stop")


class FakeProbes:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.muted: list[tuple[int, int]] = []

    def stats(self) -> dict[str, int]:
        return {"bytes": 123, "lost_records": 2, "truncated_calls": 1}

    def attached(self) -> dict:
        return {}

    def mute(self, pid: int, conn: int) -> None:
        self.muted.append((pid, conn))

    def set_pid_verdict(self, pid: int, v: Any) -> None:
        self.log.events.append(f"verdict {pid} {v.name}")

    def set_cgroup_verdict(self, cg: int, v: Any) -> None:
        pass

    def close(self) -> None:
        self.log.events.append("probes.close")


class FakeDiscovery:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.execs: list[int] = []

    def scan_all(self) -> int:
        self.log.events.append("scan_all")
        return 1

    def on_event(self, ev: Any) -> None:
        if isinstance(ev, ProcessExec):
            self.execs.append(ev.pid)

    def reset_scope(self) -> None:
        self.log.events.append("reset_scope")

    def close(self) -> None:
        pass


class FakePipeline:
    """Emits one record per TlsChunk carrying the key in a header, and mutes pid 666's connections."""

    def __init__(self, emit, mute, log: Log) -> None:
        self.emit, self.mute, self.log = emit, mute, log
        self.counters = {"exchanges": 0}
        self.flushes: list[int] = []

    def feed(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, TlsChunk):
                if ev.pid == 666:
                    self.mute(ev.key)
                    continue
                self.emit(
                    {
                        "id": f"ex-{ev.offset}",
                        "provider": "openai",
                        "model": "m",
                        "process": {"pid": ev.pid, "comm": ev.comm},
                        "request": {"headers": [["authorization", "Bearer " + ev.data.decode()]]},
                    }
                )

    def flush_idle(self, now_ns: int, idle_ns: int) -> None:
        self.flushes.append(idle_ns)
        if idle_ns == 0:
            self.log.events.append("final flush")


def chunk(pid: int = 10, data: bytes = b"sk-secret-key-123456", offset: int = 0) -> TlsChunk:
    return TlsChunk(
        ts_ns=1, pid=pid, tid=pid, comm="agent", conn=0xABC, direction=Direction.WRITE, offset=offset,
        data=data, call_len=len(data),
    )  # fmt: skip


def make(tmp_path: Path, toml: str = "") -> tuple[A.Daemon, Log, dict]:
    cfg = tmp_path / "etc"
    cfg.mkdir(exist_ok=True)
    out = tmp_path / "out.jsonl"
    (cfg / "llmspyd.toml").write_text(
        f'[output]\nsinks = ["jsonl:{out}"]\n[daemon]\nstatus_file = "{tmp_path}/run/status.json"\n' + toml
    )
    log = Log()
    made: dict = {}

    def capture(settings, sink):
        made["sink"] = sink
        made["probes"] = FakeProbes(log)
        made["discovery"] = FakeDiscovery(log)
        made["reader"] = FakeReader(log)
        return A.Capture(reader=made["reader"], probes=made["probes"], discovery=made["discovery"])

    def pipeline(settings, emit, mute):
        made["pipeline"] = FakePipeline(emit, mute, log)
        return made["pipeline"]

    d = A.Daemon(S.load(cfg), A.Parts(capture=capture, pipeline=pipeline, notifier=lambda: log), config_dir=cfg)
    made["out"] = out
    made["cfg"] = cfg
    return d, log, made


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_ready_only_after_probes_attached(tmp_path: Path) -> None:
    d, log, _ = make(tmp_path)
    d.start()
    try:
        ev = log.events
        assert ev.index("reader.start") < ev.index("scan_all") < ev.index("READY=1")
        assert any(e.startswith("STATUS=") for e in ev[ev.index("READY=1") :])
    finally:
        d.shutdown()


def test_records_flow_redacted_to_sinks_and_mute(tmp_path: Path) -> None:
    d, log, m = make(tmp_path)
    d.start()
    try:
        m["sink"]([chunk(offset=0), chunk(pid=666), ProcessExec(ts_ns=2, pid=77, ppid=1, uid=0, comm="x", filename="/x")])
        m["sink"]([chunk(offset=20)])
        wait_for(lambda: d.counters.exchanges == 2)
        assert m["probes"].muted == [(666, 0xABC)]
        assert m["discovery"].execs == [77]
    finally:
        d.shutdown()
    lines = [json.loads(x) for x in m["out"].read_text().splitlines()]
    assert [x["id"] for x in lines] == ["ex-0", "ex-20"]
    assert "sk-secret-key" not in m["out"].read_text()
    assert log.events.index("final flush") < log.events.index("probes.close")
    assert log.events[-1] != "READY=1" and "STOPPING=1" in log.events


def test_health_watches_reader_and_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, _, m = make(tmp_path)
    release = threading.Event()
    d.start()
    try:
        assert d.health() is None
        m["reader"].stuck_since = time.monotonic() - A.STALL_S - 1
        assert "reader stuck" in d.health()
        m["reader"].stuck_since = None
        # a pipeline that hangs stops the worker's heartbeat
        m["pipeline"].feed = lambda events: release.wait()
        m["sink"]([chunk()])
        monkeypatch.setattr(A, "STALL_S", 0.3)
        wait_for(lambda: d.health() is not None and "worker stuck" in d.health())
        release.set()
        wait_for(lambda: d.health() is None)
        m["reader"].alive = False
        assert d.health() == "reader thread is dead"
    finally:
        release.set()
        d.shutdown()


def test_watchdog_pings_only_while_healthy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    d, log, m = make(tmp_path)
    d.start()
    t = threading.Thread(target=d.serve)
    t.start()
    try:
        wait_for(lambda: log.events.count("WATCHDOG=1") >= 3)
        m["reader"].alive = False  # the reader died: pings must stop
        time.sleep(0.1)
        n = log.events.count("WATCHDOG=1")
        time.sleep(0.4)
        assert log.events.count("WATCHDOG=1") == n
    finally:
        d.request_stop()
        t.join(5)
        d.shutdown()


def test_status_file(tmp_path: Path) -> None:
    d, _, m = make(tmp_path)
    d.start()
    try:
        m["sink"]([chunk()])
        wait_for(lambda: d.counters.exchanges == 1)
        d.write_status()
        st = json.loads((tmp_path / "run/status.json").read_text())
        assert st["exchanges"] == 1 and st["processes_traced"] == 1 and st["health"] == "ok"
        assert st["losses"]["lost_records"] == 2 and st["bpf"]["bytes"] == 123
        assert "1 exchanges" in d.status_line() and "2 lost" in d.status_line()
    finally:
        d.shutdown()


def test_reload_bad_config_refused_old_keeps_running(tmp_path: Path) -> None:
    d, log, m = make(tmp_path)
    d.start()
    try:
        before = d.settings
        (m["cfg"] / "llmspyd.d").mkdir()
        bad = m["cfg"] / "llmspyd.d" / "50-bad.toml"
        bad.write_text("[output]\nsinks = ['carrier-pigeon']\n")
        assert d.reload() is False
        assert d.settings is before and d.reloads == {"ok": 0, "refused": 1}
        assert str(bad) in d.last_reload_error and "output.sinks" in d.last_reload_error
        # still serving with the old outputs
        m["sink"]([chunk()])
        wait_for(lambda: d.counters.exchanges == 1)
        assert m["out"].read_text().count("\n") == 1
        # a good drop-in: applied, new sink used
        out2 = tmp_path / "out2.jsonl"
        bad.write_text(f"[output]\nsinks = ['jsonl:{out2}']\n[daemon]\nlog_level = 'debug'\n")
        assert d.reload() is True
        assert d.settings.daemon.log_level == "debug" and d.last_reload_error == ""
        m["sink"]([chunk(offset=20)])
        wait_for(lambda: d.counters.exchanges == 2)
        assert "ex-20" in out2.read_text() and "ex-20" not in m["out"].read_text()
        assert log.events.count("RELOADING=1") == 2
        assert "reset_scope" not in log.events  # [trace] did not change
        bad.write_text("[trace]\nexclude_pids = [424242]\n")
        assert d.reload() is True and "reset_scope" in log.events
        assert d.scope.excluded == frozenset({424242})
    finally:
        d.shutdown()


def test_sighup_and_sigterm_drive_the_loop(tmp_path: Path) -> None:
    d, log, _ = make(tmp_path)
    d.start()
    t = threading.Thread(target=d.serve)
    t.start()
    d.request_reload()
    wait_for(lambda: d.reloads["ok"] == 1)
    d.request_stop()
    t.join(5)
    assert not t.is_alive()
    d.shutdown()


def test_chunk_json_roundtrip() -> None:
    import base64

    j = A.chunk_json(chunk(data=b"\x00\xffhello"))
    assert base64.b64decode(j["data"]) == b"\x00\xffhello" and j["direction"] == "write" and j["len"] == 7


def test_dump_chunks_writes_every_chunk(tmp_path: Path) -> None:
    import base64

    d, _, m = make(tmp_path)
    d.dump_path = str(tmp_path / "chunks.jsonl")
    d.start()
    try:
        m["sink"]([chunk(data=b"POST /v1/x HTTP/1.1\r\n"), chunk(offset=21, data=b"\r\n")])
        wait_for(lambda: d.counters.exchanges == 2)
    finally:
        d.shutdown()
    lines = [json.loads(x) for x in (tmp_path / "chunks.jsonl").read_text().splitlines()]
    assert [base64.b64decode(x["data"]) for x in lines] == [b"POST /v1/x HTTP/1.1\r\n", b"\r\n"]
    assert [x["offset"] for x in lines] == [0, 21]
    assert (tmp_path / "chunks.jsonl").stat().st_mode & 0o777 == 0o600


def test_watchdog_fed_during_a_slow_shutdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd keeps the watchdog armed while the unit stops: a slow flush must not look like a hang
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    d, log, m = make(tmp_path)
    d.start()
    m["pipeline"].flush_idle = lambda now, idle: time.sleep(0.6) if idle == 0 else None
    n = log.events.count("WATCHDOG=1")
    d.shutdown()
    assert log.events.count("WATCHDOG=1") >= n + 3
