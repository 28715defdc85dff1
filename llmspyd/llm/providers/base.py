"""What every provider module implements, and the accumulators they fill.

An `ApiFormat` knows one wire format (OpenAI chat, Anthropic messages, ...):
it normalizes a request body into a `ParsedRequest` and folds response
bodies or stream events into a `ResponseAcc`. Formats never raise on odd
input: a field of the wrong type is skipped (`safe` helpers below) and
anything unusable is counted by the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llmspyd.llm.record import ExchangeError, Message, Tool, ToolCall, Usage

# Parameters copied from a request body into `parameters` when present (all formats use some of them).
PARAM_KEYS: tuple[str, ...] = (
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "seed",
    "stop",
    "stop_sequences",
    "presence_penalty",
    "frequency_penalty",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning",
    "reasoning_effort",
    "thinking",
    "stream",
    "stream_options",
    "store",
    "user",
    "metadata",
    "service_tier",
    "logprobs",
    "top_logprobs",
    "truncation",
    "text",
    "include",
    "format",
    "options",
    "keep_alive",
    "think",
    "encoding_format",
    "dimensions",
    "previous_response_id",
    "background",
    "suffix",
    "echo",
    "best_of",
    "logit_bias",
    "modalities",
    "prediction",
    "verbosity",
    "safety_identifier",
    "prompt_cache_key",
    "raw",
    "template",
    "context",
    "images",
    "generationConfig",
    "safetySettings",
    "toolConfig",
    "cachedContent",
    "inferenceConfig",
    "additionalModelRequestFields",
    "guardrailConfig",
    "anthropic_version",
    "anthropic_beta",
    "container",
    "mcp_servers",
)


@dataclass
class ParsedRequest:
    model: str | None = None
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    stream: bool | None = None
    # ids that chain this request to earlier exchanges: tool results it carries, previous_response_id
    tool_result_ids: list[str] = field(default_factory=list)
    previous_response_id: str | None = None


@dataclass
class ToolCallAcc:
    id: str | None = None
    name: str = ""
    args: list[str] = field(default_factory=list)
    type: str = "function"
    final_args: str | None = None  # complete arguments when the provider repeats them at the end

    def build(self) -> ToolCall:
        args = self.final_args if self.final_args is not None else "".join(self.args)
        return ToolCall(id=self.id, name=self.name, arguments=args, type=self.type)


@dataclass
class ResponseAcc:
    """The response as it is being decoded; `first_token_ns` is set by the first non-empty delta."""

    text_parts: list[str] = field(default_factory=list)
    thinking_parts: list[str] = field(default_factory=list)
    tool_calls: dict[Any, ToolCallAcc] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    model: str | None = None
    response_id: str | None = None
    error: ExchangeError | None = None
    first_token_ns: int | None = None
    events: int = 0
    bad_events: int = 0
    done: bool = False  # the format's own end marker was seen ([DONE], message_stop, done:true, ...)
    embeddings: int | None = None
    dimensions: int | None = None

    def token(self, ts_ns: int | None) -> None:
        if self.first_token_ns is None and ts_ns is not None:
            self.first_token_ns = ts_ns

    def add_text(self, s: Any, ts_ns: int | None = None) -> None:
        if isinstance(s, str) and s:
            self.text_parts.append(s)
            self.token(ts_ns)

    def add_thinking(self, s: Any, ts_ns: int | None = None) -> None:
        if isinstance(s, str) and s:
            self.thinking_parts.append(s)
            self.token(ts_ns)

    def tool(self, key: Any) -> ToolCallAcc:
        acc = self.tool_calls.get(key)
        if acc is None:
            acc = self.tool_calls[key] = ToolCallAcc()
        return acc

    def add_tool_args(self, key: Any, s: Any, ts_ns: int | None = None) -> None:
        if isinstance(s, str) and s:
            self.tool(key).args.append(s)
            self.token(ts_ns)

    def reset_content(self) -> None:
        """Replace streamed deltas with an authoritative final object (e.g. response.completed)."""
        self.text_parts.clear()
        self.thinking_parts.clear()
        self.tool_calls.clear()

    def set_usage(self, **kw: Any) -> None:
        for k, v in kw.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, int):
                setattr(self.usage, k, v)

    def set_error(
        self, kind: str, message: Any, type_: Any = None, code: Any = None, status: int | None = None
    ) -> None:
        if self.error is None:
            self.error = ExchangeError(
                kind=kind,
                message=message if isinstance(message, str) else json.dumps(message)[:2000] if message else "",
                type=str(type_) if type_ is not None else None,
                code=str(code) if code is not None else None,
                status=status,
            )


class ApiFormat:
    """One wire format. Subclasses override what applies."""

    api: str = "generic"

    def parse_request(self, body: Any) -> ParsedRequest:
        return ParsedRequest()

    def parse_response(self, body: Any, acc: ResponseAcc) -> None:
        """A whole (non-streamed) JSON body."""

    def on_event(self, obj: Any, event: str | None, acc: ResponseAcc, ts_ns: int | None) -> None:
        """One decoded stream element (SSE data JSON, NDJSON line, array element, event-stream payload).

        `ts_ns` is when its bytes arrived; None when a whole body is replayed through the stream logic.
        """

    def on_sse_done(self, acc: ResponseAcc) -> None:
        """`data: [DONE]`."""
        acc.done = True


# --- small defensive accessors: captured JSON may have any shape -------------------------------


def d(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def lst(v: Any) -> list:
    return v if isinstance(v, list) else []


def s(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def text_of(content: Any) -> str | None:
    """Text of a content value: a string, or a list of parts (text parts joined, others summarized)."""
    if content is None:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return json.dumps(content)
    out: list[str] = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
            continue
        part = d(part)
        t = part.get("text")
        if isinstance(t, str):
            out.append(t)
        elif isinstance(part.get("content"), (str, list)):
            inner = text_of(part["content"])
            if inner:
                out.append(inner)
        elif "type" in part:
            out.append(f"[{part['type']}]")
    return "\n".join(out)


def params_of(body: dict, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: body[k] for k in PARAM_KEYS + extra if k in body}


def args_json(v: Any) -> str:
    """Tool arguments as JSON text, whether the format sends a string or an object."""
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
