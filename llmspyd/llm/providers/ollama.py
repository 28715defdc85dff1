"""Ollama's native API: /api/chat and /api/generate (NDJSON streams, streaming by default), /api/embed."""

from __future__ import annotations

from typing import Any

from llmspyd.llm.providers.base import ApiFormat, ParsedRequest, ResponseAcc, args_json, d, lst, params_of, s
from llmspyd.llm.record import Message, Tool, ToolCall


def _common(obj: dict, acc: ResponseAcc, ts_ns: int | None) -> bool:
    err = obj.get("error")
    if err is not None:
        acc.set_error(
            "stream_error" if ts_ns is not None else "http_error", err if isinstance(err, str) else args_json(err)
        )
        return True
    acc.model = acc.model or s(obj.get("model"))
    if obj.get("done") is True:
        acc.done = True
        acc.finish_reason = s(obj.get("done_reason")) or acc.finish_reason or "stop"
        acc.set_usage(input_tokens=obj.get("prompt_eval_count"), output_tokens=obj.get("eval_count"))
    return False


def _tools(v: Any) -> list[Tool]:
    out = []
    for t in lst(v):
        fn = d(d(t).get("function"))
        out.append(
            Tool(name=s(fn.get("name")) or "", description=s(fn.get("description")), parameters=fn.get("parameters"))
        )
    return out


class Chat(ApiFormat):
    api = "ollama.chat"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(model=s(body.get("model")), parameters=params_of(body), tools=_tools(body.get("tools")))
        req.stream = (
            body["stream"] if isinstance(body.get("stream"), bool) else True
        )  # Ollama streams unless told not to
        system = []
        for m in lst(body.get("messages")):
            m = d(m)
            role = s(m.get("role")) or "?"
            if role == "system":
                system.append(s(m.get("content")) or "")
                continue
            calls = [
                ToolCall(
                    id=s(d(tc).get("id")),
                    name=s(d(d(tc).get("function")).get("name")) or "",
                    arguments=args_json(d(d(tc).get("function")).get("arguments")),
                )
                for tc in lst(m.get("tool_calls"))
            ]
            msg = Message(
                role=role,
                content=s(m.get("content")),
                tool_calls=calls,
                thinking=s(m.get("thinking")),
                name=s(m.get("tool_name")) or s(m.get("name")),
                tool_call_id=s(m.get("tool_call_id")),
            )
            if msg.tool_call_id:
                req.tool_result_ids.append(msg.tool_call_id)
            req.messages.append(msg)
        req.system = "\n\n".join(system) if system else None
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        self.on_event(body, None, acc, None)

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        if _common(obj, acc, ts_ns):
            return
        m = d(obj.get("message"))
        acc.add_thinking(m.get("thinking"), ts_ns)
        acc.add_text(m.get("content"), ts_ns)
        for tc in lst(m.get("tool_calls")):
            fn = d(d(tc).get("function"))
            t = acc.tool(len(acc.tool_calls))
            t.id, t.name, t.final_args = s(d(tc).get("id")), s(fn.get("name")) or "", args_json(fn.get("arguments"))
            acc.token(ts_ns)


class Generate(ApiFormat):
    api = "ollama.generate"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(model=s(body.get("model")), parameters=params_of(body), system=s(body.get("system")))
        req.parameters.pop("context", None)  # token ids of the previous turn: long and meaningless to read
        req.stream = body["stream"] if isinstance(body.get("stream"), bool) else True
        if body.get("prompt") is not None:
            req.messages.append(Message(role="user", content=s(body.get("prompt"))))
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        self.on_event(body, None, acc, None)

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        if _common(obj, acc, ts_ns):
            return
        acc.add_thinking(obj.get("thinking"), ts_ns)
        acc.add_text(obj.get("response"), ts_ns)


class Embed(ApiFormat):
    api = "ollama.embed"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(model=s(body.get("model")), parameters=params_of(body), stream=False)
        inp = body.get("input", body.get("prompt"))
        for it in inp if isinstance(inp, list) else [inp] if inp is not None else []:
            req.messages.append(Message(role="input", content=it if isinstance(it, str) else args_json(it)))
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        body = d(body)
        if _common(body, acc, None):
            return
        embs = lst(body.get("embeddings")) or ([body["embedding"]] if "embedding" in body else [])
        acc.embeddings = len(embs)
        acc.dimensions = len(lst(embs[0])) if embs else None
        acc.set_usage(input_tokens=body.get("prompt_eval_count"))
        acc.done = True
