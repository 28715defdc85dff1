"""Typed configuration: built-in defaults, /etc/llmspy/llmspyd.toml, drop-ins.

Layers, later wins, tables merged key by key (the systemd ``.d`` convention):

1. ``llmspyd/defaults/llmspyd.toml`` shipped in the package (works with no file at all);
2. ``<config_dir>/llmspyd.toml`` (``/etc/llmspy`` unless ``--config-dir``);
3. ``<config_dir>/llmspyd.d/*.toml`` in lexical order;
4. command-line overrides (``--output``, ``--log-level``).

The merged result is validated after each layer, so an error names the file
that introduced it and the dotted key, e.g.
``/etc/llmspy/llmspyd.d/10-x.toml: trace.scope: Input should be 'all' or 'selected'``.
"""

from __future__ import annotations

import copy
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

DEFAULT_CONFIG_DIR = Path("/etc/llmspy")
MAIN_FILE = "llmspyd.toml"
DROPIN_DIR = "llmspyd.d"
BUILTIN = "<built-in defaults>"
CMDLINE = "<command line>"

# The kernel wants a power of two of at least one page for a BPF ring buffer.
MIN_RINGBUF_BYTES = 4096
# A call bigger than this would need an unreasonable number of 32 KiB records.
MAX_CALL_BYTES_LIMIT = 1 << 30


class ConfigError(Exception):
    """A configuration file is unreadable, not TOML, or not valid against the schema."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TraceSettings(_Strict):
    scope: Literal["all", "selected"] = "all"
    executables: list[str] = Field(default_factory=list)
    comms: list[str] = Field(default_factory=list)
    users: list[str | int] = Field(default_factory=list)
    cgroups: list[str] = Field(default_factory=list)
    units: list[str] = Field(default_factory=list)
    exclude_pids: list[int] = Field(default_factory=list)
    # folders whose TLS-carrying executables are probed at start, before they ever run (not recursive): where
    # agents and their runtimes get installed (npm -g links its bins into /usr/local/bin or /usr/bin)
    prewarm_dirs: list[str] = Field(
        default_factory=lambda: ["/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin"]
    )

    @field_validator("executables", "prewarm_dirs")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"{p!r} must be an absolute path")
        return v

    @field_validator("comms")
    @classmethod
    def _comm_len(cls, v: list[str]) -> list[str]:
        for c in v:
            if not c or len(c.encode()) > 15:
                raise ValueError(f"comm {c!r} must be 1 to 15 bytes (the kernel's TASK_COMM_LEN - 1)")
        return v

    @property
    def selectors(self) -> int:
        return sum(len(x) for x in (self.executables, self.comms, self.users, self.cgroups, self.units))


class OutputSettings(_Strict):
    sinks: list[str] = Field(default_factory=lambda: ["auto"], min_length=1)
    journal_socket: str = "/run/systemd/journal/socket"

    @field_validator("sinks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from llmspyd.sinks import SinkSpecError, parse_spec

        for spec in v:
            try:
                parse_spec(spec)
            except SinkSpecError as e:
                raise ValueError(str(e)) from None
        return v


class RedactionSettings(_Strict):
    secrets: bool = True
    content: bool = False
    extra_headers: list[str] = Field(default_factory=list)
    extra_params: list[str] = Field(default_factory=list)


class LimitSettings(_Strict):
    max_call_bytes: int = Field(16 << 20, ge=4096, le=MAX_CALL_BYTES_LIMIT)
    max_body_bytes: int = Field(4 << 20, ge=0)
    idle_timeout_s: float = Field(300, gt=0)
    max_connections: int = Field(4096, ge=1)


class CaptureSettings(_Strict):
    ringbuf_bytes: int = Field(16 << 20, ge=MIN_RINGBUF_BYTES)
    poll_ms: int = Field(100, ge=1, le=10_000)

    @field_validator("ringbuf_bytes")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"{v} is not a power of two (the kernel requires one)")
        return v


class DaemonSettings(_Strict):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    status_file: str = "/run/llmspyd/status.json"
    status_interval_s: float = Field(5, gt=0)


class Settings(_Strict):
    trace: TraceSettings = Field(default_factory=TraceSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    redaction: RedactionSettings = Field(default_factory=RedactionSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)

    _sources: list[str] = PrivateAttr(default_factory=list)

    @property
    def sources(self) -> list[str]:
        """The layers this configuration was built from, in order."""
        return list(self._sources)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _format_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def builtin_defaults() -> dict[str, Any]:
    text = resources.files("llmspyd").joinpath("defaults", MAIN_FILE).read_text(encoding="utf-8")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # a packaging bug, but say where
        raise ConfigError(BUILTIN, f"invalid TOML: {e}") from None


def config_files(config_dir: Path | str = DEFAULT_CONFIG_DIR) -> list[Path]:
    """The files read from a config folder, in merge order; missing ones are skipped."""
    d = Path(config_dir)
    files = []
    if (d / MAIN_FILE).is_file():
        files.append(d / MAIN_FILE)
    dropins = d / DROPIN_DIR
    if dropins.is_dir():
        files.extend(sorted((p for p in dropins.iterdir() if p.suffix == ".toml" and p.is_file()), key=lambda p: p.name))
    return files


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not UTF-8 text: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"invalid TOML: {e}") from None


def _validate(source: str, merged: dict[str, Any]) -> Settings:
    try:
        return Settings.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(source, _format_error(e)) from None


def load(
    config_dir: Path | str | None = DEFAULT_CONFIG_DIR, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the settings from all layers; raise ConfigError naming the first bad file and key."""
    merged = builtin_defaults()
    _validate(BUILTIN, merged)
    sources = [BUILTIN]
    for path in config_files(config_dir) if config_dir is not None else []:
        merged = deep_merge(merged, _read_toml(path))
        _validate(str(path), merged)
        sources.append(str(path))
    if overrides:
        merged = deep_merge(merged, overrides)
        sources.append(CMDLINE)
    settings = _validate(sources[-1], merged)
    if settings.trace.scope == "selected" and not settings.trace.selectors:
        raise ConfigError(
            sources[-1], "trace.scope: 'selected' needs at least one of executables, comms, users, cgroups, units"
        )
    settings._sources = sources
    return settings
