"""Every recorded exchange yields its expected record, however its bytes are split."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.llm_cases import Case, events, load_cases, record_of, replay

CASES = load_cases()
IDS = [c.name for c in CASES]

# every provider family and API the issue lists has at least one recording
REQUIRED_APIS = {
    ("openai", "chat.completions"),
    ("openai", "responses"),
    ("openai", "completions"),
    ("openai", "embeddings"),
    ("anthropic", "messages"),
    ("gemini", "generateContent"),
    ("gemini", "streamGenerateContent"),
    ("azure-openai", "chat.completions"),
    ("openrouter", "chat.completions"),
    ("openai-compatible", "chat.completions"),
    ("litellm", "chat.completions"),
    ("ollama", "chat.completions"),
    ("ollama", "ollama.chat"),
    ("ollama", "ollama.generate"),
    ("bedrock", "bedrock.converse"),
    ("bedrock", "bedrock.converseStream"),
    ("bedrock", "bedrock.invoke"),
    ("bedrock", "bedrock.invokeStream"),
    ("generic", "generic"),
}


def test_coverage_of_recordings() -> None:
    seen = {(c.expected()["provider"], c.expected()["api"]) for c in CASES}
    assert REQUIRED_APIS <= seen, REQUIRED_APIS - seen
    streamed = {(c.expected()["api"], c.expected()["stream"]) for c in CASES}
    for api in ("chat.completions", "responses", "completions", "messages", "ollama.chat"):
        assert (api, True) in streamed and (api, False) in streamed, api


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_whole(case: Case) -> None:
    assert record_of(case) == case.expected()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_byte_by_byte(case: Case) -> None:
    assert record_of(case, "bytes") == case.expected()


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_splits(case: Case, data: st.DataObject) -> None:
    n = max(len(case.response), len(case.request))
    cuts = data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=40))
    assert record_of(case, cuts) == case.expected()


def _without_timing(rec: dict[str, Any]) -> dict[str, Any]:
    rec = copy.deepcopy(rec)
    rec.pop("ttft_ms")
    for k in ("first_token_ns", "first_token"):
        rec["timing"].pop(k)
    return rec


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_splits_across_flushes(case: Case, data: st.DataObject) -> None:
    """Pieces that span server flushes arrive later: only the first-token time may move, never earlier."""
    cuts = data.draw(st.lists(st.integers(1, max(1, len(case.response) - 1)), max_size=10))
    recs = replay(events(case, cuts, keep_flushes=False))
    assert len(recs) == 1
    got = recs[0].model_dump(mode="json")
    exp = case.expected()
    assert _without_timing(got) == _without_timing(exp)
    if exp["ttft_ms"] is not None:
        assert got["ttft_ms"] >= exp["ttft_ms"]


def test_keep_alive_many_exchanges_on_one_connection() -> None:
    """Several recorded exchanges back to back on one connection: each gives its own record."""
    picked = CASES[:6]
    evs = []
    for i, case in enumerate(picked):
        evs += events(case, msg=i + 1, t0=10_000_000_000 * (i + 1))
    recs = replay(evs)
    assert [r.api for r in recs] == [c.expected()["api"] for c in picked]
    assert [r.response.text for r in recs] == [c.expected()["response"]["text"] for c in picked]
    assert len({r.id for r in recs}) == len(picked)


def test_h2_interleaved_streams() -> None:
    """HTTP/2 multiplexing: events of two streams interleave; records do not mix."""
    a = next(c for c in CASES if c.name == "openai_chat_stream")
    b = next(c for c in CASES if c.name == "anthropic_messages_stream_thinking")
    ea, eb = events(a, "bytes", msg=1), events(b, "bytes", msg=3)
    merged = []
    for i in range(max(len(ea), len(eb))):
        merged += ea[i : i + 1] + eb[i : i + 1]
    recs = {r.api: r for r in replay(merged)}
    assert recs["chat.completions"].response.text == a.expected()["response"]["text"]
    assert recs["messages"].response.text == b.expected()["response"]["text"]
    assert recs["messages"].response.thinking == b.expected()["response"]["thinking"]
