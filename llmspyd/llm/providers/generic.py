"""Unknown but LLM-looking JSON APIs: pick the known format whose shape each body has.

Used for proxies and self-hosted gateways on paths we do not know. A body
is classified by its keys (`choices` -> OpenAI, `candidates` -> Gemini, a
`type: message` with `content` blocks -> Anthropic, `done` -> Ollama);
anything else still yields its obvious text fields.
"""

from __future__ import annotations

from typing import Any

from llmspyd.llm.providers.anthropic import Messages, is_anthropic_body
from llmspyd.llm.providers.base import ApiFormat, ParsedRequest, ResponseAcc, args_json, d, lst, params_of, s, text_of
from llmspyd.llm.providers.gemini import GenerateContent
from llmspyd.llm.providers.ollama import Chat as OllamaChat
from llmspyd.llm.providers.ollama import Generate as OllamaGenerate
from llmspyd.llm.providers.openai import ChatCompletions, Completions, Responses
from llmspyd.llm.record import Message

_CHAT = ChatCompletions()
_COMPLETIONS = Completions()
_RESPONSES = Responses()
_ANTHROPIC = Messages()
_GEMINI = GenerateContent()
_OLLAMA_CHAT = OllamaChat()
_OLLAMA_GEN = OllamaGenerate()

# Keys whose string value is the generated text in ad-hoc APIs (TGI, custom gateways, ...).
TEXT_KEYS = ("generated_text", "output_text", "completion", "output", "text", "response", "answer", "content")


def looks_like_llm_request(body: Any, model_in_path: bool = False) -> bool:
    """A JSON body that names a model (or whose URL does) and carries a prompt in one of the usual shapes."""
    body = d(body)
    if not body:
        return False
    has_model = model_in_path or isinstance(body.get("model"), str) or isinstance(body.get("modelId"), str)
    has_prompt = any(k in body for k in ("messages", "prompt", "input", "contents", "inputs", "inputText"))
    return has_model and has_prompt or isinstance(body.get("contents"), list)


def _shape(obj: dict) -> ApiFormat | None:
    if "choices" in obj:
        ch = d(lst(obj["choices"])[0]) if lst(obj["choices"]) else {}
        return _COMPLETIONS if "text" in ch and "message" not in ch and "delta" not in ch else _CHAT
    if "candidates" in obj or "usageMetadata" in obj:
        return _GEMINI
    t = s(obj.get("type")) or ""
    if t == "message" or t.startswith(("message_", "content_block_")) or t == "ping":
        return _ANTHROPIC
    if t.startswith("response.") or obj.get("object") == "response":
        return _RESPONSES
    if "done" in obj and ("message" in obj or "response" in obj):
        return _OLLAMA_CHAT if "message" in obj else _OLLAMA_GEN
    return None


class Generic(ApiFormat):
    api = "generic"

    def parse_request(self, body: Any) -> ParsedRequest:
        body = d(body)
        if "messages" in body:
            req = (_ANTHROPIC if is_anthropic_body(body) else _CHAT).parse_request(body)
        elif "contents" in body:
            req = _GEMINI.parse_request(body)
        else:
            req = ParsedRequest(model=s(body.get("model")), parameters=params_of(body))
            for k in ("prompt", "input", "inputs", "inputText"):
                if k in body:
                    v = body[k]
                    req.messages.append(
                        Message(role="user", content=v if isinstance(v, str) else text_of(v) or args_json(v))
                    )
                    break
        if isinstance(body.get("stream"), bool):
            req.stream = body["stream"]
        req.model = req.model or s(body.get("modelId"))
        return req

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        if isinstance(body, list):
            for el in body:
                self.on_event(el, None, acc, None)
            acc.done = True
            return
        obj = d(body)
        fmt = _shape(obj)
        if fmt is not None:
            fmt.parse_response(obj, acc)
            return
        if isinstance(obj.get("error"), (dict, str)):
            err = obj["error"]
            acc.set_error(
                "http_error",
                d(err).get("message", "") if isinstance(err, dict) else err,
                d(err).get("type") if isinstance(err, dict) else None,
            )
            return
        self._text_fields(obj, acc, None)
        acc.done = True

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        obj = d(obj)
        fmt = _shape(obj)
        if fmt is not None:
            fmt.on_event(obj, event, acc, ts_ns)
        elif isinstance(obj.get("error"), (dict, str)):
            err = obj["error"]
            acc.set_error("stream_error", d(err).get("message", "") if isinstance(err, dict) else err)
        else:
            self._text_fields(obj, acc, ts_ns)

    @staticmethod
    def _text_fields(obj: dict, acc: ResponseAcc, ts_ns: int | None) -> None:
        msg = obj.get("message")
        if isinstance(msg, dict) and msg.get("content") is not None:  # Cohere v2 and other chat-shaped answers
            acc.add_text(text_of(msg["content"]), ts_ns)
            return
        for k in TEXT_KEYS:
            v = obj.get(k)
            if isinstance(v, str):
                acc.add_text(v, ts_ns)
                return
            if isinstance(v, list) and v and isinstance(v[0], (dict, str)):
                t = text_of(v)
                if t:
                    acc.add_text(t, ts_ns)
                    return
