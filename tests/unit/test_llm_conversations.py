"""Tool-use ids chain exchanges into conversations; memory stays bounded."""

from __future__ import annotations

import pytest

from llmspyd.llm.conversations import ConversationTracker
from llmspyd.llm.record import LlmExchange, Message, ProcessRef, RequestRecord, ResponseRecord, ToolCall
from tests.unit.llm_cases import CASES_BY_NAME, events, replay


@pytest.mark.parametrize(
    "first,follow_up",
    [
        ("openai_chat_tools_stream", "openai_chat_tool_result"),  # tool_call_id
        ("anthropic_tools_stream", "anthropic_tool_result"),  # tool_use_id
        ("openai_responses_tools_stream", "openai_responses_tool_result"),  # call_id + previous_response_id
    ],
)
def test_tool_result_links_to_the_call(first: str, follow_up: str) -> None:
    tracker = ConversationTracker()
    unrelated = CASES_BY_NAME["gemini_generate"]
    a, b, c = (CASES_BY_NAME[first], unrelated, CASES_BY_NAME[follow_up])
    evs = events(a, msg=1, t0=1_000_000_000) + events(b, msg=3, t0=2_000_000_000) + events(c, msg=5, t0=3_000_000_000)
    r1, r2, r3 = replay(evs, tracker)
    assert r1.response.tool_calls and r1.conversation_id == r1.id
    assert r2.conversation_id == r2.id  # another conversation
    assert r3.conversation_id == r1.id != r3.id
    assert tracker.linked == 1


def _ex(
    i: int, pid: int = 1, user: str | None = None, calls=(), results=(), resp_id=None
) -> tuple[LlmExchange, list[str]]:
    msgs = [Message(role="user", content=user)] if user else []
    msgs += [Message(role="tool", tool_call_id=r, content="ok") for r in results]
    ex = LlmExchange(
        id=f"ex{i}",
        provider="p",
        api="a",
        process=ProcessRef(pid=pid),
        request=RequestRecord(messages=msgs),
        response=ResponseRecord(id=resp_id, tool_calls=[ToolCall(id=c, name="f") for c in calls]),
    )
    return ex, list(results)


def test_chain_of_three_and_thread_key() -> None:
    t = ConversationTracker()
    e1, _ = _ex(1, user="fix the bug", calls=["c1"])
    e2, r2 = _ex(2, results=["c1"], calls=["c2"])
    e3, r3 = _ex(3, results=["c2"])
    e4, _ = _ex(4, user="fix the bug")  # same process resends the history: same thread
    e5, _ = _ex(5, pid=2, user="fix the bug")  # another process: another conversation
    assert t.assign(e1, [], None) == "ex1"
    assert t.assign(e2, r2, None) == "ex1"
    assert t.assign(e3, r3, None) == "ex1"
    assert t.assign(e4, [], None) == "ex1"
    assert t.assign(e5, [], None) == "ex5"


def test_previous_response_id_links() -> None:
    t = ConversationTracker()
    e1, _ = _ex(1, resp_id="resp_1")
    t.assign(e1, [], None)
    e2, _ = _ex(2)
    assert t.assign(e2, [], "resp_1") == "ex1"


def test_memory_is_bounded_lru() -> None:
    t = ConversationTracker(max_keys=100)
    for i in range(1000):
        e, _ = _ex(i, calls=[f"c{i}"])
        t.assign(e, [], None)
    assert len(t) == 100 and t.evicted == 900
    old, r = _ex(2000, results=["c0"])
    assert t.assign(old, r, None) == "ex2000"  # forgotten: starts a new chain
    new, r = _ex(2001, results=["c999"])
    assert t.assign(new, r, None) == "ex999"
