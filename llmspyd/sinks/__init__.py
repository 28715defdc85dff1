"""Sinks: where exchange records go. Redaction runs once, before every sink.

A sink is any object with ``name``, ``emit(record_dict)`` and ``close()``.
``Outputs`` fans one record out to all sinks; a failing sink is counted and
logged and never stops the others (mitmproxy's safecall idea).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from llmspyd.sinks.journald import DEFAULT_SOCKET, JournaldSink
from llmspyd.sinks.jsonl import JsonLinesSink
from llmspyd.sinks.redact import Redactor

log = logging.getLogger("llmspyd.sinks")

AUTO = "auto"


class Sink(Protocol):
    name: str

    def emit(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class SinkSpecError(ValueError):
    """An --output / [output] sinks entry that names no known sink."""


def parse_spec(spec: str) -> tuple[str, str]:
    """'journald' | 'stdout' | 'jsonl:PATH' | 'auto' -> (kind, argument)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("stdout", "journald", AUTO) and not arg:
        return kind, ""
    if kind == "journald" and arg:
        return kind, arg  # journald:SOCKET for a journal namespace or a test journal
    if kind == "jsonl" and arg:
        return kind, arg
    raise SinkSpecError(f"unknown output {spec!r}: use journald, stdout, jsonl:PATH or auto")


def resolve_auto(journal_socket: str = DEFAULT_SOCKET) -> str:
    """journald when its socket exists, else stdout."""
    return "journald" if os.path.exists(journal_socket) else "stdout"


def make_sink(spec: str, journal_socket: str = DEFAULT_SOCKET) -> Sink:
    kind, arg = parse_spec(spec)
    if kind == AUTO:
        kind = resolve_auto(journal_socket)
    if kind == "stdout":
        return JsonLinesSink()
    if kind == "jsonl":
        return JsonLinesSink(path=arg)
    return JournaldSink(arg or journal_socket)


def make_sinks(specs: Iterable[str], journal_socket: str = DEFAULT_SOCKET) -> list[Sink]:
    sinks: list[Sink] = []
    try:
        for spec in specs:
            sinks.append(make_sink(spec, journal_socket))
    except Exception:
        for s in sinks:
            s.close()
        raise
    return sinks


def record_dict(record: Any) -> dict[str, Any]:
    """A pydantic record (LlmExchange) or an already-dumped dict, as JSON-ready dict."""
    if isinstance(record, Mapping):
        return dict(record)
    return record.model_dump(mode="json")


class Outputs:
    """Redacts each record once, then hands it to every sink."""

    def __init__(self, sinks: list[Sink], redactor: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.sinks = sinks
        self.redactor = redactor if redactor is not None else Redactor()
        self.emitted = 0
        self.errors: dict[str, int] = {s.name: 0 for s in sinks}

    def __call__(self, record: Any) -> None:
        data = self.redactor(record_dict(record))
        self.emitted += 1
        for sink in self.sinks:
            try:
                sink.emit(data)
            except Exception as e:  # one broken sink must not silence the others
                self.errors[sink.name] = self.errors.get(sink.name, 0) + 1
                log.warning("sink %s failed: %s", sink.name, e)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                log.warning("closing sink %s failed: %s", sink.name, e)


__all__ = [
    "Outputs",
    "Redactor",
    "Sink",
    "SinkSpecError",
    "JournaldSink",
    "JsonLinesSink",
    "make_sink",
    "make_sinks",
    "parse_spec",
    "record_dict",
    "resolve_auto",
]
