"""JSON lines sink: one record per line, to standard output or a file."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

# Files hold prompts: readable by their owner (root) only.
FILE_MODE = 0o600


class JsonLinesSink:
    """Writes each record as one compact JSON line and flushes it, so `tail -f` sees it at once."""

    def __init__(self, stream: IO[str] | None = None, *, path: str | None = None) -> None:
        self.path = path
        self._own = False
        if path is not None:
            self.name = f"jsonl:{path}"
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            self.stream: IO[str] = os.fdopen(fd, "a", encoding="utf-8")
            self._own = True
        else:
            self.name = "stdout"
            self.stream = stream if stream is not None else sys.stdout

    def emit(self, record: Mapping[str, Any]) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._own:
            self.stream.close()
        else:
            self.stream.flush()
