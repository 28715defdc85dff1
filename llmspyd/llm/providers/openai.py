"""OpenAI wire formats: Chat Completions, Responses, legacy Completions, Embeddings.

Also spoken by Azure OpenAI, OpenRouter, vLLM, LiteLLM, Ollama's /v1, Groq,
Mistral, DeepSeek, ... (the "OpenAI-compatible" servers), so reasoning
fields those servers add (`reasoning_content`, `reasoning`) are read too.
"""

from __future__ import annotations

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


def _openai_error(body: dict, acc: ResponseAcc, kind: str) -> bool:
    err = body.get("error")
    if err is None:
        return False
    if isinstance(err, dict):
        acc.set_error(kind, err.get("message", ""), err.get("type"), err.get("code"))
    else:
        acc.set_error(kind, err)
    return True


def _usage_chat(u: Any, acc: ResponseAcc) -> None:
    u = d(u)
    if not u:
        return
    acc.set_usage(
        input_tokens=u.get("prompt_tokens"),
        output_tokens=u.get("completion_tokens"),
        total_tokens=u.get("total_tokens"),
        cache_read_tokens=d(u.get("prompt_tokens_details")).get("cached_tokens"),
        reasoning_tokens=d(u.get("completion_tokens_details")).get("reasoning_tokens"),
    )


def _tools(v: Any) -> list[Tool]:
    out = []
    for t in lst(v):
        t = d(t)
        fn = d(t.get("function")) if "function" in t else t  # chat nests under "function"; responses is flat
        name = s(fn.get("name")) or s(t.get("type")) or ""
        out.append(
            Tool(
                name=name,
                description=s(fn.get("description")),
                parameters=fn.get("parameters"),
                type=s(t.get("type")) or "function",
            )
        )
    return out


def _msg_tool_calls(v: Any) -> list[ToolCall]:
    out = []
    for tc in lst(v):
        tc = d(tc)
        fn = d(tc.get("function"))
        out.append(
            ToolCall(
                id=s(tc.get("id")),
                name=s(fn.get("name")) or "",
                arguments=args_json(fn.get("arguments")),
                type=s(tc.get("type")) or "function",
            )
        )
    return out


class ChatCompletions(ApiFormat):
    api = "chat.completions"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(model=s(body.get("model")), parameters=params_of(body), tools=_tools(body.get("tools")))
        if isinstance(body.get("stream"), bool):
            req.stream = body["stream"]
        system: list[str] = []
        for m in lst(body.get("messages")):
            m = d(m)
            role = s(m.get("role")) or "?"
            content = text_of(m.get("content"))
            if role in ("system", "developer"):
                if content:
                    system.append(content)
                continue
            msg = Message(
                role=role,
                content=content,
                tool_calls=_msg_tool_calls(m.get("tool_calls")),
                tool_call_id=s(m.get("tool_call_id")),
                name=s(m.get("name")),
                thinking=s(m.get("reasoning_content")) or s(m.get("reasoning")),
            )
            if msg.tool_call_id:
                req.tool_result_ids.append(msg.tool_call_id)
            req.messages.append(msg)
        req.system = "\n\n".join(system) if system else None
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        body = d(body)
        if _openai_error(body, acc, "http_error"):
            return
        acc.response_id = s(body.get("id"))
        acc.model = s(body.get("model"))
        for ch in lst(body.get("choices"))[:1]:
            ch = d(ch)
            m = d(ch.get("message"))
            acc.add_text(text_of(m.get("content")) if m.get("content") is not None else None)
            acc.add_text(s(m.get("refusal")))
            acc.add_thinking(s(m.get("reasoning_content")) or s(m.get("reasoning")))
            for i, tc in enumerate(_msg_tool_calls(m.get("tool_calls"))):
                t = acc.tool(i)
                t.id, t.name, t.type, t.final_args = tc.id, tc.name, tc.type, tc.arguments
            acc.finish_reason = s(ch.get("finish_reason"))
        _usage_chat(body.get("usage"), acc)
        acc.done = True

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        if _openai_error(obj, acc, "stream_error"):
            return
        acc.response_id = acc.response_id or s(obj.get("id"))
        acc.model = acc.model or s(obj.get("model"))
        for ch in lst(obj.get("choices")):
            ch = d(ch)
            if ch.get("index", 0) != 0:
                continue  # n>1: the first choice is the one recorded
            delta = d(ch.get("delta"))
            acc.add_text(s(delta.get("content")), ts_ns)
            acc.add_text(s(delta.get("refusal")), ts_ns)
            acc.add_thinking(s(delta.get("reasoning_content")) or s(delta.get("reasoning")), ts_ns)
            for tc in lst(delta.get("tool_calls")):
                tc = d(tc)
                idx = tc.get("index", 0)
                t = acc.tool(idx)
                if s(tc.get("id")):
                    t.id = tc["id"]
                    acc.token(ts_ns)
                if s(tc.get("type")):
                    t.type = tc["type"]
                fn = d(tc.get("function"))
                if s(fn.get("name")):
                    t.name += fn["name"]
                    acc.token(ts_ns)
                acc.add_tool_args(idx, fn.get("arguments"), ts_ns)
            if s(ch.get("finish_reason")):
                acc.finish_reason = ch["finish_reason"]
        _usage_chat(obj.get("usage"), acc)


class Completions(ApiFormat):
    api = "completions"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(model=s(body.get("model")), parameters=params_of(body))
        if isinstance(body.get("stream"), bool):
            req.stream = body["stream"]
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            req.messages = [Message(role="prompt", content=p) for p in prompt]
        elif prompt is not None:
            req.messages = [Message(role="prompt", content=prompt if isinstance(prompt, str) else args_json(prompt))]
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        self.on_event(body, None, acc, None)
        acc.done = True

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        if _openai_error(obj, acc, "stream_error" if ts_ns is not None else "http_error"):
            return
        acc.response_id = acc.response_id or s(obj.get("id"))
        acc.model = acc.model or s(obj.get("model"))
        for ch in lst(obj.get("choices")):
            ch = d(ch)
            if ch.get("index", 0) != 0:
                continue
            acc.add_text(s(ch.get("text")), ts_ns)
            if s(ch.get("finish_reason")):
                acc.finish_reason = ch["finish_reason"]
        _usage_chat(obj.get("usage"), acc)


class Embeddings(ApiFormat):
    api = "embeddings"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(model=s(body.get("model")), parameters=params_of(body), stream=False)
        inp = body.get("input")
        items = inp if isinstance(inp, list) else [inp] if inp is not None else []
        for it in items:
            req.messages.append(Message(role="input", content=it if isinstance(it, str) else args_json(it)))
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        body = d(body)
        if _openai_error(body, acc, "http_error"):
            return
        acc.model = s(body.get("model"))
        data = lst(body.get("data"))
        acc.embeddings = len(data)
        if data:
            emb = d(data[0]).get("embedding")
            acc.dimensions = len(emb) if isinstance(emb, list) else None
        u = d(body.get("usage"))
        acc.set_usage(input_tokens=u.get("prompt_tokens"), total_tokens=u.get("total_tokens"))
        acc.done = True


# --- Responses API --------------------------------------------------------------------------


def _responses_input(v: Any, req: ParsedRequest) -> None:
    if isinstance(v, str):
        req.messages.append(Message(role="user", content=v))
        return
    for it in lst(v):
        it = d(it)
        typ = s(it.get("type")) or "message"
        if typ == "message" or ("role" in it and typ not in ("function_call", "function_call_output")):
            role = s(it.get("role")) or "user"
            content = text_of(it.get("content"))
            if role in ("system", "developer"):
                req.system = "\n\n".join(x for x in (req.system, content) if x)
                continue
            req.messages.append(Message(role=role, content=content))
        elif typ == "function_call":
            req.messages.append(
                Message(
                    role="assistant",
                    tool_calls=[
                        ToolCall(
                            id=s(it.get("call_id")),
                            name=s(it.get("name")) or "",
                            arguments=args_json(it.get("arguments")),
                        )
                    ],
                )
            )
        elif typ in ("function_call_output", "custom_tool_call_output"):
            cid = s(it.get("call_id"))
            out = it.get("output")
            req.messages.append(
                Message(role="tool", tool_call_id=cid, content=out if isinstance(out, str) else text_of(out))
            )
            if cid:
                req.tool_result_ids.append(cid)
        elif typ == "reasoning":
            summ = "\n".join(s(d(p).get("text")) or "" for p in lst(it.get("summary")))
            req.messages.append(Message(role="assistant", thinking=summ or None))
        else:
            req.messages.append(Message(role=s(it.get("role")) or "item", content=f"[{typ}]"))


class Responses(ApiFormat):
    api = "responses"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        req = ParsedRequest(
            model=s(body.get("model")), parameters=params_of(body, ("instructions",)), tools=_tools(body.get("tools"))
        )
        req.parameters.pop("instructions", None)
        if isinstance(body.get("stream"), bool):
            req.stream = body["stream"]
        req.system = s(body.get("instructions"))
        _responses_input(body.get("input"), req)
        req.previous_response_id = s(body.get("previous_response_id"))
        return req

    def _response_obj(self, r: dict, acc: ResponseAcc, replace: bool) -> None:
        acc.response_id = s(r.get("id")) or acc.response_id
        acc.model = s(r.get("model")) or acc.model
        status = s(r.get("status"))
        output = r.get("output")
        if isinstance(output, list) and (output or not replace):
            if replace:
                first = acc.first_token_ns
                acc.reset_content()
                acc.first_token_ns = first
            for i, item in enumerate(output):
                self._output_item(d(item), i, acc, final=True)
        incomplete = d(r.get("incomplete_details")).get("reason")
        acc.finish_reason = s(incomplete) or status or acc.finish_reason
        err = r.get("error")
        if isinstance(err, dict):
            acc.set_error(
                "stream_error" if replace else "http_error", err.get("message", ""), err.get("type"), err.get("code")
            )
        u = d(r.get("usage"))
        if u:
            acc.set_usage(
                input_tokens=u.get("input_tokens"),
                output_tokens=u.get("output_tokens"),
                total_tokens=u.get("total_tokens"),
                cache_read_tokens=d(u.get("input_tokens_details")).get("cached_tokens"),
                reasoning_tokens=d(u.get("output_tokens_details")).get("reasoning_tokens"),
            )

    def _output_item(self, item: dict, index: int, acc: ResponseAcc, final: bool, ts_ns: int | None = None) -> None:
        typ = s(item.get("type"))
        if typ == "message" and final:
            for part in lst(item.get("content")):
                part = d(part)
                acc.add_text(s(part.get("text")) or s(part.get("refusal")), ts_ns)
        elif typ == "reasoning" and final:
            for p in lst(item.get("summary")) + lst(item.get("content")):
                acc.add_thinking(s(d(p).get("text")), ts_ns)
        elif typ in ("function_call", "custom_tool_call"):
            t = acc.tool(index)
            t.id = s(item.get("call_id")) or t.id
            t.name = s(item.get("name")) or t.name
            if final:
                args = item.get("arguments", item.get("input"))
                if args is not None:
                    t.final_args = args_json(args)
        elif typ and typ.endswith("_call") and final:  # built-in tools: web_search_call, file_search_call, ...
            t = acc.tool(index)
            t.id, t.name, t.type = s(item.get("id")), typ, typ

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        body = d(body)
        if (
            "error" in body
            and not body.get("output")
            and isinstance(body.get("error"), dict)
            and not body.get("object")
        ):
            _openai_error(body, acc, "http_error")
            return
        self._response_obj(body, acc, replace=False)
        acc.done = True

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        typ = s(obj.get("type")) or event or ""
        if typ.endswith(".delta"):
            delta = obj.get("delta")
            if typ in ("response.output_text.delta", "response.refusal.delta"):
                acc.add_text(delta, ts_ns)
            elif typ in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
                acc.add_thinking(delta, ts_ns)
            elif typ in ("response.function_call_arguments.delta", "response.custom_tool_call_input.delta"):
                acc.add_tool_args(obj.get("output_index", 0), delta, ts_ns)
        elif typ in ("response.created", "response.in_progress"):
            self._response_obj(d(obj.get("response")), acc, replace=False)
        elif typ == "response.output_item.added":
            self._output_item(d(obj.get("item")), obj.get("output_index", 0), acc, final=False)
        elif typ == "response.output_item.done":
            self._output_item(d(obj.get("item")), obj.get("output_index", 0), acc, final=False)
            item = d(obj.get("item"))
            if s(item.get("type")) == "function_call" and isinstance(item.get("arguments"), str):
                acc.tool(obj.get("output_index", 0)).final_args = item["arguments"]
        elif typ == "response.function_call_arguments.done":
            if isinstance(obj.get("arguments"), str):
                acc.tool(obj.get("output_index", 0)).final_args = obj["arguments"]
        elif typ in ("response.completed", "response.incomplete", "response.failed"):
            self._response_obj(d(obj.get("response")), acc, replace=True)
            acc.done = True
        elif typ == "error":
            err = d(obj.get("error")) or obj
            acc.set_error(
                "stream_error", err.get("message", ""), err.get("type") if err is not obj else None, err.get("code")
            )
