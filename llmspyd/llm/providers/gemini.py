"""Google Gemini generateContent / streamGenerateContent (AI Studio and Vertex AI).

Streamed either as SSE (`?alt=sse`, one GenerateContentResponse per data
line) or, by default, as one JSON array whose elements arrive over time.
Every element has the shape of a whole response; text parts are deltas.
"""

from __future__ import annotations

from typing import Any

from llmspyd.llm.providers.base import ApiFormat, ParsedRequest, ResponseAcc, args_json, d, lst, params_of, s
from llmspyd.llm.record import Message, Tool, ToolCall


def _parts_text(parts: Any) -> tuple[str | None, str | None, list[ToolCall], list[tuple[str | None, str]]]:
    """(text, thought text, function calls, function responses as (id, name)) of a parts list."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    responses: list[tuple[str | None, str]] = []
    for p in lst(parts):
        p = d(p)
        if isinstance(p.get("text"), str):
            (thoughts if p.get("thought") is True else texts).append(p["text"])
        elif "functionCall" in p:
            fc = d(p["functionCall"])
            calls.append(
                ToolCall(id=s(fc.get("id")), name=s(fc.get("name")) or "", arguments=args_json(fc.get("args")))
            )
        elif "functionResponse" in p:
            fr = d(p["functionResponse"])
            responses.append((s(fr.get("id")), args_json(fr.get("response"))))
        else:
            texts.append("[" + next(iter(p), "part") + "]")
    return ("".join(texts) if texts else None, "".join(thoughts) if thoughts else None, calls, responses)


class GenerateContent(ApiFormat):
    def __init__(self, api: str = "generateContent") -> None:
        self.api = api

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        model = s(body.get("model"))
        if "contents" not in body and isinstance(body.get("request"), dict):
            body = body["request"]  # Code Assist wraps the request: {model, project, user_prompt_id, request}
        req = ParsedRequest(model=model, parameters=params_of(body))
        sysi = body.get("systemInstruction", body.get("system_instruction"))
        if sysi is not None:
            req.system = _parts_text(d(sysi).get("parts"))[0] if isinstance(sysi, dict) else s(sysi)
        for t in lst(body.get("tools")):
            t = d(t)
            for fd in lst(t.get("functionDeclarations", t.get("function_declarations"))):
                fd = d(fd)
                req.tools.append(
                    Tool(
                        name=s(fd.get("name")) or "",
                        description=s(fd.get("description")),
                        parameters=fd.get("parameters") or fd.get("parametersJsonSchema"),
                    )
                )
            for k in t:
                if k not in ("functionDeclarations", "function_declarations"):
                    req.tools.append(Tool(name=k, type=k))
        for c in lst(body.get("contents")):
            c = d(c)
            role = s(c.get("role")) or "user"
            text, thought, calls, responses = _parts_text(c.get("parts"))
            for rid, content in responses:
                req.messages.append(Message(role="tool", tool_call_id=rid, content=content))
                if rid:
                    req.tool_result_ids.append(rid)
            if text is not None or calls or thought or not responses:
                req.messages.append(Message(role=role, content=text, tool_calls=calls, thinking=thought))
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        if isinstance(body, list):  # non-streamed body of streamGenerateContent: the whole array at once
            for el in body:
                self.on_event(el, None, acc, None)
        else:
            self.on_event(body, None, acc, None)
        acc.done = acc.error is None

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        if "candidates" not in obj and isinstance(obj.get("response"), dict):
            obj = obj["response"]  # Code Assist wraps each response: {response, traceId}
        err = obj.get("error")
        if isinstance(err, dict):
            acc.set_error(
                "stream_error" if ts_ns is not None else "http_error",
                err.get("message", ""),
                err.get("status"),
                err.get("code"),
            )
            return
        acc.response_id = acc.response_id or s(obj.get("responseId"))
        acc.model = acc.model or s(obj.get("modelVersion"))
        for cand in lst(obj.get("candidates"))[:1]:
            cand = d(cand)
            text, thought, calls, _ = _parts_text(d(cand.get("content")).get("parts"))
            acc.add_thinking(thought, ts_ns)
            acc.add_text(text, ts_ns)
            for tc in calls:
                t = acc.tool(len(acc.tool_calls))
                t.id, t.name, t.final_args = tc.id, tc.name, tc.arguments
                acc.token(ts_ns)
            if s(cand.get("finishReason")):
                acc.finish_reason = cand["finishReason"]
        fb = d(obj.get("promptFeedback"))
        if s(fb.get("blockReason")):
            acc.finish_reason = fb["blockReason"]
        u = d(obj.get("usageMetadata"))
        if u:
            acc.set_usage(
                input_tokens=u.get("promptTokenCount"),
                output_tokens=u.get("candidatesTokenCount"),
                total_tokens=u.get("totalTokenCount"),
                cache_read_tokens=u.get("cachedContentTokenCount"),
                reasoning_tokens=u.get("thoughtsTokenCount"),
            )
            if acc.finish_reason:
                acc.done = True


class EmbedContent(ApiFormat):
    api = "embedContent"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(model=s(body.get("model")), stream=False)
        reqs = lst(body.get("requests")) or [body]
        for r in reqs:
            text = _parts_text(d(d(r).get("content")).get("parts"))[0]
            req.messages.append(Message(role="input", content=text))
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        body = d(body)
        if isinstance(body.get("error"), dict):
            acc.set_error(
                "http_error", body["error"].get("message", ""), body["error"].get("status"), body["error"].get("code")
            )
            return
        embs = lst(body.get("embeddings")) or ([body["embedding"]] if "embedding" in body else [])
        acc.embeddings = len(embs)
        if embs:
            acc.dimensions = len(lst(d(embs[0]).get("values"))) or None
        acc.done = True
