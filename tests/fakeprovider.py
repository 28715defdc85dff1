"""A fake LLM provider answering like the real APIs, for everybody's tests.

`reply(method, path, query, headers, body) -> Reply` is pure: it builds the
exact status, headers and body pieces (one piece per SSE event / NDJSON
line / event-stream message, as a real server flushes them) for:

  POST .../chat/completions           OpenAI Chat Completions (JSON, or SSE with stream=true;
                                      final usage chunk with stream_options.include_usage)
  POST .../responses                  OpenAI Responses (JSON or SSE with every event type)
  POST .../completions, .../embeddings  legacy Completions, Embeddings
  POST .../messages                   Anthropic Messages (JSON or SSE, thinking when asked)
  POST .../models/M:generateContent   Gemini; :streamGenerateContent as SSE (?alt=sse) or JSON array
  POST /api/chat, /api/generate       Ollama native (NDJSON stream by default, JSON with stream=false)
  POST /model/M/converse[-stream]     Bedrock Converse (JSON or binary event stream)

The answer is deterministic: "Hello from <model>! You said: <last user text>". If the request offers
tools and does not yet carry a tool result, the model calls the first tool. A model named
"error-400" gets the provider's error body; "error-stream" (streams) gets an error mid-stream.

`app` serves `reply` as an ASGI app (hypercorn: TLS, HTTP/1.1 and h2); `FakeProvider` runs it on
127.0.0.1 in a thread with a given certificate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmspyd.llm.eventstream import encode_message

CREATED = 1_732_000_000  # fixed timestamps keep recordings reproducible
DELTA_CHARS = 6  # characters per streamed delta
REASONING = "The user wants a greeting. Keep it short."


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def _j(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _json_reply(obj: Any, status: int = 200, extra: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status, [("content-type", "application/json")] + (extra or []), [json.dumps(obj, indent=2).encode()])


def _sse(events: list[tuple[str | None, Any]]) -> list[bytes]:
    out = []
    for name, data in events:
        payload = data if isinstance(data, str) else _j(data)
        out.append(((f"event: {name}\n" if name else "") + f"data: {payload}\n\n").encode())
    return out


SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]


def _pieces(text: str) -> list[str]:
    return [text[i : i + DELTA_CHARS] for i in range(0, len(text), DELTA_CHARS)] or [""]


def _last_user_text(messages: Any) -> str:
    for m in reversed(messages if isinstance(messages, list) else []):
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        c = m.get("content")
        if isinstance(c, str):
            return c
        for part in c if isinstance(c, list) else []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                return part["text"]
    return ""


def answer_text(model: str, said: str) -> str:
    return f"Hello from {model}! You said: {said[:60]}"


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


# --- OpenAI -----------------------------------------------------------------------------------


def _openai_error(message: str, status: int = 400) -> Reply:
    return _json_reply(
        {"error": {"message": message, "type": "invalid_request_error", "param": "model", "code": "model_not_found"}},
        status,
    )


def _has_tool_result(messages: Any) -> bool:
    for m in messages if isinstance(messages, list) else []:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool" or m.get("type") in ("function_call_output",):
            return True
        for part in m.get("content") if isinstance(m.get("content"), list) else []:
            if isinstance(part, dict) and part.get("type") == "tool_result":
                return True
    return False


def _tool_name(tools: Any) -> str | None:
    for t in tools if isinstance(tools, list) else []:
        if isinstance(t, dict):
            return (t.get("function") or {}).get("name") or t.get("name")
    return None


def openai_chat(req: dict) -> Reply:
    model = str(req.get("model", ""))
    if model == "error-400":
        return _openai_error(f"The model `{model}` does not exist or you do not have access to it.", 404)
    messages = req.get("messages", [])
    prompt_tokens = sum(_tokens(json.dumps(m)) for m in messages)
    tool = None if _has_tool_result(messages) else _tool_name(req.get("tools"))
    text = answer_text(model, _last_user_text(messages))
    cid = "chatcmpl-AbC123fakeXyZ"
    fp = "fp_f85bea6784"
    if tool:
        call = {"id": "call_Qx7fake1", "type": "function", "function": {"name": tool, "arguments": '{"city":"Paris"}'}}
        message = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None, "annotations": []}
        finish, out_tokens = "tool_calls", 12
    else:
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        finish, out_tokens = "stop", _tokens(text)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": out_tokens,
        "total_tokens": prompt_tokens + out_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    if not req.get("stream"):
        return _json_reply(
            {
                "id": cid,
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": fp,
            }
        )
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> dict:
        c = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": fp,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            c["usage"] = None
        c.update(extra)
        return c

    events: list[tuple[str | None, Any]] = []
    if "reasoner" in model:  # DeepSeek-style reasoning_content deltas before the answer
        for p in _pieces(REASONING):
            events.append((None, chunk({"role": "assistant", "content": None, "reasoning_content": p})))
    if tool:
        events.append(
            (
                None,
                chunk(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": tool, "arguments": ""},
                            }
                        ],
                        "refusal": None,
                    }
                ),
            )
        )
        for p in ['{"', "city", '":"', "Paris", '"}']:
            events.append((None, chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})))
    else:
        events.append((None, chunk({"role": "assistant", "content": "", "refusal": None})))
        for i, p in enumerate(_pieces(text)):
            if model == "error-stream" and i == 2:
                events.append(
                    (
                        None,
                        {
                            "error": {
                                "message": "The server had an error while processing your request.",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        },
                    )
                )
                return Reply(200, SSE_HEADERS, _sse(events))
            events.append((None, chunk({"content": p})))
    events.append((None, chunk({}, finish)))
    if include_usage:
        events.append(
            (
                None,
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": CREATED,
                    "model": model,
                    "service_tier": "default",
                    "system_fingerprint": fp,
                    "choices": [],
                    "usage": usage,
                },
            )
        )
    events.append((None, "[DONE]"))
    return Reply(200, SSE_HEADERS, _sse(events))


def openai_completions(req: dict) -> Reply:
    model = str(req.get("model", ""))
    prompt = req.get("prompt", "")
    said = prompt if isinstance(prompt, str) else str(prompt[0]) if prompt else ""
    text = answer_text(model, said)
    usage = {
        "prompt_tokens": _tokens(said),
        "completion_tokens": _tokens(text),
        "total_tokens": _tokens(said) + _tokens(text),
    }
    cid = "cmpl-8fakeLegacy01"
    if not req.get("stream"):
        return _json_reply(
            {
                "id": cid,
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            }
        )
    events: list[tuple[str | None, Any]] = []
    for p in _pieces(text):
        events.append(
            (
                None,
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": CREATED,
                    "model": model,
                    "choices": [{"text": p, "index": 0, "logprobs": None, "finish_reason": None}],
                },
            )
        )
    events.append(
        (
            None,
            {
                "id": cid,
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}],
            },
        )
    )
    events.append((None, "[DONE]"))
    return Reply(200, SSE_HEADERS, _sse(events))


def openai_embeddings(req: dict) -> Reply:
    model = str(req.get("model", ""))
    inp = req.get("input")
    items = inp if isinstance(inp, list) else [inp]
    dims = int(req.get("dimensions") or 8)
    data = [
        {"object": "embedding", "index": i, "embedding": [round(0.001 * (i + 1) * (k + 1), 6) for k in range(dims)]}
        for i in range(len(items))
    ]
    n = sum(_tokens(str(x)) for x in items)
    return _json_reply(
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}}
    )


def openai_responses(req: dict) -> Reply:
    model = str(req.get("model", ""))
    if model == "error-400":
        return _openai_error(f"The requested model '{model}' does not exist.", 400)
    inp = req.get("input")
    said = inp if isinstance(inp, str) else _last_user_text(inp)
    tool = None if _has_tool_result(inp) else _tool_name(req.get("tools"))
    text = answer_text(model, said)
    rid = "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
    msg_id = "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b"
    fc_id = "fc_67ca09c6bedc8190a7abfec07b1a1332096610f474011cc0"
    in_tokens = _tokens(json.dumps(inp))
    out_tokens = 12 if tool else _tokens(text)
    base = {
        "id": rid,
        "object": "response",
        "created_at": CREATED,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": req.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": req.get("tools", []),
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": {},
    }
    if tool:
        item = {
            "id": fc_id,
            "type": "function_call",
            "status": "completed",
            "arguments": '{"city":"Paris"}',
            "call_id": "call_fake_resp_1",
            "name": tool,
        }
    else:
        item = {
            "id": msg_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
        }
    reasoning = None
    if isinstance(req.get("reasoning"), dict) and req["reasoning"].get("summary"):
        reasoning = {
            "id": "rs_6820f383d7c08191846711c5df8233bc0ac5ba57aafcbac7",
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": REASONING}],
        }
        base["reasoning"] = req["reasoning"]
    usage = {
        "input_tokens": in_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": out_tokens,
        "output_tokens_details": {"reasoning_tokens": 64 if reasoning else 0},
        "total_tokens": in_tokens + out_tokens,
    }
    done = dict(base, status="completed", output=([reasoning] if reasoning else []) + [item], usage=usage)
    if not req.get("stream"):
        return _json_reply(done)
    seq = iter(range(10_000))
    ev: list[tuple[str | None, Any]] = []

    def add(typ: str, **kw: Any) -> None:
        ev.append((typ, {"type": typ, "sequence_number": next(seq), **kw}))

    add("response.created", response=base)
    add("response.in_progress", response=base)
    oi = 0
    if reasoning:
        rid_ = reasoning["id"]
        add("response.output_item.added", output_index=0, item={"id": rid_, "type": "reasoning", "summary": []})
        add(
            "response.reasoning_summary_part.added",
            item_id=rid_,
            output_index=0,
            summary_index=0,
            part={"type": "summary_text", "text": ""},
        )
        for p in _pieces(REASONING):
            add("response.reasoning_summary_text.delta", item_id=rid_, output_index=0, summary_index=0, delta=p)
        add("response.reasoning_summary_text.done", item_id=rid_, output_index=0, summary_index=0, text=REASONING)
        add(
            "response.reasoning_summary_part.done",
            item_id=rid_,
            output_index=0,
            summary_index=0,
            part={"type": "summary_text", "text": REASONING},
        )
        add("response.output_item.done", output_index=0, item=reasoning)
        oi = 1
    if tool:
        add("response.output_item.added", output_index=oi, item=dict(item, status="in_progress", arguments=""))
        for p in ['{"', "city", '":"', "Paris", '"}']:
            add("response.function_call_arguments.delta", item_id=fc_id, output_index=oi, delta=p)
        add("response.function_call_arguments.done", item_id=fc_id, output_index=oi, arguments=item["arguments"])
        add("response.output_item.done", output_index=oi, item=item)
    else:
        add(
            "response.output_item.added",
            output_index=oi,
            item={"id": msg_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []},
        )
        add(
            "response.content_part.added",
            item_id=msg_id,
            output_index=oi,
            content_index=0,
            part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
        )
        for i, p in enumerate(_pieces(text)):
            if model == "error-stream" and i == 2:
                add(
                    "error", code="server_error", message="The server had an error processing your request.", param=None
                )
                return Reply(200, SSE_HEADERS, _sse(ev))
            add("response.output_text.delta", item_id=msg_id, output_index=oi, content_index=0, delta=p, logprobs=[])
        add("response.output_text.done", item_id=msg_id, output_index=oi, content_index=0, text=text, logprobs=[])
        add("response.content_part.done", item_id=msg_id, output_index=oi, content_index=0, part=item["content"][0])
        add("response.output_item.done", output_index=oi, item=item)
    add("response.completed", response=done)
    return Reply(200, SSE_HEADERS, _sse(ev))


# --- Anthropic --------------------------------------------------------------------------------


def anthropic_messages(req: dict) -> Reply:
    model = str(req.get("model", ""))
    extra = [("request-id", "req_011CQfakeAnthropic01"), ("anthropic-organization-id", "org-fake")]
    if model == "error-400":
        return _json_reply(
            {
                "type": "error",
                "error": {"type": "not_found_error", "message": f"model: {model}"},
                "request_id": "req_011CQfakeAnthropic01",
            },
            404,
            extra,
        )
    messages = req.get("messages", [])
    tool = None if _has_tool_result(messages) else _tool_name(req.get("tools"))
    text = answer_text(model, _last_user_text(messages))
    thinking = "The user greets me. I should answer briefly." if isinstance(req.get("thinking"), dict) else None
    mid = "msg_01XFDUDYJgAACzvnptvVoYEL"
    in_tokens = _tokens(json.dumps(messages)) + _tokens(json.dumps(req.get("system", "")))
    usage_in = {
        "input_tokens": in_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
        "service_tier": "standard",
    }
    content: list[dict] = []
    if thinking:
        content.append(
            {
                "type": "thinking",
                "thinking": thinking,
                "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds",
            }
        )
    if tool:
        content.append({"type": "text", "text": "I'll check the weather."})
        content.append(
            {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": tool, "input": {"city": "Paris"}}
        )
        stop = "tool_use"
    else:
        content.append({"type": "text", "text": text})
        stop = "end_turn"
    out_tokens = sum(_tokens(json.dumps(c)) for c in content)
    if not req.get("stream"):
        return _json_reply(
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": dict(usage_in, output_tokens=out_tokens),
            },
            200,
            extra,
        )
    ev: list[tuple[str | None, Any]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": usage_in,
                },
            },
        )
    ]
    for i, block in enumerate(content):
        bt = block["type"]
        if bt == "thinking":
            ev.append(
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                    },
                )
            )
            for p in _pieces(block["thinking"]):
                ev.append(
                    (
                        "content_block_delta",
                        {"type": "content_block_delta", "index": i, "delta": {"type": "thinking_delta", "thinking": p}},
                    )
                )
            ev.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": i,
                        "delta": {"type": "signature_delta", "signature": block["signature"]},
                    },
                )
            )
        elif bt == "text":
            ev.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
                )
            )
            if i == 0:
                ev.append(("ping", {"type": "ping"}))
            for k, p in enumerate(_pieces(block["text"])):
                if model == "error-stream" and k == 2:
                    ev.append(
                        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
                    )
                    return Reply(200, SSE_HEADERS + extra, _sse(ev))
                ev.append(
                    (
                        "content_block_delta",
                        {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": p}},
                    )
                )
        else:
            ev.append(
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}},
                    },
                )
            )
            for p in ["", '{"city": ', '"Paris"}']:
                ev.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": p},
                        },
                    )
                )
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    ev.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": out_tokens},
            },
        )
    )
    ev.append(("message_stop", {"type": "message_stop"}))
    return Reply(200, SSE_HEADERS + extra, _sse(ev))


# --- Gemini -----------------------------------------------------------------------------------


def gemini(model: str, method: str, query: dict[str, str], req: dict) -> Reply:
    if model == "error-400":
        return _json_reply(
            {
                "error": {
                    "code": 404,
                    "message": f"models/{model} is not found for API version v1beta.",
                    "status": "NOT_FOUND",
                }
            },
            404,
        )
    contents = req.get("contents", [])
    said = ""
    for c in reversed(contents if isinstance(contents, list) else []):
        parts = [p.get("text") for p in c.get("parts", []) if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if c.get("role", "user") == "user" and parts:
            said = parts[0]
            break
    has_result = any("functionResponse" in p for c in contents for p in c.get("parts", []) if isinstance(p, dict))
    tools = [fd for t in req.get("tools", []) for fd in t.get("functionDeclarations", [])]
    text = answer_text(model, said)
    prompt_tokens = _tokens(json.dumps(contents))
    version = model
    rid = "0oUgZ_fakeGeminiRespId"
    if tools and not has_result:
        parts_all = [[{"functionCall": {"name": tools[0]["name"], "args": {"city": "Paris"}}}]]
        finish_parts = 1
    else:
        parts_all = [[{"text": p}] for p in _pieces(text)] if method == "streamGenerateContent" else [[{"text": text}]]
        if ((req.get("generationConfig") or {}).get("thinkingConfig") or {}).get("includeThoughts"):
            parts_all.insert(0, [{"text": REASONING, "thought": True}])
        finish_parts = len(parts_all)
    out_tokens = _tokens(text)
    usage = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": out_tokens,
        "totalTokenCount": prompt_tokens + out_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
    }
    elements = []
    for i, parts in enumerate(parts_all):
        last = i == finish_parts - 1
        cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if last:
            cand["finishReason"] = "STOP"
        el: dict[str, Any] = {"candidates": [cand]}
        el["usageMetadata"] = usage if last else {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
        el["modelVersion"] = version
        el["responseId"] = rid
        elements.append(el)
    if method == "generateContent":
        return _json_reply(elements[0])
    if query.get("alt") == "sse":
        return Reply(200, SSE_HEADERS, [f"data: {_j(e)}\r\n\r\n".encode() for e in elements])
    # default: one JSON array, elements flushed as they come ("[{...}\n,\r\n{...}\n]")
    chunks = []
    for i, e in enumerate(elements):
        chunks.append((("[" if i == 0 else "\r\n,") + json.dumps(e, indent=2)).encode())
    chunks.append(b"\r\n]")
    return Reply(200, [("content-type", "application/json; charset=UTF-8")], chunks)


# --- Ollama -----------------------------------------------------------------------------------


def ollama(api: str, req: dict) -> Reply:
    model = str(req.get("model", ""))
    if model == "error-400":
        return _json_reply({"error": f"model '{model}' not found"}, 404)
    said = _last_user_text(req.get("messages")) if api == "chat" else str(req.get("prompt", ""))
    tool = None if api != "chat" or _has_tool_result(req.get("messages")) else _tool_name(req.get("tools"))
    text = answer_text(model, said)
    created = "2024-11-19T08:53:20.123456789Z"
    final = {
        "done": True,
        "done_reason": "stop",
        "total_duration": 4883583458,
        "load_duration": 1334875,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 342546000,
        "eval_count": _tokens(text),
        "eval_duration": 4535599000,
    }

    def line(content: str, done: bool, tool_calls: list | None = None) -> dict:
        if api == "chat":
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if tool_calls:
                msg["tool_calls"] = tool_calls
            d = {"model": model, "created_at": created, "message": msg, "done": done}
        else:
            d = {"model": model, "created_at": created, "response": content, "done": done}
        if done:
            d.update(final)
            if api == "generate":
                d["context"] = [1, 2, 3]
        return d

    calls = [{"function": {"name": tool, "arguments": {"city": "Paris"}}}] if tool else None
    stream = req.get("stream", True) is not False
    if not stream:
        return _json_reply(line("" if tool else text, True, calls))
    lines = [line("", False, calls)] if tool else [line(p, False) for p in _pieces(text)]
    lines.append(line("", True))
    return Reply(200, [("content-type", "application/x-ndjson")], [(_j(x) + "\n").encode() for x in lines])


# --- Bedrock ----------------------------------------------------------------------------------


def bedrock(model_id: str, op: str, req: dict) -> Reply:
    extra = [("x-amzn-requestid", "5d7fd7a8-0a1e-4a8c-9a1f-fakebedrock01")]
    if model_id == "error-400":
        return _json_reply(
            {"message": "The provided model identifier is invalid."},
            400,
            extra + [("x-amzn-errortype", "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/")],
        )
    said = ""
    for m in reversed(req.get("messages", [])):
        texts = [b["text"] for b in m.get("content", []) if isinstance(b, dict) and "text" in b]
        if m.get("role") == "user" and texts:
            said = texts[0]
            break
    text = answer_text(model_id, said)
    usage = {"inputTokens": _tokens(json.dumps(req.get("messages"))), "outputTokens": _tokens(text)}
    usage["totalTokens"] = usage["inputTokens"] + usage["outputTokens"]
    if op == "converse":
        return _json_reply(
            {
                "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": "end_turn",
                "usage": usage,
                "metrics": {"latencyMs": 412},
            },
            200,
            extra,
        )
    if op == "converse-stream":
        msgs: list[tuple[str, dict]] = [("messageStart", {"role": "assistant"})]
        tools = (req.get("toolConfig") or {}).get("tools") or []
        has_result = any("toolResult" in b for m in req.get("messages", []) for b in m.get("content", []))
        stop = "end_turn"
        if tools and not has_result:
            name = tools[0]["toolSpec"]["name"]
            msgs.append(
                (
                    "contentBlockStart",
                    {
                        "contentBlockIndex": 0,
                        "start": {"toolUse": {"toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "name": name}},
                    },
                )
            )
            for p in ['{"city"', ': "Paris"}']:
                msgs.append(("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": p}}}))
            stop = "tool_use"
        else:
            for i, p in enumerate(_pieces(text)):
                if model_id == "error-stream" and i == 2:  # AWS exception frame mid-stream, then the stream ends
                    chunks = [
                        encode_message(
                            {":event-type": et, ":content-type": "application/json", ":message-type": "event"},
                            _j(body).encode(),
                        )
                        for et, body in msgs
                    ]
                    chunks.append(
                        encode_message(
                            {
                                ":exception-type": "throttlingException",
                                ":content-type": "application/json",
                                ":message-type": "exception",
                            },
                            b'{"message":"Too many requests, please wait before trying again."}',
                        )
                    )
                    return Reply(200, [("content-type", "application/vnd.amazon.eventstream")] + extra, chunks)
                msgs.append(("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": p}}))
        msgs += [
            ("contentBlockStop", {"contentBlockIndex": 0}),
            ("messageStop", {"stopReason": stop}),
            ("metadata", {"usage": usage, "metrics": {"latencyMs": 389}}),
        ]
        chunks = [
            encode_message(
                {":event-type": et, ":content-type": "application/json", ":message-type": "event"},
                _j(dict(body, p="abcdefghijklmnopqrstuvwxyzABCDEF"[: 3 + i % 20])).encode(),
            )
            for i, (et, body) in enumerate(msgs)
        ]
        return Reply(200, [("content-type", "application/vnd.amazon.eventstream")] + extra, chunks)
    if op == "invoke-with-response-stream":  # Claude on Bedrock: Anthropic events wrapped in base64 chunks
        inner = anthropic_messages(dict(req, model=model_id, stream=True))
        chunks = []
        for piece in inner.chunks:
            data = [ln[6:] for ln in piece.decode().splitlines() if ln.startswith("data: ")][0]
            obj = json.loads(data)
            if obj.get("type") == "ping":
                continue
            if obj.get("type") == "message_stop":
                obj["amazon-bedrock-invocationMetrics"] = {
                    "inputTokenCount": usage["inputTokens"],
                    "outputTokenCount": usage["outputTokens"],
                    "invocationLatency": 1203,
                    "firstByteLatency": 402,
                }
            payload = _j({"bytes": base64.b64encode(_j(obj).encode()).decode(), "p": "abcd"}).encode()
            chunks.append(
                encode_message(
                    {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload
                )
            )
        return Reply(
            200,
            [
                ("content-type", "application/vnd.amazon.eventstream"),
                ("x-amzn-bedrock-content-type", "application/json"),
            ]
            + extra,
            chunks,
        )
    if op == "invoke":
        r = anthropic_messages(dict(req, model=model_id, stream=False))
        return Reply(r.status, [("content-type", "application/json")] + extra, r.chunks)
    return _json_reply({"message": f"unknown operation {op}"}, 404)


# --- routing ----------------------------------------------------------------------------------

_GEMINI = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent)$")
_BEDROCK = re.compile(r"/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$")


def reply(method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes) -> Reply:
    if method != "POST":
        if path.rstrip("/").endswith("/models"):
            return _json_reply(
                {
                    "object": "list",
                    "data": [{"id": "gpt-4o-mini", "object": "model", "created": CREATED, "owned_by": "system"}],
                }
            )
        return Reply(404, [("content-type", "text/plain")], [b"not found"])
    try:
        req = json.loads(body) if body else {}
    except ValueError:
        return _openai_error("We could not parse the JSON body of your request.", 400)
    q = dict(urllib.parse.parse_qsl(query))
    p = path.rstrip("/")
    m = _BEDROCK.search(p)
    if m:
        return bedrock(urllib.parse.unquote(m.group(1)), m.group(2), req)
    m = _GEMINI.search(p)
    if m:
        return gemini(m.group(1), m.group(2), q, req)
    if p.endswith("/api/chat"):
        return ollama("chat", req)
    if p.endswith("/api/generate"):
        return ollama("generate", req)
    if p.endswith("/chat/completions"):
        return openai_chat(req)
    if p.endswith("/responses"):
        return openai_responses(req)
    if p.endswith("/completions"):
        return openai_completions(req)
    if p.endswith("/embeddings"):
        return openai_embeddings(req)
    if p.endswith("/messages"):
        return anthropic_messages(req)
    return Reply(404, [("content-type", "application/json")], [b'{"error":"no such route"}'])


# --- ASGI app and server ----------------------------------------------------------------------

# Pause between streamed pieces so that clients see (and captures record) them as separate reads.
STREAM_PAUSE_S = 0.002


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = bytearray()
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
    r = reply(scope["method"], scope["path"], scope["query_string"].decode("latin-1"), headers, bytes(body))
    await send(
        {"type": "http.response.start", "status": r.status, "headers": [(k.encode(), v.encode()) for k, v in r.headers]}
    )
    for i, chunk in enumerate(r.chunks):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if len(r.chunks) > 1 and i < len(r.chunks) - 1:
            await asyncio.sleep(STREAM_PAUSE_S)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeProvider:
    """Serve `app` over TLS (ALPN h2 and http/1.1) on 127.0.0.1 in a background thread.

    with FakeProvider(cert, key) as fp:  client(base_url=fp.url + "/v1") ...
    """

    def __init__(
        self, certfile: str | Path, keyfile: str | Path, port: int = 0, alpn: tuple[str, ...] = ("h2", "http/1.1")
    ) -> None:
        self.certfile, self.keyfile = str(certfile), str(keyfile)
        self.port = port or _free_port()
        self.alpn = list(alpn)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> FakeProvider:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        cfg = Config()
        cfg.bind = [f"127.0.0.1:{self.port}"]
        cfg.certfile, cfg.keyfile = self.certfile, self.keyfile
        cfg.alpn_protocols = self.alpn
        cfg.accesslog = None
        cfg.errorlog = None
        cfg.loglevel = "WARNING"
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._stop = asyncio.Event()
            ready.set()
            try:
                loop.run_until_complete(serve(app, cfg, shutdown_trigger=self._stop.wait))  # type: ignore[arg-type]
            except BaseException as e:  # noqa: BLE001 - reported by start()/stop()
                self._error = e
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fakeprovider", daemon=True)
        self._thread.start()
        ready.wait(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._error:
                raise RuntimeError(f"fake provider failed: {self._error!r}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"fake provider did not listen on {self.port}")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or self._stop is None or thread is None:
            return
        loop.call_soon_threadsafe(self._stop.set)
        thread.join(1.0)
        if thread.is_alive():  # hypercorn waits for idle keep-alive clients: cut them

            def cancel_all() -> None:
                for task in asyncio.all_tasks(loop):
                    task.cancel()

            try:
                loop.call_soon_threadsafe(cancel_all)
            except RuntimeError:  # loop closed meanwhile
                pass
            thread.join(5)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_subprocess(
    certfile: str | Path, keyfile: str | Path, port: int = 0, timeout: float = 20.0
) -> tuple[subprocess.Popen, str]:
    """Run the fake provider in its own process (e.g. to trace it, or keep it out of pytest's GIL)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakeprovider", str(certfile), str(keyfile), str(port)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready: list[str] = []
    t = threading.Thread(target=lambda: ready.append(proc.stdout.readline().strip()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    if not ready or not ready[0].startswith("https://"):
        proc.kill()
        raise RuntimeError(f"fake provider subprocess did not start: {ready}")
    return proc, ready[0]


def main() -> None:
    """python -m tests.fakeprovider CERT KEY [PORT]: serve in the foreground (for manual tests and subprocesses)."""
    fp = FakeProvider(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0).start()
    print(fp.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fp.stop()


if __name__ == "__main__":
    main()
