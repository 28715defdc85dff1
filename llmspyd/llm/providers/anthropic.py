"""Anthropic Messages API (also what Bedrock InvokeModel and Vertex rawPredict carry for Claude)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmspyd.llm.providers.base import (
    ApiFormat,
    ParsedRequest,
    ResponseAcc,
    args_json,
    d,
    lst,
    params_of,
    s,
    text_of,
)
from llmspyd.llm.record import Message, Tool, ToolCall


def _usage(u: Any, acc: ResponseAcc) -> None:
    u = d(u)
    if u:
        acc.set_usage(
            input_tokens=u.get("input_tokens"),
            output_tokens=u.get("output_tokens"),
            cache_read_tokens=u.get("cache_read_input_tokens"),
            cache_write_tokens=u.get("cache_creation_input_tokens"),
        )


def _error(obj: dict, acc: ResponseAcc, kind: str) -> bool:
    if obj.get("type") != "error" and "error" not in obj:
        return False
    err = obj.get("error")
    if isinstance(err, dict):
        acc.set_error(kind, err.get("message", ""), err.get("type"))
    else:
        acc.set_error(kind, err if err is not None else obj)
    return True


class Messages(ApiFormat):
    api = "messages"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(model=s(body.get("model")), parameters=params_of(body))
        if isinstance(body.get("stream"), bool):
            req.stream = body["stream"]
        req.system = text_of(body.get("system")) if body.get("system") is not None else None
        for t in lst(body.get("tools")):
            t = d(t)
            req.tools.append(
                Tool(
                    name=s(t.get("name")) or s(t.get("type")) or "",
                    description=s(t.get("description")),
                    parameters=t.get("input_schema"),
                    type=s(t.get("type")) or "function",
                )
            )
        for m in lst(body.get("messages")):
            m = d(m)
            role = s(m.get("role")) or "?"
            content = m.get("content")
            if isinstance(content, str):
                req.messages.append(Message(role=role, content=content))
                continue
            texts: list[str] = []
            thinking: list[str] = []
            calls: list[ToolCall] = []
            for block in lst(content):
                block = d(block)
                typ = block.get("type")
                if typ == "text":
                    texts.append(s(block.get("text")) or "")
                elif typ in ("thinking", "redacted_thinking"):
                    thinking.append(s(block.get("thinking")) or "[redacted_thinking]")
                elif typ in ("tool_use", "server_tool_use"):
                    calls.append(
                        ToolCall(
                            id=s(block.get("id")),
                            name=s(block.get("name")) or "",
                            arguments=args_json(block.get("input")),
                        )
                    )
                elif typ == "tool_result":
                    tid = s(block.get("tool_use_id"))
                    if tid:
                        req.tool_result_ids.append(tid)
                    req.messages.append(Message(role="tool", tool_call_id=tid, content=text_of(block.get("content"))))
                else:
                    texts.append(f"[{typ}]")
            if texts or thinking or calls or not content:
                req.messages.append(
                    Message(
                        role=role,
                        content="\n".join(texts) if texts else None,
                        tool_calls=calls,
                        thinking="\n".join(thinking) if thinking else None,
                    )
                )
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        body = d(body)
        if _error(body, acc, "http_error"):
            return
        acc.response_id = s(body.get("id"))
        acc.model = s(body.get("model"))
        for i, block in enumerate(lst(body.get("content"))):
            block = d(block)
            typ = block.get("type")
            if typ == "text":
                acc.add_text(block.get("text"))
            elif typ == "thinking":
                acc.add_thinking(block.get("thinking"))
            elif typ in ("tool_use", "server_tool_use"):
                t = acc.tool(i)
                t.id, t.name, t.final_args = (
                    s(block.get("id")),
                    s(block.get("name")) or "",
                    args_json(block.get("input")),
                )
        acc.finish_reason = s(body.get("stop_reason"))
        _usage(body.get("usage"), acc)
        acc.done = True

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        typ = s(obj.get("type")) or event or ""
        if typ == "content_block_delta":
            delta = d(obj.get("delta"))
            dt = delta.get("type")
            idx = obj.get("index", 0)
            if dt == "text_delta":
                acc.add_text(delta.get("text"), ts_ns)
            elif dt == "thinking_delta":
                acc.add_thinking(delta.get("thinking"), ts_ns)
            elif dt == "input_json_delta":
                acc.add_tool_args(idx, delta.get("partial_json"), ts_ns)
            # signature_delta and citations_delta carry no text
        elif typ == "content_block_start":
            block = d(obj.get("content_block"))
            idx = obj.get("index", 0)
            bt = block.get("type")
            if bt in ("tool_use", "server_tool_use"):
                t = acc.tool(idx)
                t.id, t.name = s(block.get("id")), s(block.get("name")) or ""
                inp = block.get("input")
                if inp:  # normally {} and filled by input_json_delta
                    t.args.append(args_json(inp))
                acc.token(ts_ns)
            elif bt == "text":
                acc.add_text(block.get("text"), ts_ns)
            elif bt == "thinking":
                acc.add_thinking(block.get("thinking"), ts_ns)
        elif typ == "message_start":
            msg = d(obj.get("message"))
            acc.response_id = s(msg.get("id"))
            acc.model = s(msg.get("model"))
            _usage(msg.get("usage"), acc)
        elif typ == "message_delta":
            acc.finish_reason = s(d(obj.get("delta")).get("stop_reason")) or acc.finish_reason
            _usage(obj.get("usage"), acc)
        elif typ == "message_stop":
            acc.done = True
            # Bedrock InvokeModelWithResponseStream appends its own token counts here
            metrics = d(obj.get("amazon-bedrock-invocationMetrics"))
            if metrics:
                acc.set_usage(
                    input_tokens=metrics.get("inputTokenCount"), output_tokens=metrics.get("outputTokenCount")
                )
        elif typ == "error":
            _error(obj, acc, "stream_error")


def is_anthropic_body(body: dict, headers: Sequence[tuple[str, str]] = ()) -> bool:
    """A messages-shaped body in Anthropic's dialect rather than OpenAI's (for proxies on unknown paths)."""
    if any(k == "anthropic-version" for k, _ in headers) or "anthropic_version" in body:
        return True
    if isinstance(body.get("system"), (str, list)) or isinstance(body.get("thinking"), dict):
        return True
    for m in lst(body.get("messages")):
        for b in lst(d(m).get("content")):
            if d(b).get("type") in ("tool_use", "tool_result", "thinking"):
                return True
    return False
