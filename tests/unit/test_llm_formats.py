"""Format details the recordings do not cover, one small body each."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_llm_assembler import JSON, SSE, asm, exchange, run


def sse(*events: tuple[str | None, dict]) -> bytes:
    return b"".join(((f"event: {n}\n" if n else "") + f"data: {json.dumps(d)}\n\n").encode() for n, d in events)


NDJSON = [("content-type", "application/x-ndjson")]
CASES = [
    (
        "responses_failed",
        "/v1/responses",
        "api.openai.com",
        SSE,
        sse(
            ("response.created", {"type": "response.created", "response": {"id": "r1", "status": "in_progress"}}),
            ("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 0, "delta": "Hi"}),
            (
                "response.failed",
                {
                    "type": "response.failed",
                    "response": {
                        "id": "r1",
                        "status": "failed",
                        "output": [],
                        "error": {"code": "server_error", "message": "The model failed."},
                    },
                },
            ),
        ),
        {"text": "Hi", "finish_reason": "failed", "error": ("stream_error", "The model failed.")},
    ),
    (
        "responses_incomplete",
        "/v1/responses",
        "api.openai.com",
        SSE,
        sse(
            ("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 0, "delta": "Lo"}),
            (
                "response.incomplete",
                {
                    "type": "response.incomplete",
                    "response": {
                        "status": "incomplete",
                        "incomplete_details": {"reason": "max_output_tokens"},
                        "usage": {"input_tokens": 5, "output_tokens": 16},
                    },
                },
            ),
        ),
        {"text": "Lo", "finish_reason": "max_output_tokens", "error": None, "output_tokens": 16},
    ),
    (
        "anthropic_overloaded_json",
        "/v1/messages",
        "api.anthropic.com",
        JSON,
        b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        {"text": "", "error": ("http_error", "Overloaded", "overloaded_error")},
    ),
    (
        "gemini_blocked_prompt",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "generativelanguage.googleapis.com",
        JSON,
        b'{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":7,"totalTokenCount":7}}',
        {"text": "", "finish_reason": "SAFETY", "error": None},
    ),
    (
        "ollama_thinking_stream",
        "/api/chat",
        "localhost:11434",
        NDJSON,
        b'{"model":"qwen3","message":{"role":"assistant","content":"","thinking":"hmm"},"done":false}\n'
        b'{"model":"qwen3","message":{"role":"assistant","content":"Hi"},"done":false}\n'
        b'{"model":"qwen3","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
        b'"prompt_eval_count":3,"eval_count":2}',  # no final newline: the last line still counts
        {"text": "Hi", "thinking": "hmm", "finish_reason": "stop", "error": None, "output_tokens": 2},
    ),
    (
        "chat_stream_without_done_marker",
        "/v1/chat/completions",
        "api.openai.com",
        SSE,
        sse((None, {"choices": [{"index": 0, "delta": {"content": "cut"}}]})),
        {"text": "cut", "error": ("incomplete", "stream ended without its end event")},
    ),
    (
        "chat_refusal_and_reasoning_field",
        "/api/v1/chat/completions",
        "openrouter.ai",
        SSE,
        sse(
            (None, {"choices": [{"index": 0, "delta": {"reasoning": "think "}}]}),
            (None, {"choices": [{"index": 0, "delta": {"refusal": "I can't."}, "finish_reason": "stop"}]}),
            (None, {"choices": [{"index": 1, "delta": {"content": "second choice ignored"}}]}),
        )
        + b"data: [DONE]\n\n",
        {"text": "I can't.", "thinking": "think ", "finish_reason": "stop", "error": None},
    ),
    (
        "invalid_sse_json_counted",
        "/v1/chat/completions",
        "api.openai.com",
        SSE,
        b'data: {"choices": [\n\ndata: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\ndata: [DONE]\n\n',
        {"text": "ok", "error": None, "bad_events": 1},
    ),
]


@pytest.mark.parametrize("name,target,host,rheaders,body,want", CASES, ids=[c[0] for c in CASES])
def test_format_detail(name, target, host, rheaders, body, want) -> None:
    req = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "input": "hi"}'
    (r,) = run(asm(), exchange(target, host, req, rheaders=rheaders, rbody=body))
    resp = r.response
    assert resp.text == want["text"]
    if "finish_reason" in want:
        assert resp.finish_reason == want["finish_reason"]
    if "thinking" in want:
        assert resp.thinking == want["thinking"]
    if "output_tokens" in want:
        assert r.usage.output_tokens == want["output_tokens"]
    if "bad_events" in want:
        assert resp.bad_events == want["bad_events"]
    if want["error"] is None:
        assert r.error is None and r.complete
    else:
        kind, message, *typ = want["error"]
        assert (r.error.kind, r.error.message) == (kind, message)
        if typ:
            assert r.error.type == typ[0]


def _invoke_stream(*inner: dict) -> bytes:
    import base64

    from llmspyd.llm.eventstream import encode_message

    return b"".join(
        encode_message(
            {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
            json.dumps({"bytes": base64.b64encode(json.dumps(x).encode()).decode()}).encode(),
        )
        for x in inner
    )


ES = [("content-type", "application/vnd.amazon.eventstream")]
METRICS = {"amazon-bedrock-invocationMetrics": {"inputTokenCount": 9, "outputTokenCount": 4}}


@pytest.mark.parametrize(
    "model,request_body,chunks,text,finish",
    [
        (
            "meta.llama3-1-8b-instruct-v1%3A0",
            {"prompt": "<|begin_of_text|>hi", "max_gen_len": 64},
            [{"generation": "Hel", "stop_reason": None}, {"generation": "lo", "stop_reason": "stop", **METRICS}],
            "Hello",
            "stop",
        ),
        (
            "amazon.titan-text-express-v1",
            {"inputText": "hi", "textGenerationConfig": {"maxTokenCount": 64}},
            [{"outputText": "Hel", "index": 0}, {"outputText": "lo", "completionReason": "FINISH", **METRICS}],
            "Hello",
            "FINISH",
        ),
        (
            "amazon.nova-lite-v1%3A0",
            {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
            [
                {"contentBlockDelta": {"delta": {"text": "Hel"}, "contentBlockIndex": 0}},
                {"contentBlockDelta": {"delta": {"text": "lo"}, "contentBlockIndex": 0}},
                {"messageStop": {"stopReason": "end_turn"}, **METRICS},
            ],
            "Hello",
            "end_turn",
        ),
    ],
)
def test_bedrock_invoke_stream_other_model_families(model, request_body, chunks, text, finish) -> None:
    (r,) = run(
        asm(),
        exchange(
            f"/model/{model}/invoke-with-response-stream",
            "bedrock-runtime.us-west-2.amazonaws.com",
            json.dumps(request_body).encode(),
            rheaders=ES,
            rbody=_invoke_stream(*chunks),
        ),
    )
    assert (r.api, r.response.text, r.response.finish_reason, r.usage.output_tokens) == (
        "bedrock.invokeStream",
        text,
        finish,
        4,
    )
    assert r.error is None and r.complete and "hi" in r.request.messages[0].content


def test_gemini_cli_code_assist_wrapping() -> None:
    """gemini-cli signed in with Google talks to Code Assist: request and responses wrapped one level deeper."""
    req = {
        "model": "gemini-2.5-pro",
        "project": "p-123",
        "user_prompt_id": "u1",
        "request": {
            "contents": [{"role": "user", "parts": [{"text": "list files"}]}],
            "systemInstruction": {"parts": [{"text": "You are an interactive CLI agent."}]},
        },
    }
    els = [
        {"response": {"candidates": [{"content": {"role": "model", "parts": [{"text": "Sure"}]}}]}, "traceId": "t"},
        {
            "response": {
                "candidates": [{"content": {"role": "model", "parts": [{"text": "."}]}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 2},
            },
            "traceId": "t",
        },
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in els)
    (r,) = run(
        asm(),
        exchange(
            "/v1internal:streamGenerateContent?alt=sse",
            "cloudcode-pa.googleapis.com",
            json.dumps(req).encode(),
            rheaders=SSE,
            rbody=body,
        ),
    )
    assert (r.provider, r.api, r.model, r.request.system, r.request.messages[0].content) == (
        "gemini-code-assist",
        "streamGenerateContent",
        "gemini-2.5-pro",
        "You are an interactive CLI agent.",
        "list files",
    )
    assert (r.response.text, r.response.finish_reason, r.usage.output_tokens, r.error) == ("Sure.", "STOP", 2, None)


def test_codex_cli_chatgpt_backend() -> None:
    body = sse(
        ("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 0, "delta": "ok"}),
        ("response.completed", {"type": "response.completed", "response": {"status": "completed"}}),
    )
    (r,) = run(
        asm(),
        exchange(
            "/backend-api/codex/responses",
            "chatgpt.com",
            b'{"model": "gpt-5-codex", "instructions": "You are Codex.", "input": [], "stream": true}',
            rheaders=SSE,
            rbody=body,
        ),
    )
    assert (r.provider, r.api, r.model, r.request.system, r.response.text) == (
        "openai",
        "responses",
        "gpt-5-codex",
        "You are Codex.",
        "ok",
    )


def test_answer_in_another_shape_is_read_by_shape() -> None:
    """Cohere v2 chat: OpenAI-like request, its own answer shape."""
    rbody = json.dumps(
        {
            "id": "c1",
            "finish_reason": "COMPLETE",
            "message": {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
            "usage": {"tokens": {"input_tokens": 3, "output_tokens": 1}},
        }
    ).encode()
    (r,) = run(asm(), exchange("/v2/chat", "api.cohere.com", b'{"model": "command-a", "messages": []}', rbody=rbody))
    assert (r.provider, r.response.text, r.error) == ("cohere", "Bonjour", None)
