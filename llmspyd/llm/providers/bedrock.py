"""AWS Bedrock runtime: Converse / ConverseStream and InvokeModel(WithResponseStream).

Paths are /model/{modelId}/converse, /converse-stream, /invoke and
/invoke-with-response-stream. Streams use the binary event-stream framing
(llm/eventstream.py). ConverseStream messages carry the event body directly
(:event-type messageStart, contentBlockDelta, ...); InvokeModel streams carry
`{"bytes": base64(model-native JSON)}` in "chunk" events, so the payload is
unwrapped and handed to the model family's own format (Claude speaks the
Anthropic Messages format there).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from llmspyd.llm.providers.base import ApiFormat, ParsedRequest, ResponseAcc, args_json, d, lst, params_of, s
from llmspyd.llm.record import Message, Tool, ToolCall


def _blocks(content: Any) -> tuple[str | None, str | None, list[ToolCall], list[tuple[str | None, str | None]]]:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    results: list[tuple[str | None, str | None]] = []
    for b in lst(content):
        b = d(b)
        if isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif "toolUse" in b:
            tu = d(b["toolUse"])
            calls.append(
                ToolCall(id=s(tu.get("toolUseId")), name=s(tu.get("name")) or "", arguments=args_json(tu.get("input")))
            )
        elif "toolResult" in b:
            tr = d(b["toolResult"])
            parts = [s(d(c).get("text")) or args_json(d(c).get("json")) for c in lst(tr.get("content"))]
            results.append((s(tr.get("toolUseId")), "\n".join(p for p in parts if p) or None))
        elif "reasoningContent" in b:
            rt = d(d(b["reasoningContent"]).get("reasoningText"))
            thinking.append(s(rt.get("text")) or "")
        else:
            texts.append("[" + next(iter(b), "block") + "]")
    return ("\n".join(texts) if texts else None, "\n".join(thinking) if thinking else None, calls, results)


class Converse(ApiFormat):
    def __init__(self, api: str = "bedrock.converse") -> None:
        self.api = api

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(parameters=params_of(body), stream=self.api.endswith("Stream"))
        sys_texts = [s(d(b).get("text")) for b in lst(body.get("system"))]
        req.system = "\n\n".join(t for t in sys_texts if t) or None
        for t in lst(d(body.get("toolConfig")).get("tools")):
            spec = d(d(t).get("toolSpec"))
            if spec:
                req.tools.append(
                    Tool(
                        name=s(spec.get("name")) or "",
                        description=s(spec.get("description")),
                        parameters=d(spec.get("inputSchema")).get("json"),
                    )
                )
        for m in lst(body.get("messages")):
            m = d(m)
            text, thinking, calls, results = _blocks(m.get("content"))
            for rid, content in results:
                req.messages.append(Message(role="tool", tool_call_id=rid, content=content))
                if rid:
                    req.tool_result_ids.append(rid)
            if text is not None or calls or thinking or not results:
                req.messages.append(
                    Message(role=s(m.get("role")) or "?", content=text, tool_calls=calls, thinking=thinking)
                )
        return req

    def _usage(self, u: Any, acc: ResponseAcc) -> None:
        u = d(u)
        acc.set_usage(
            input_tokens=u.get("inputTokens"),
            output_tokens=u.get("outputTokens"),
            total_tokens=u.get("totalTokens"),
            cache_read_tokens=u.get("cacheReadInputTokens"),
            cache_write_tokens=u.get("cacheWriteInputTokens"),
        )

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        body = d(body)
        if "message" in body and "output" not in body:  # error shape: {"message": "..."}
            acc.set_error("http_error", body.get("message"))
            return
        msg = d(d(body.get("output")).get("message"))
        text, thinking, calls, _ = _blocks(msg.get("content"))
        acc.add_thinking(thinking)
        acc.add_text(text)
        for i, tc in enumerate(calls):
            t = acc.tool(i)
            t.id, t.name, t.final_args = tc.id, tc.name, tc.arguments
        acc.finish_reason = s(body.get("stopReason"))
        self._usage(body.get("usage"), acc)
        acc.done = True

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        if not event and len(obj) == 1:  # SDK-style {"contentBlockDelta": {...}} (proxies re-framing the stream)
            event, obj = next(iter(obj)), d(next(iter(obj.values())))
        if event == "contentBlockDelta":
            delta = d(obj.get("delta"))
            idx = obj.get("contentBlockIndex", 0)
            if "text" in delta:
                acc.add_text(delta.get("text"), ts_ns)
            elif "toolUse" in delta:
                acc.add_tool_args(idx, d(delta["toolUse"]).get("input"), ts_ns)
            elif "reasoningContent" in delta:
                acc.add_thinking(d(delta["reasoningContent"]).get("text"), ts_ns)
        elif event == "contentBlockStart":
            tu = d(d(obj.get("start")).get("toolUse"))
            if tu:
                t = acc.tool(obj.get("contentBlockIndex", 0))
                t.id, t.name = s(tu.get("toolUseId")), s(tu.get("name")) or ""
                acc.token(ts_ns)
        elif event == "messageStop":
            acc.finish_reason = s(obj.get("stopReason"))
        elif event == "metadata":
            self._usage(obj.get("usage"), acc)
            acc.done = True


CONVERSE_EVENTS = frozenset(
    {"messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop", "messageStop", "metadata"}
)


class _InnerGeneric(ApiFormat):
    """Non-Claude InvokeModel bodies (Titan, Llama, Mistral, Cohere, Nova): pick the text fields they use."""

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(parameters=params_of(body, ("textGenerationConfig", "max_gen_len", "temperature")))
        if "messages" in body:  # Nova / Llama-chat style: same blocks as Converse
            return Converse().parse_request(body)
        prompt = body.get("inputText", body.get("prompt"))
        if prompt is not None:
            req.messages.append(Message(role="user", content=prompt if isinstance(prompt, str) else args_json(prompt)))
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        self.on_event(body, None, acc, None)
        acc.done = True

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        for r in lst(obj.get("results")) or [obj]:  # Titan non-streamed: results[]
            r = d(r)
            acc.add_text(r.get("outputText"), ts_ns)
            if s(r.get("completionReason")):
                acc.finish_reason = r["completionReason"]
        acc.add_text(obj.get("generation"), ts_ns)  # Llama
        for o in lst(obj.get("outputs")):  # Mistral
            acc.add_text(d(o).get("text"), ts_ns)
            acc.finish_reason = s(d(o).get("stop_reason")) or acc.finish_reason
        acc.add_text(s(obj.get("text")) if "generations" not in obj else None, ts_ns)
        for k in CONVERSE_EVENTS & obj.keys():  # Nova streams Converse-shaped events keyed by their type
            Converse().on_event(obj[k], k, acc, ts_ns)
        acc.finish_reason = s(obj.get("stop_reason")) or acc.finish_reason
        acc.set_usage(
            input_tokens=obj.get("prompt_token_count", obj.get("inputTextTokenCount")),
            output_tokens=obj.get("generation_token_count", obj.get("totalOutputTextTokenCount")),
        )
        metrics = d(obj.get("amazon-bedrock-invocationMetrics"))
        if metrics:
            acc.set_usage(input_tokens=metrics.get("inputTokenCount"), output_tokens=metrics.get("outputTokenCount"))
            acc.done = True


class Invoke(ApiFormat):
    """InvokeModel: the body is the model family's own format; `inner` is chosen from the model id."""

    def __init__(self, inner: ApiFormat, api: str = "bedrock.invoke") -> None:
        self.inner = inner
        self.api = api

    def parse_request(self, body: Any) -> ParsedRequest:
        req = self.inner.parse_request(body)
        req.stream = self.api.endswith("Stream")
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        self.inner.parse_response(body, acc)

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        b64 = d(obj).get("bytes")
        if event != "chunk" or not isinstance(b64, str):
            return
        try:
            inner = json.loads(base64.b64decode(b64, validate=True))
        except ValueError:
            acc.bad_events += 1
            return
        self.inner.on_event(inner, None, acc, ts_ns)


def inner_format(model_id: str, body: Any) -> ApiFormat:
    from llmspyd.llm.providers.anthropic import Messages

    if "anthropic." in model_id or "anthropic_version" in d(body):
        return Messages()
    return _InnerGeneric()
