"""Real captures replayed: TLS chunks that the BPF probes recorded from real clients (openai and
anthropic SDKs over HTTP/1.1 and h2, node fetch, curl) talking to tests/fakeprovider.py, through the
whole pure pipeline. Recorded by tests/data/llm/capture.py; expected records next to each capture.

    python -m tests.unit.test_llm_captured --regen
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspyd.chunks import ConnClosed, Direction, Stack, TlsChunk
from llmspyd.llm.assembler import ExchangeAssembler
from llmspyd.llm.conversations import ConversationTracker
from llmspyd.pipeline import Pipeline

CAPTURED = Path(__file__).resolve().parents[1] / "data" / "llm" / "captured"
NAMES = sorted(p.stem for p in CAPTURED.glob("*.jsonl"))


def load(name: str) -> list[Any]:
    out: list[Any] = []
    for line in (CAPTURED / f"{name}.jsonl").read_text().splitlines():
        x = json.loads(line)
        if x["kind"] == "chunk":
            out.append(
                TlsChunk(
                    ts_ns=x["ts_ns"],
                    pid=x["pid"],
                    tid=x["tid"],
                    comm=x["comm"],
                    conn=x["conn"],
                    direction=Direction(x["direction"]),
                    offset=x["offset"],
                    data=base64.b64decode(x["data"]),
                    call_len=x["call_len"],
                    stack=Stack(x["stack"]),
                    first=x["first"],
                    last=x["last"],
                    truncated=x["truncated"],
                    fault=x["fault"],
                    fd=x["fd"],
                )
            )
        else:
            out.append(ConnClosed(ts_ns=x["ts_ns"], pid=x["pid"], conn=x["conn"], stack=Stack(x["stack"])))
    return out


def split(events: list[Any], cuts: list[int]) -> list[Any]:
    """Cut chunks at these byte positions (of the whole capture), as if calls had been read in pieces."""
    out: list[Any] = []
    pos = 0
    cutset = sorted(set(cuts))
    for e in events:
        if not isinstance(e, TlsChunk):
            out.append(e)
            continue
        inner = [c - pos for c in cutset if pos < c < pos + len(e.data)]
        bounds = [0] + inner + [len(e.data)]
        for a, b in zip(bounds, bounds[1:]):
            out.append(
                TlsChunk(
                    ts_ns=e.ts_ns,
                    pid=e.pid,
                    tid=e.tid,
                    comm=e.comm,
                    conn=e.conn,
                    direction=e.direction,
                    offset=e.offset + a,
                    data=e.data[a:b],
                    call_len=e.call_len,
                    stack=e.stack,
                    first=e.first and a == 0,
                    last=e.last and b == len(e.data),
                    fd=e.fd,
                )
            )
        pos += len(e.data)
    return out


def records(events: list[Any]) -> list[dict[str, Any]]:
    got: list[Any] = []
    tracker = ConversationTracker()
    pipe = Pipeline(
        emit=got.append,
        clock_offset_ns=1_700_000_000 * 10**9,
        assembler_factory=lambda ctx: ExchangeAssembler(ctx, tracker),
    )
    pipe.feed(events)
    pipe.close()
    return [comparable(r.model_dump(mode="json")) for r in got]


def comparable(r: dict[str, Any]) -> dict[str, Any]:
    """What a capture must reproduce: everything but ids and wall-clock strings depend only on the bytes."""
    resp = r["response"] or {}
    return {
        "provider": r["provider"],
        "api": r["api"],
        "model": r["model"],
        "stream": r["stream"],
        "http_version": r["connection"]["http_version"],
        "authority": r["connection"]["authority"],
        "path": r["request"]["path"],
        "system": r["request"]["system"],
        "messages": [
            [m["role"], m["content"], [t["id"] for t in m["tool_calls"]], m["tool_call_id"]]
            for m in r["request"]["messages"]
        ],
        "status": resp.get("status"),
        "text": resp.get("text"),
        "thinking": resp.get("thinking"),
        "tool_calls": resp.get("tool_calls"),
        "finish_reason": resp.get("finish_reason"),
        "usage": r["usage"],
        "complete": r["complete"],
        "error": r["error"],
        "ttft_ms": r["ttft_ms"],
        "latency_ms": r["latency_ms"],
        "chained": r["conversation_id"] != r["id"],
    }


def expected(name: str) -> list[dict[str, Any]]:
    return json.loads((CAPTURED / f"{name}.expected.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_capture_gives_expected_records(name: str) -> None:
    assert records(load(name)) == expected(name)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_capture_split_at_random_points(name: str, data: st.DataObject) -> None:
    events = load(name)
    total = sum(len(e.data) for e in events if isinstance(e, TlsChunk))
    cuts = data.draw(st.lists(st.integers(1, total - 1), max_size=30))
    assert records(split(events, cuts)) == expected(name)


def test_captures_cover_the_clients() -> None:
    recs = {n: expected(n) for n in NAMES}
    assert {r["http_version"] for rs in recs.values() for r in rs} == {"1.1", "2"}
    assert all(r["complete"] and r["error"] is None for rs in recs.values() for r in rs)
    # the h2 tool round trip: the second exchange answers the first one's call and joins its conversation
    first, second = recs["openai_sdk_h2_tools_then_result"]
    assert first["tool_calls"] and second["messages"][-1][3] == first["tool_calls"][0]["id"] and second["chained"]


if __name__ == "__main__" and "--regen" in sys.argv:
    for n in NAMES:
        recs = records(load(n))
        (CAPTURED / f"{n}.expected.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False) + "\n")
        print(
            n, [(r["api"], r["text"][:40] if r["text"] else r["tool_calls"], r["complete"], r["error"]) for r in recs]
        )
