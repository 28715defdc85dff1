"""The LLM exchange record: one request/response pair, as sinks see it.

Modelled on mitmproxy's HTTPFlow: a request, plus a response and/or an error
that may be missing. A partial exchange is still a valid record; what is
missing is said by `complete`, `missing_bytes`, `truncated`, `closed_early`
and `error`. Headers stay a list of [name, value] so redaction can walk them.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from pydantic import BaseModel, Field

Header = list[str]  # [name, value]; a list (not a tuple) so JSON round-trips to the same shape


class ToolCall(BaseModel):
    """A function/tool call the model asked for (or one replayed in a request's history)."""

    id: str | None = None
    name: str = ""
    arguments: str = ""  # JSON text as sent by the model; may be incomplete if the stream broke
    type: str = "function"


class Message(BaseModel):
    """One normalized conversation turn. `content` is the text; non-text parts are summarized."""

    role: str
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None  # for a tool result: the call it answers
    name: str | None = None
    thinking: str | None = None


class Tool(BaseModel):
    name: str
    description: str | None = None
    parameters: Any = None  # JSON schema as sent
    type: str = "function"


class Timing(BaseModel):
    """CLOCK_MONOTONIC ns (as the kernel saw the bytes) and the same instants as wall-clock ISO-8601 UTC."""

    request_start_ns: int = 0
    request_end_ns: int | None = None
    response_start_ns: int | None = None  # response headers complete: first response byte, near enough
    first_token_ns: int | None = None  # the ResponseData carrying the first non-empty delta
    end_ns: int | None = None
    request_start: str | None = None
    response_start: str | None = None
    first_token: str | None = None
    end: str | None = None


class ProcessRef(BaseModel):
    pid: int
    comm: str = ""
    exe: str = ""
    cmdline: list[str] | None = None
    uid: int = -1
    cgroup: str = ""
    cgroup_id: int = 0
    container: str = ""


class ConnectionRef(BaseModel):
    conn: str = ""  # address of the TLS object, hex
    fd: int = -1
    peer_addr: str | None = None
    peer_port: int | None = None
    local_port: int | None = None
    authority: str = ""  # Host header or :authority
    http_version: str = ""
    tls_stack: str = ""


class Usage(BaseModel):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None


class RequestRecord(BaseModel):
    method: str = ""
    path: str = ""
    headers: list[Header] = Field(default_factory=list)
    system: str | None = None
    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    body: str | None = None  # raw body text, cut at the raw-body limit
    body_bytes: int = 0  # size as captured (before any cut)
    body_truncated: bool = False


class ResponseRecord(BaseModel):
    status: int | None = None
    reason: str = ""
    headers: list[Header] = Field(default_factory=list)
    id: str | None = None  # provider's response/message id
    model: str | None = None  # model as the provider reported it
    text: str = ""  # final text: the join of all deltas
    tool_calls: list[ToolCall] = Field(default_factory=list)
    thinking: str | None = None
    finish_reason: str | None = None
    events: int = 0  # stream events decoded
    bad_events: int = 0  # stream events that could not be decoded (invalid JSON, bad CRC, ...)
    embeddings: int | None = None  # embeddings APIs: how many vectors came back
    dimensions: int | None = None
    body: str | None = None  # raw body of a non-streamed response (or of one that could not be parsed)
    body_bytes: int = 0
    body_truncated: bool = False


class ExchangeError(BaseModel):
    """Why the exchange is not a clean success.

    kind: "http_error" (provider answered with an error status or error body),
    "stream_error" (an error event inside a stream), "broken" (the HTTP message broke),
    "no_response" (connection ended before a response), "incomplete" (response never ended),
    "parse_error" (bodies could not be decoded).
    """

    kind: str
    message: str = ""
    type: str | None = None  # provider error type, e.g. "overloaded_error", "invalid_request_error"
    code: str | None = None
    status: int | None = None


class LlmExchange(BaseModel):
    id: str
    conversation_id: str | None = None
    provider: str
    api: str
    model: str | None = None
    stream: bool = False
    latency_ms: float | None = None  # request start -> response end (or last byte seen)
    ttft_ms: float | None = None  # request start -> first token
    timing: Timing = Field(default_factory=Timing)
    process: ProcessRef
    connection: ConnectionRef = Field(default_factory=ConnectionRef)
    request: RequestRecord = Field(default_factory=RequestRecord)
    response: ResponseRecord | None = None
    usage: Usage = Field(default_factory=Usage)
    complete: bool = False
    missing_bytes: int = 0
    truncated: bool = False  # a body was cut at a size limit (in the kernel or here)
    closed_early: bool = False  # the connection ended before the response did
    error: ExchangeError | None = None

    def summary(self) -> str:
        """One human line, e.g. for journald's MESSAGE."""
        p = self.process
        tokens = f"{_n(self.usage.input_tokens)}→{_n(self.usage.output_tokens)} tok"
        status = self.response.status if self.response and self.response.status is not None else "-"
        lat = f"{self.latency_ms:.0f}ms" if self.latency_ms is not None else "-"
        err = (
            f" error={self.error.kind}" + (f": {self.error.message[:80]}" if self.error.message else "")
            if self.error
            else ""
        )
        return (
            f"{self.provider} {self.api} {self.model or '?'} {status} {tokens} {lat}"
            f"{' stream' if self.stream else ''} pid={p.pid} {p.comm}{err}"
        )


def _n(v: int | None) -> str:
    return "?" if v is None else str(v)


def wall_iso(mono_ns: int | None, clock_offset_ns: int) -> str | None:
    """CLOCK_MONOTONIC ns + offset -> ISO-8601 UTC with microseconds."""
    if mono_ns is None or not clock_offset_ns:
        return None
    epoch_ns = mono_ns + clock_offset_ns
    dt = _dt.datetime.fromtimestamp(epoch_ns // 1_000_000_000, tz=_dt.UTC)
    dt = dt.replace(microsecond=(epoch_ns % 1_000_000_000) // 1000)
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")
