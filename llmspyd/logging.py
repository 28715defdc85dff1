"""The daemon's own log (not the exchange records): structlog to stderr.

Under systemd, stderr is a journal stream (``$JOURNAL_STREAM`` is set) that
already stamps time and identifier, so lines are plain ``key=value`` with a
``<N>`` syslog-priority prefix journald understands. In a terminal they get a
timestamp. Standard-library loggers (the libbpf binding logs libbpf's own lines
through ``logging``) are routed through the same renderer.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# sd-daemon(3) prefixes: journald turns "<N>" at line start into PRIORITY=N
_SD_PREFIX = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>", "critical": "<2>", "exception": "<3>"}


def _under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


def _sd_priority(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["_sd"] = _SD_PREFIX.get(event.get("level", method), "<6>")
    return event


class _Render:
    """key=value line; the event text first, the priority prefix for journald when wanted."""

    def __init__(self, journal: bool) -> None:
        self.journal = journal
        self.kv = structlog.processors.KeyValueRenderer(sort_keys=False)

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        prefix = event.pop("_sd", "")
        head = [event.pop("timestamp", None), event.pop("level", method), str(event.pop("event", ""))]
        exc = event.pop("exception", None)
        rest = self.kv(logger, method, event) if event else ""
        line = " ".join(x for x in (*head, rest) if x)
        if exc:
            line += "\n" + str(exc)
        return (prefix + line) if self.journal else line


def setup(level: str = "info", *, journal: bool | None = None) -> None:
    """Configure structlog and stdlib logging; safe to call again (SIGHUP changes the level)."""
    journal = _under_journal() if journal is None else journal
    lvl = LEVELS.get(level, logging.INFO)
    pre: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
    ]
    if not journal:
        pre.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    pre += [structlog.processors.format_exc_info, _sd_priority]
    structlog.configure(
        processors=[*pre, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _Render(journal)],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)


def get(name: str = "llmspyd") -> Any:
    return structlog.get_logger(name)
