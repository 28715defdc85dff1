"""Replay the recorded LLM exchanges of tests/data/llm as HTTP events.

A case is a folder with case.json, request.bin and response.bin (see
tests/data/llm/record.py) and expected.json, the record the assembler must
produce. `events(case, split)` turns a case into the HTTP events the
pipeline would deliver; `split` cuts bodies into pieces:
  None          the pieces as the server flushed them (one per SSE event, ...)
  "bytes"       one byte per event
  [positions]   at these offsets of the response body (and the request body)
Every piece carries the time of the server flush that contained its last
byte, so any split that keeps within flushes gives identical timings; with
keep_flushes=False pieces may span flushes (as when a reader falls behind)
and only the timings may differ.

    python -m tests.unit.llm_cases --regen   # rewrite expected.json (review the diff!)
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmspyd.chunks import Peer
from llmspyd.llm.assembler import ConnContext, ExchangeAssembler
from llmspyd.llm.conversations import ConversationTracker
from llmspyd.llm.record import LlmExchange
from llmspyd.protocols.events import (
    HttpEvent,
    RequestData,
    RequestEnd,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseHead,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "llm"
T0 = 5_000_000_000  # CLOCK_MONOTONIC of the request head
CLOCK_OFFSET = 1_732_000_000 * 1_000_000_000  # monotonic -> epoch, fixed so records are reproducible
RESPONSE_AFTER = 300_000_000  # the response head 300 ms after the request
FLUSH_EVERY = 20_000_000  # one server flush every 20 ms


@dataclass
class Case:
    name: str
    meta: dict[str, Any]
    request: bytes
    response: bytes

    @property
    def expected_path(self) -> Path:
        return DATA / self.name / "expected.json"

    def expected(self) -> dict[str, Any]:
        return json.loads(self.expected_path.read_text())


def load_cases() -> list[Case]:
    out = []
    for d in sorted(p for p in DATA.iterdir() if (p / "case.json").exists()):
        out.append(
            Case(
                d.name,
                json.loads((d / "case.json").read_text()),
                (d / "request.bin").read_bytes(),
                (d / "response.bin").read_bytes(),
            )
        )
    return out


def context() -> ConnContext:
    return ConnContext(
        pid=4242,
        comm="agent",
        conn=0x7F00DEAD0000,
        peer=Peer(socket.AF_INET, "127.0.0.1", 443, 50123),
        fd=7,
        stack="openssl",
        clock_offset_ns=CLOCK_OFFSET,
    )


def _cuts(n: int, split: Any) -> list[int]:
    if split == "bytes":
        return list(range(1, n))
    if isinstance(split, (list, tuple)):
        return sorted({p for p in split if 0 < p < n})
    return []


def _pieces(data: bytes, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0] + cuts + [len(data)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def events(case: Case, split: Any = None, msg: int = 1, t0: int = T0, keep_flushes: bool = True) -> list[HttpEvent]:
    m = case.meta
    heads = [(k, v) for k, v in m["request_headers"]]
    out: list[HttpEvent] = [RequestHead(msg, t0, m["method"], m["target"], heads, m["http_version"], m["authority"])]
    for a, b in _pieces(case.request, _cuts(len(case.request), split)):
        out.append(RequestData(msg, t0 + 100_000, case.request[a:b]))
    out.append(RequestEnd(msg, t0 + 200_000))
    t_head = t0 + RESPONSE_AFTER
    out.append(ResponseHead(msg, t_head, m["status"], [(k, v) for k, v in m["response_headers"]]))
    # flush i ends at byte ends[i] and arrives at t_head + (i+1)*FLUSH_EVERY
    ends, pos = [], 0
    for n in m["response_chunks"]:
        pos += n
        ends.append(pos)
    extra = _cuts(len(case.response), split)
    cuts = sorted(set(extra) | set(ends[:-1])) if keep_flushes else extra
    flush = 0
    for a, b in _pieces(case.response, cuts):
        while ends[flush] < b:
            flush += 1
        out.append(ResponseData(msg, t_head + (flush + 1) * FLUSH_EVERY, case.response[a:b]))
    out.append(ResponseEnd(msg, t_head + (len(ends) + 1) * FLUSH_EVERY))
    return out


def replay(evs: list[HttpEvent], tracker: ConversationTracker | None = None) -> list[LlmExchange]:
    asm = ExchangeAssembler(context(), conversations=tracker if tracker is not None else ConversationTracker())
    out: list[LlmExchange] = []
    for ev in evs:
        out.extend(asm.on_event(ev))
    out.extend(asm.on_close(evs[-1].ts_ns + 1 if evs else 0))
    return out


def record_of(case: Case, split: Any = None) -> dict[str, Any]:
    recs = replay(events(case, split))
    assert len(recs) == 1, f"{case.name}: {len(recs)} records"
    return recs[0].model_dump(mode="json")


def regen() -> None:
    for case in load_cases():
        rec = record_of(case)
        case.expected_path.write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
        r = rec["response"] or {}
        print(
            f"{case.name:38} {rec['provider']:18} {rec['api']:22} {str(rec['model'])[:28]:28} "
            f"text={r.get('text', '')[:30]!r} tools={len(r.get('tool_calls', []))} err={(rec['error'] or {}).get('kind')}"
        )


if __name__ == "__main__":
    if "--regen" in sys.argv:
        regen()


CASES_BY_NAME = {c.name: c for c in load_cases()}
