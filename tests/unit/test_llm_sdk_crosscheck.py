"""The official SDKs read the same recorded responses and must agree with our records.

The recordings' responses are fed to the openai and anthropic SDKs through a
mock transport; what the SDK assembles (text, tool calls, thinking, usage) is
compared with what the assembler put in the expected record. This checks
the records against an independent reader of the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.unit.llm_cases import Case, load_cases

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")

CASES = {c.name: c for c in load_cases()}


def _transport(case: Case, mod: Any) -> Any:
    def handler(request: Any) -> Any:
        return mod.Response(case.meta["status"], headers=case.meta["response_headers"], content=case.response)

    return mod.MockTransport(handler)


def _openai(case: Case) -> Any:
    return openai.OpenAI(
        api_key="x",
        base_url="https://api.openai.com/v1",
        max_retries=0,
        http_client=httpx.Client(transport=_transport(case, httpx)),
    )


def _chat(case: Case) -> dict[str, Any]:
    client = _openai(case)
    req = json.loads(case.request)
    if not req.get("stream"):
        r = client.chat.completions.create(model="m", messages=[])
        m = r.choices[0].message
        return {
            "text": m.content or "",
            "tools": [(t.id, t.function.name, t.function.arguments) for t in m.tool_calls or []],
            "output_tokens": r.usage.completion_tokens if r.usage else None,
        }
    text, tools, usage = [], {}, None
    for ch in client.chat.completions.create(model="m", messages=[], stream=True):
        usage = ch.usage or usage
        for c in ch.choices:
            text.append(c.delta.content or "")
            for tc in c.delta.tool_calls or []:
                t = tools.setdefault(tc.index, ["", "", ""])
                t[0] = tc.id or t[0]
                t[1] += tc.function.name or "" if tc.function else ""
                t[2] += tc.function.arguments or "" if tc.function else ""
    return {
        "text": "".join(text),
        "tools": [tuple(v) for v in tools.values()],
        "output_tokens": usage.completion_tokens if usage else None,
    }


def _responses(case: Case) -> dict[str, Any]:
    client = _openai(case)
    if not json.loads(case.request).get("stream"):
        r = client.responses.create(model="m", input="x")
    else:
        r = None
        for ev in client.responses.create(model="m", input="x", stream=True):
            if ev.type == "response.completed":
                r = ev.response
        assert r is not None
    tools = [(o.call_id, o.name, o.arguments) for o in r.output if o.type == "function_call"]
    return {"text": r.output_text, "tools": tools, "output_tokens": r.usage.output_tokens if r.usage else None}


def _completions(case: Case) -> dict[str, Any]:
    client = _openai(case)
    if not json.loads(case.request).get("stream"):
        r = client.completions.create(model="m", prompt="x")
        return {"text": r.choices[0].text, "tools": [], "output_tokens": r.usage.completion_tokens}
    text = "".join(
        ch.choices[0].text for ch in client.completions.create(model="m", prompt="x", stream=True) if ch.choices
    )
    return {"text": text, "tools": [], "output_tokens": None}


def _anthropic(case: Case) -> dict[str, Any]:
    client = anthropic.Anthropic(
        api_key="x", max_retries=0, http_client=httpx2.Client(transport=_transport(case, httpx2))
    )
    if not json.loads(case.request).get("stream"):
        m = client.messages.create(model="m", max_tokens=1, messages=[])
    else:
        with client.messages.stream(model="m", max_tokens=1, messages=[]) as s:
            m = s.get_final_message()
    text = "".join(b.text for b in m.content if b.type == "text")
    thinking = "".join(b.thinking for b in m.content if b.type == "thinking") or None
    tools = [(b.id, b.name, json.dumps(b.input)) for b in m.content if b.type == "tool_use"]
    return {"text": text, "tools": tools, "output_tokens": m.usage.output_tokens, "thinking": thinking}


READERS = {
    "openai_chat": _chat,
    "openai_chat_stream": _chat,
    "openai_chat_tools_stream": _chat,
    "openai_chat_tool_result": _chat,
    "azure_chat_stream": _chat,
    "openrouter_chat_stream": _chat,
    "vllm_chat_stream": _chat,
    "litellm_chat": _chat,
    "ollama_openai_chat": _chat,
    "generic_gateway_chat": _chat,
    "deepseek_reasoner_stream": _chat,
    "docs_openai_chat_stream": _chat,
    "docs_anthropic_tools_stream": _anthropic,
    "openai_responses_reasoning_stream": _responses,
    "openai_responses": _responses,
    "openai_responses_stream": _responses,
    "openai_responses_tools_stream": _responses,
    "openai_responses_tool_result": _responses,
    "openai_completions": _completions,
    "openai_completions_stream": _completions,
    "anthropic_messages": _anthropic,
    "anthropic_messages_stream_thinking": _anthropic,
    "anthropic_tools_stream": _anthropic,
    "anthropic_tool_result": _anthropic,
    "bedrock_invoke": _anthropic,
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_sdk_agrees_with_record(name: str) -> None:
    case = CASES[name]
    sdk = READERS[name](case)
    rec = case.expected()
    resp = rec["response"]
    assert resp["text"] == sdk["text"]
    ours = [(t["id"], t["name"], t["arguments"]) for t in resp["tool_calls"]]
    theirs = sdk["tools"]
    if name.startswith(
        ("anthropic", "bedrock", "docs_anthropic")
    ):  # the SDK re-serializes input objects: compare as JSON
        ours = [(i, n, json.loads(a)) for i, n, a in ours]
        theirs = [(i, n, json.loads(a)) for i, n, a in theirs]
    assert ours == theirs
    if sdk["output_tokens"] is not None:
        assert rec["usage"]["output_tokens"] == sdk["output_tokens"]
    if "thinking" in sdk:
        assert resp["thinking"] == sdk["thinking"]


def test_embeddings_count_agrees() -> None:
    case = CASES["openai_embeddings"]
    r = _openai(case).embeddings.create(model="m", input=["a", "b"])
    rec = case.expected()["response"]
    assert rec["embeddings"] == len(r.data) and rec["dimensions"] == len(r.data[0].embedding)
