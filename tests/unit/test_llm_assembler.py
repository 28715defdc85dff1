"""Assembler behaviour beyond the recordings: provider detection, non-LLM traffic, damage and limits."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspyd.llm.assembler import ExchangeAssembler, Limits
from llmspyd.llm.conversations import ConversationTracker
from llmspyd.llm.providers import detect_head
from llmspyd.protocols.events import (
    ConnectionInfo,
    MessageBroken,
    RequestData,
    RequestEnd,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseHead,
)
from tests.unit.llm_cases import CASES_BY_NAME, context, events, replay

JSON = [("content-type", "application/json")]
SSE = [("content-type", "text/event-stream")]


def asm(**kw) -> ExchangeAssembler:
    return ExchangeAssembler(context(), conversations=ConversationTracker(), **kw)


def run(a: ExchangeAssembler, evs: list) -> list:
    out = []
    for e in evs:
        out += a.on_event(e)
    return out


def exchange(
    target: str,
    authority: str,
    body: bytes,
    status: int = 200,
    rheaders=JSON,
    rbody: bytes = b"{}",
    method: str = "POST",
    headers=JSON,
    msg: int = 1,
) -> list:
    return [
        RequestHead(msg, 10, method, target, list(headers), "1.1", authority),
        RequestData(msg, 11, body),
        RequestEnd(msg, 12),
        ResponseHead(msg, 20, status, list(rheaders)),
        ResponseData(msg, 30, rbody),
        ResponseEnd(msg, 40),
    ]


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


# --- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,authority,headers,provider,api",
    [
        ("/v1/chat/completions", "api.openai.com", JSON, "openai", "chat.completions"),
        (
            "/openai/deployments/d1/chat/completions?api-version=2024-10-21",
            "x.openai.azure.com",
            JSON,
            "azure-openai",
            "chat.completions",
        ),
        ("/openai/deployments/d1/embeddings?api-version=1", "proxy.local", JSON, "azure-openai", "embeddings"),
        ("/api/v1/chat/completions", "openrouter.ai", JSON, "openrouter", "chat.completions"),
        ("/v1/responses", "api.openai.com", JSON, "openai", "responses"),
        ("/v1/messages", "api.anthropic.com", JSON, "anthropic", "messages"),
        ("/v1/messages?beta=true", "api.anthropic.com", JSON, "anthropic", "messages"),
        ("/v1/messages", "proxy.local", JSON + [("anthropic-version", "2023-06-01")], "anthropic", "messages"),
        (
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            "generativelanguage.googleapis.com",
            JSON,
            "gemini",
            "streamGenerateContent",
        ),
        (
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent",
            "us-central1-aiplatform.googleapis.com",
            JSON,
            "vertex-ai",
            "generateContent",
        ),
        (
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4:streamRawPredict",
            "us-east5-aiplatform.googleapis.com",
            JSON,
            "vertex-ai",
            "messages",
        ),
        ("/api/chat", "localhost:11434", JSON, "ollama", "ollama.chat"),
        ("/v1/chat/completions", "127.0.0.1:11434", JSON, "ollama", "chat.completions"),
        (
            "/model/amazon.nova-pro-v1%3A0/converse-stream",
            "bedrock-runtime.eu-west-1.amazonaws.com",
            JSON,
            "bedrock",
            "bedrock.converseStream",
        ),
        ("/v1/chat/completions", "api.groq.com", JSON, "groq", "chat.completions"),
    ],
)
def test_detect_head(target, authority, headers, provider, api) -> None:
    det = detect_head("POST", target, authority, headers)
    assert det is not None and (det.provider, det.api) == (provider, api)


@pytest.mark.parametrize(
    "method,target,headers",
    [
        ("GET", "/index.html", []),
        ("GET", "/v1/models", JSON),  # listing models is not a model call
        ("POST", "/upload", [("content-type", "multipart/form-data; boundary=x")]),
        ("POST", "/login", [("content-type", "application/x-www-form-urlencoded")]),
        ("POST", "/v1/messages/count_tokens", JSON),  # generates nothing
        ("POST", "/v1beta/models/gemini-2.5-pro:countTokens", JSON),
        ("POST", "/v1/batches", JSON),
    ],
)
def test_non_llm_heads_are_dropped_from_the_head(method, target, headers) -> None:
    assert detect_head(method, target, "example.com", headers) is None


def test_model_from_path_when_body_has_none() -> None:
    recs = run(
        asm(),
        exchange(
            "/v1beta/models/gemini-2.0-flash:generateContent",
            "generativelanguage.googleapis.com",
            b'{"contents":[{"parts":[{"text":"hi"}]}]}',
            rbody=b'{"candidates":[{"content":{"parts":[{"text":"yo"}]},"finishReason":"STOP"}]}',
        ),
    )
    assert recs[0].model == "gemini-2.0-flash" and recs[0].response.text == "yo"


# --- non-LLM traffic ---------------------------------------------------------------------------


def test_non_llm_first_request_mutes_connection_and_is_counted() -> None:
    a = asm()
    assert a.wants_connection() is None
    evs = exchange("/index.html", "example.com", b"", method="GET", rbody=b"<html>" * 1000)
    assert run(a, evs[:1]) == []
    assert a.wants_connection() is False
    assert run(a, evs[1:]) == []
    assert a.stats["non_llm_requests"] == 1


def test_unknown_json_post_decided_by_body() -> None:
    a = asm()
    assert run(a, exchange("/api/v2/orders", "shop.example", b'{"item": 3, "qty": 1}')) == []
    assert a.wants_connection() is False and a.stats["non_llm_requests"] == 1

    b = asm()
    recs = run(
        b,
        exchange(
            "/x/run",
            "gw.example",
            CHAT,
            rbody=json.dumps(
                {
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}
                    ]
                }
            ).encode(),
        ),
    )
    assert b.wants_connection() is True
    assert (recs[0].provider, recs[0].api, recs[0].response.text) == ("openai-compatible", "chat.completions", "hello")


def test_llm_connection_is_wanted_from_the_head() -> None:
    a = asm()
    run(a, exchange("/v1/chat/completions", "api.openai.com", CHAT)[:1])
    assert a.wants_connection() is True


def test_connection_info_is_accepted() -> None:
    a = asm()
    assert a.on_event(ConnectionInfo("h2", 1)) == [] and a.protocol == "h2"


# --- damage ------------------------------------------------------------------------------------


def test_invalid_request_json_still_recorded() -> None:
    recs = run(
        asm(),
        exchange(
            "/v1/chat/completions",
            "api.openai.com",
            b'{"model": "gpt-4o", "messages": [',
            rbody=b'{"error": {"message": "We could not parse the JSON body", "type": "invalid_request_error"}}',
            status=400,
        ),
    )
    r = recs[0]
    assert r.error.kind == "http_error" and r.error.status == 400 and "parse" in r.error.message
    assert r.request.body.startswith('{"model"')


def test_invalid_response_json_is_a_parse_error_with_raw_body() -> None:
    recs = run(asm(), exchange("/v1/chat/completions", "api.openai.com", CHAT, rbody=b"<html>502 Bad Gateway</html>"))
    assert recs[0].error.kind == "parse_error" and recs[0].response.body == "<html>502 Bad Gateway</html>"


def test_http_error_without_json_body() -> None:
    recs = run(
        asm(),
        exchange(
            "/v1/messages",
            "api.anthropic.com",
            CHAT,
            status=529,
            rheaders=[("content-type", "text/plain")],
            rbody=b"overloaded",
        ),
    )
    assert recs[0].error.kind == "http_error" and recs[0].error.status == 529 and recs[0].complete


def test_truncated_sse_stream_is_incomplete() -> None:
    case = CASES_BY_NAME["openai_chat_stream"]
    evs = events(case)
    body = case.response
    cut = body.index(b"[DONE]") - 20  # inside the last usage event
    data = [e for e in evs if isinstance(e, ResponseData)]
    keep, acc = [], 0
    for e in data:
        if acc + len(e.data) > cut:
            keep.append(ResponseData(e.msg, e.ts_ns, e.data[: cut - acc]))
            break
        keep.append(e)
        acc += len(e.data)
    head = [e for e in evs if not isinstance(e, (ResponseData, ResponseEnd))]
    recs = replay(head + keep + [ResponseEnd(1, keep[-1].ts_ns + 1)])
    r = recs[0]
    assert r.error.kind == "incomplete" and not r.complete
    assert r.response.text == case.expected()["response"]["text"]  # every delta before the cut is kept


def test_broken_mid_stream_keeps_what_came() -> None:
    case = CASES_BY_NAME["anthropic_messages_stream_thinking"]
    evs = events(case)
    data_idx = [i for i, e in enumerate(evs) if isinstance(e, ResponseData)]
    cut = data_idx[len(data_idx) // 2]
    recs = replay(evs[:cut] + [MessageBroken(1, evs[cut].ts_ns, "gap", "lost 1200 bytes", missing_bytes=1200)])
    r = recs[0]
    assert r.error.kind == "broken" and r.missing_bytes == 1200 and not r.complete
    assert r.response.thinking and len(r.response.text) < len(case.expected()["response"]["text"])


def test_bad_event_stream_crc_counted() -> None:
    case = CASES_BY_NAME["bedrock_converse_stream"]
    evs = events(case)
    first = next(i for i, e in enumerate(evs) if isinstance(e, ResponseData) and b"contentBlockDelta" in e.data)
    bad = bytearray(evs[first].data)
    bad[-6] ^= 0xFF
    evs[first] = ResponseData(1, evs[first].ts_ns, bytes(bad))
    r = replay(evs)[0]
    assert r.response.bad_events == 1
    assert r.response.text != case.expected()["response"]["text"]  # the damaged delta is missing, not garbled
    assert r.response.text.endswith(case.expected()["response"]["text"][-6:])


def test_no_response_emitted_on_close() -> None:
    a = asm()
    run(a, exchange("/v1/chat/completions", "api.openai.com", CHAT)[:3])
    recs = a.on_close(99)
    assert len(recs) == 1 and recs[0].error.kind == "no_response" and recs[0].closed_early and recs[0].response is None
    assert recs[0].request.messages[0].content == "hi"


def test_response_cut_by_close() -> None:
    a = asm()
    evs = exchange(
        "/v1/chat/completions",
        "api.openai.com",
        CHAT,
        rheaders=SSE,
        rbody=b'data: {"choices":[{"index":0,"delta":{"content":"par"}}]}\n\n',
    )
    run(a, evs[:-1])
    r = a.on_close(99)[0]
    assert r.error.kind == "incomplete" and r.closed_early and r.response.text == "par"


def test_response_before_request_end() -> None:
    """An early error answer (HTTP/2 allows it) still pairs with its request."""
    evs = exchange("/v1/chat/completions", "api.openai.com", CHAT, status=413, rbody=b'{"error":{"message":"too big"}}')
    order = [evs[0], evs[1], evs[3], evs[4], evs[2], evs[5]]
    r = run(asm(), order)[0]
    assert r.error.message == "too big" and r.request.messages[0].content == "hi"


def test_request_body_limits() -> None:
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    r = run(asm(limits=Limits(max_raw_request_bytes=1000)), exchange("/v1/chat/completions", "api.openai.com", big))[0]
    assert r.request.body_truncated and len(r.request.body) == 1000 and r.request.body_bytes == len(big)
    assert r.request.messages[0].content == "x" * 5000  # parsing is not limited by the raw-body cut
    r = run(asm(limits=Limits(max_parse_bytes=1000)), exchange("/v1/chat/completions", "api.openai.com", big))[0]
    assert r.truncated and not r.complete


def test_events_for_unknown_msg_are_counted() -> None:
    a = asm()
    assert a.on_event(ResponseData(5, 1, b"x")) == [] and a.stats["events_without_request"] == 1


@settings(max_examples=150, deadline=None)
@given(
    req=st.binary(max_size=200),
    resp=st.binary(max_size=400),
    ctype=st.sampled_from(
        ["text/event-stream", "application/json", "application/x-ndjson", "application/vnd.amazon.eventstream", ""]
    ),
    target=st.sampled_from(
        [
            "/v1/chat/completions",
            "/v1/messages",
            "/v1/responses",
            "/api/chat",
            "/v1beta/models/g:streamGenerateContent",
            "/model/anthropic.x/invoke-with-response-stream",
            "/model/m/converse-stream",
            "/whatever",
        ]
    ),
    status=st.sampled_from([200, 400, 500]),
)
def test_garbage_never_raises(req: bytes, resp: bytes, ctype: str, target: str, status: int) -> None:
    a = asm()
    evs = exchange(target, "api.openai.com", req, status=status, rheaders=[("content-type", ctype)], rbody=resp)
    for e in evs:
        a.on_event(e)
    a.on_close(50)
    assert a.stats["internal_errors"] == 0


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_recorded_streams_with_garbage_spliced_in_never_raise(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(sorted(CASES_BY_NAME.values(), key=lambda c: c.name)))
    evs = events(case)
    i = data.draw(st.integers(0, len(evs) - 1))
    if isinstance(evs[i], (RequestData, ResponseData)):
        evs[i] = type(evs[i])(evs[i].msg, evs[i].ts_ns, data.draw(st.binary(max_size=64)))
    recs = replay(evs)
    assert len(recs) <= 1


@pytest.mark.parametrize(
    "authority,target",
    [
        ("api.openai.com", "/v1/models"),
        ("gpu-box:8000", "/v1/models"),
        ("localhost:11434", "/api/tags"),
        ("proxy:8080", "/v1/messages/count_tokens"),
    ],
)
def test_model_listing_first_does_not_mute_the_connection(authority: str, target: str) -> None:
    """SDKs list models on the connection they then use for the model call."""
    a = asm()
    assert run(a, exchange(target, authority, b"", method="GET", rbody=b'{"data": []}')) == []
    assert a.wants_connection() is not False and a.stats["non_llm_requests"] == 1
    recs = run(
        a,
        exchange(
            "/v1/chat/completions",
            authority,
            CHAT,
            msg=2,
            rbody=json.dumps(
                {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}]}
            ).encode(),
        ),
    )
    assert recs[0].response.text == "hello" and a.wants_connection() is True


def test_model_salvaged_from_a_body_cut_by_a_gap() -> None:
    body = b'{"model": "claude-opus-4", "stream": true, "messages": [{"role": "user", "content": "long'
    evs = exchange("/v1/messages", "api.anthropic.com", body)[:2]
    evs.append(MessageBroken(1, 13, "gap", missing_bytes=4096))
    r = run(asm(), evs)[0]
    assert r.model == "claude-opus-4" and r.error.kind == "broken" and r.missing_bytes == 4096


def test_converse_events_wrapped_the_sdk_way() -> None:
    """Some proxies re-frame Bedrock streams as SSE of {"eventName": {...}} objects."""
    sse = b"".join(
        b"data: " + json.dumps(e).encode() + b"\n\n"
        for e in [
            {"messageStart": {"role": "assistant"}},
            {"contentBlockDelta": {"delta": {"text": "Hel"}, "contentBlockIndex": 0}},
            {"contentBlockDelta": {"delta": {"text": "lo"}, "contentBlockIndex": 0}},
            {"messageStop": {"stopReason": "end_turn"}},
            {"metadata": {"usage": {"inputTokens": 3, "outputTokens": 2}}},
        ]
    )
    r = run(
        asm(),
        exchange(
            "/model/amazon.nova-lite-v1%3A0/converse-stream",
            "bedrock-runtime.us-east-1.amazonaws.com",
            b'{"messages": []}',
            rheaders=SSE,
            rbody=sse,
        ),
    )[0]
    assert (r.response.text, r.response.finish_reason, r.usage.output_tokens, r.error) == ("Hello", "end_turn", 2, None)


def test_close_after_the_stream_end_marker_is_a_complete_exchange() -> None:
    """The SDK read [DONE] and exited before the last HTTP chunk: the exchange lacks nothing."""
    case = CASES_BY_NAME["openai_chat_stream"]
    evs = events(case)
    assert isinstance(evs[-1], ResponseEnd)
    r = replay(evs[:-1] + [MessageBroken(1, evs[-1].ts_ns, "closed", "connection closed mid-message")])[0]
    assert r.complete and r.error is None and not r.closed_early
    assert r.model_dump(mode="json")["response"] == case.expected()["response"]


def test_close_before_the_stream_end_marker_is_broken() -> None:
    case = CASES_BY_NAME["openai_chat_stream"]
    evs = [e for e in events(case) if not isinstance(e, ResponseEnd)][:-2]
    r = replay(evs + [MessageBroken(1, evs[-1].ts_ns + 1, "closed")])[0]
    assert not r.complete and r.error.kind == "broken" and r.closed_early


def test_gemini_url_scheme_on_any_host_is_gemini() -> None:
    det = detect_head("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "127.0.0.1:8443", JSON)
    assert (det.provider, det.api, det.model, det.stream_hint) == (
        "gemini",
        "streamGenerateContent",
        "gemini-2.5-flash",
        True,
    )


def test_stream_before_request_end_on_a_body_detected_api() -> None:
    """h2 lets the answer start before the request ends; the format is only known from the body."""
    sse = (
        b'data: {"choices":[{"index":0,"delta":{"content":"he"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"llo"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    evs = exchange("/gw/run", "gw.example", CHAT, rheaders=SSE, rbody=sse)
    order = [evs[0], evs[1], evs[3], evs[4], evs[2], evs[5]]  # head, data, RESPONSE head+data, request end, end
    r = run(asm(), order)[0]
    assert (r.provider, r.api, r.response.text, r.stream, r.error) == (
        "openai-compatible",
        "chat.completions",
        "hello",
        True,
        None,
    )
    assert r.timing.first_token_ns == 30  # the time the delta arrived, not when it was decoded


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_events_dropped_duplicated_or_reordered_never_break_the_assembler(data: st.DataObject) -> None:
    """Whatever order a buggy or lossy lower layer delivers events in, the assembler stays consistent."""
    case = data.draw(st.sampled_from(sorted(CASES_BY_NAME.values(), key=lambda c: c.name)))
    evs = events(case, msg=1) + events(case, msg=2, t0=9_000_000_000)
    ops = data.draw(st.lists(st.tuples(st.sampled_from(["drop", "dup", "swap"]), st.integers(0, 10_000)), max_size=8))
    for op, i in ops:
        i %= len(evs)
        if op == "drop":
            del evs[i]
        elif op == "dup":
            evs.insert(i, evs[i])
        else:
            j = (i + 1) % len(evs)
            evs[i], evs[j] = evs[j], evs[i]
        if not evs:
            break
    a = asm()
    out = []
    for e in evs:
        out += a.on_event(e)
    out += a.on_close(10**12)
    assert a.stats["internal_errors"] == 0
    assert len(out) <= 4 and all(r.model_dump_json() for r in out)


def test_bedrock_path_behind_a_proxy_model_only_in_the_url() -> None:
    body = b'{"messages": [{"role": "user", "content": [{"text": "hi"}]}]}'
    rbody = b'{"output": {"message": {"role": "assistant", "content": [{"text": "yo"}]}}, "stopReason": "end_turn"}'
    (r,) = run(
        asm(), exchange("/bedrock/model/amazon.nova-pro-v1%3A0/converse", "litellm.local:4000", body, rbody=rbody)
    )
    assert (r.provider, r.api, r.model, r.response.text) == (
        "bedrock-compatible",
        "bedrock.converse",
        "amazon.nova-pro-v1:0",
        "yo",
    )
