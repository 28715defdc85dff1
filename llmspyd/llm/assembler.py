"""HTTP events of one connection -> LLM exchange records.

Sans-IO and per connection: the pipeline feeds every `HttpEvent` of a
connection to `on_event` and gets back the exchanges that event completed.
Non-LLM requests are recognized from their head (or, for unknown JSON APIs,
their body) and then ignored at the cost of a set lookup per event.
Nothing here raises on bad input: damaged bodies become records with
`error`/`complete` set, and counters say what was dropped and why.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from llmspyd.chunks import Peer
from llmspyd.llm import providers
from llmspyd.llm.conversations import ConversationTracker, default_tracker
from llmspyd.llm.eventstream import EventStreamParser
from llmspyd.llm.ndjson import JsonArrayParser, NdjsonParser
from llmspyd.llm.providers.base import ParsedRequest, ResponseAcc
from llmspyd.llm.providers.generic import Generic
from llmspyd.llm.record import (
    ConnectionRef,
    ExchangeError,
    LlmExchange,
    ProcessRef,
    RequestRecord,
    ResponseRecord,
    Timing,
    wall_iso,
)
from llmspyd.llm.sse import SseParser
from llmspyd.process import ProcessInfo
from llmspyd.protocols.events import (
    ConnectionInfo,
    HttpEvent,
    MessageBroken,
    RequestData,
    RequestEnd,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseHead,
)


@dataclass(frozen=True)
class Limits:
    # Request bodies are parsed up to this size. Agents resend the whole history each turn; 150 KB is usual,
    # a few MB with pasted files happens; beyond 32 MiB we keep the raw head and mark the request truncated.
    max_parse_bytes: int = 32 * 1024 * 1024
    # Raw request body text kept in the record: large enough for a 1 MiB prompt to reach journald whole.
    max_raw_request_bytes: int = 4 * 1024 * 1024
    # Raw body of non-streamed responses (and of any response we could not parse) kept in the record.
    max_raw_response_bytes: int = 1024 * 1024
    # Non-streamed response bodies are buffered up to this for parsing (embeddings can be large).
    max_response_parse_bytes: int = 64 * 1024 * 1024


DEFAULT_LIMITS = Limits()
_GENERIC = Generic()

# Process-wide counters (dropped non-LLM requests, exchanges emitted, ...) for status reports.
COUNTERS: Counter[str] = Counter()


@dataclass
class ConnContext:
    pid: int
    comm: str
    conn: int
    peer: Peer | None = None
    fd: int = -1
    stack: str = ""
    cgroup_id: int = 0
    process: ProcessInfo | None = None
    http_version: str = ""
    clock_offset_ns: int = 0  # add to CLOCK_MONOTONIC ns to get wall-clock epoch ns


_STREAM_TYPES = (
    "text/event-stream",
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/vnd.amazon.eventstream",
)


@dataclass
class _Msg:
    """One request/response pair in flight."""

    head: RequestHead
    det: providers.Detection
    body: bytearray = field(default_factory=bytearray)
    body_bytes: int = 0
    body_cut: bool = False
    req_end_ns: int | None = None
    parsed: ParsedRequest | None = None
    request_error: str | None = None
    resp_head: ResponseHead | None = None
    early: list[ResponseData] = field(default_factory=list)  # response bytes that came before the request ended
    early_bytes: int = 0
    decoder: Any = None  # SseParser | NdjsonParser | JsonArrayParser | EventStreamParser | None (buffered)
    resp_body: bytearray = field(default_factory=bytearray)
    resp_bytes: int = 0
    resp_cut: bool = False
    acc: ResponseAcc = field(default_factory=ResponseAcc)
    last_ns: int = 0


class ExchangeAssembler:
    def __init__(
        self, ctx: ConnContext, conversations: ConversationTracker | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self.ctx = ctx
        self.limits = limits
        self.conversations = conversations if conversations is not None else default_tracker()
        self._msgs: dict[int, _Msg] = {}
        self._ignored: set[int] = set()
        self._wants: bool | None = None
        self._first_seen = False
        self._first_msg: int | None = None  # msg id of the connection's first request
        self.protocol = ""
        self.stats: Counter[str] = Counter()

    # --- public interface -------------------------------------------------------------------

    def wants_connection(self) -> bool | None:
        """None: undecided; False: the first request was not LLM traffic (the pipeline may mute the connection)."""
        return self._wants

    def on_event(self, ev: HttpEvent) -> list[LlmExchange]:
        try:
            return self._on_event(ev)
        except Exception as e:  # a bug here must cost one exchange, never the connection
            self._count("internal_errors")
            msg = self._msgs.pop(getattr(ev, "msg", -1), None)
            if msg is None:
                return []
            try:
                return [
                    self._finish(
                        msg,
                        getattr(ev, "ts_ns", msg.last_ns),
                        ExchangeError(kind="parse_error", message=f"internal error: {type(e).__name__}: {e}"),
                    )
                ]
            except Exception:
                self._count("internal_errors")
                return []

    def on_close(self, ts_ns: int) -> list[LlmExchange]:
        out = []
        for msg in list(self._msgs.values()):
            try:
                if msg.parsed is None and not self._request_ready(msg):
                    continue
                if msg.resp_head is None:
                    err = ExchangeError(kind="no_response", message="connection closed before a response")
                else:
                    err = ExchangeError(kind="incomplete", message="connection closed before the response ended")
                out.append(self._finish(msg, ts_ns, err, closed_early=True))
            except Exception:
                self._count("internal_errors")
        self._msgs.clear()
        self._ignored.clear()
        return out

    # --- events -----------------------------------------------------------------------------

    def _on_event(self, ev: HttpEvent) -> list[LlmExchange]:
        if isinstance(ev, ConnectionInfo):
            self.protocol = ev.protocol
            return []
        mid = ev.msg
        if mid in self._ignored:
            if isinstance(ev, (ResponseEnd, MessageBroken)):
                self._ignored.discard(mid)
            return []
        if isinstance(ev, RequestHead):
            self._on_head(ev)
            return []
        msg = self._msgs.get(mid)
        if msg is None:
            self._count("events_without_request")
            return []
        msg.last_ns = max(msg.last_ns, ev.ts_ns)
        if isinstance(ev, RequestData):
            self._request_data(msg, ev.data)
        elif isinstance(ev, RequestEnd):
            msg.req_end_ns = ev.ts_ns
            if not self._request_ready(msg):
                del self._msgs[mid]
                self._ignored.add(mid)
                return []
        elif isinstance(ev, ResponseHead):
            msg.resp_head = ev
            self._pick_decoder(msg)
        elif isinstance(ev, ResponseData):
            if msg.parsed is None:
                # held until the request body says what format to expect; bounded like any response body
                if msg.early_bytes + len(ev.data) <= self.limits.max_response_parse_bytes:
                    msg.early.append(ev)
                    msg.early_bytes += len(ev.data)
                else:
                    msg.resp_cut = True
            else:
                self._response_data(msg, ev)
        elif isinstance(ev, ResponseEnd):
            del self._msgs[mid]
            if msg.parsed is None and not self._request_ready(msg):
                return []
            return [self._finish(msg, ev.ts_ns, None, ended=True)]
        elif isinstance(ev, MessageBroken):
            del self._msgs[mid]
            if msg.parsed is None and not self._request_ready(msg):
                return []
            if msg.resp_head is not None and msg.decoder is not None and msg.acc.done and not ev.missing_bytes:
                # SDKs stop reading at the stream's own end ([DONE], message_stop, ...) and may close before the
                # HTTP framing ends (last chunk, END_STREAM): nothing the reader wanted is missing
                self._count("ended_by_close_after_stream_end")
                return [self._finish(msg, ev.ts_ns, None, ended=True)]
            detail = f"{ev.reason}: {ev.detail}" if ev.detail else ev.reason
            err = ExchangeError(kind="broken", message=detail)
            return [self._finish(msg, ev.ts_ns, err, missing=ev.missing_bytes, closed_early=ev.reason == "closed")]
        return []

    def _on_head(self, ev: RequestHead) -> None:
        first = not self._first_seen
        self._first_seen = True
        det = providers.detect_head(ev.method, ev.target, ev.authority, ev.headers)
        if det is None:
            # GET /v1/models and friends on an LLM API connection: the next request may well be a model call
            keep = providers.is_llm_host(ev.authority) or providers.is_llm_metadata(ev.target)
            self._drop(ev.msg, first and not keep)
            return
        if det.confident and self._wants is None:
            self._wants = True
        self._msgs[ev.msg] = _Msg(head=ev, det=det, last_ns=ev.ts_ns)
        if first:
            self._first_msg = ev.msg

    def _drop(self, mid: int, first: bool) -> None:
        self._ignored.add(mid)
        self._count("non_llm_requests")
        if first and self._wants is None:
            self._wants = False

    def _request_data(self, msg: _Msg, data: bytes) -> None:
        msg.body_bytes += len(data)
        room = self.limits.max_parse_bytes - len(msg.body)
        if room >= len(data):
            msg.body += data
        else:
            if room > 0:
                msg.body += data[:room]
            msg.body_cut = True

    def _request_done(self, msg: _Msg) -> bool:
        """Parse the request body; False if it turned out not to be LLM traffic."""
        body: Any = None
        if msg.body:
            try:
                body = json.loads(msg.body)
            except ValueError as e:
                msg.request_error = f"request body is not JSON: {e}"
                self._count("request_json_errors")
        det = msg.det
        if not det.confident:
            if body is None:
                self._drop_late(msg)
                return False
            new = providers.detect_body(
                det, body, msg.head.target.partition("?")[0], msg.head.authority, msg.head.headers
            )
            if new is None:
                self._drop_late(msg)
                return False
            msg.det = det = new
            if self._wants is None:
                self._wants = True
        try:
            msg.parsed = det.fmt.parse_request(body)
        except Exception as e:  # formats are defensive; this is the last line
            msg.parsed = ParsedRequest()
            msg.request_error = f"request not understood: {type(e).__name__}: {e}"
            self._count("request_parse_errors")
        if body is None and msg.body:
            _salvage(bytes(msg.body[:SALVAGE_BYTES]), msg.parsed)
        if msg.parsed.model is None:
            msg.parsed.model = det.model
        if msg.parsed.stream is None:
            msg.parsed.stream = det.stream_hint
        return True

    def _request_ready(self, msg: _Msg) -> bool:
        """The request is as complete as it will be: parse it, then decode any response bytes held for it."""
        if not self._request_done(msg):
            return False
        if msg.resp_head is not None:
            self._pick_decoder(msg)  # again: the body may have changed the format (or said stream=true)
        early, msg.early = msg.early, []
        for ev in early:
            self._response_data(msg, ev)
        return True

    def _drop_late(self, msg: _Msg) -> None:
        self._count("non_llm_requests")
        if self._wants is None and msg.head.msg == self._first_msg:
            self._wants = False

    def _pick_decoder(self, msg: _Msg) -> None:
        head = msg.resp_head
        assert head is not None
        ctype = ""
        for k, v in head.headers:
            if k == "content-type":
                ctype = v.lower()
                break
        msg.det.provider = providers.refine_provider(msg.det.provider, head.headers)
        if "text/event-stream" in ctype:
            msg.decoder = SseParser()
        elif "ndjson" in ctype or "jsonl" in ctype:
            msg.decoder = NdjsonParser()
        elif "vnd.amazon.eventstream" in ctype:
            msg.decoder = EventStreamParser()
        elif msg.det.api == "streamGenerateContent" and head.status < 300:
            msg.decoder = JsonArrayParser()
        elif (
            msg.det.api.startswith("ollama.")
            and msg.parsed is not None
            and msg.parsed.stream
            and head.status < 300
            and "json" not in ctype
        ):
            msg.decoder = NdjsonParser()

    def _response_data(self, msg: _Msg, ev: ResponseData) -> None:
        data = ev.data
        msg.resp_bytes += len(data)
        dec = msg.decoder
        if dec is None:
            room = self.limits.max_response_parse_bytes - len(msg.resp_body)
            if room >= len(data):
                msg.resp_body += data
            else:
                msg.resp_body += data[: max(room, 0)]
                msg.resp_cut = True
            return
        acc = msg.acc
        fmt = msg.det.fmt
        if len(msg.resp_body) < self.limits.max_raw_response_bytes:  # raw kept for reading when decoding fails
            msg.resp_body += data[: self.limits.max_raw_response_bytes - len(msg.resp_body)]
        if isinstance(dec, SseParser):
            for sev in dec.feed(data, ev.ts_ns):
                acc.events += 1
                payload = sev.data
                if payload == "[DONE]":
                    fmt.on_sse_done(acc)
                    continue
                try:
                    obj = json.loads(payload)
                except ValueError:
                    acc.bad_events += 1
                    continue
                fmt.on_event(obj, None if sev.event == "message" else sev.event, acc, sev.ts_ns)
        elif isinstance(dec, EventStreamParser):
            for em in dec.feed(data, ev.ts_ns):
                acc.events += 1
                try:
                    obj = json.loads(em.payload) if em.payload else {}
                except ValueError:
                    acc.bad_events += 1
                    continue
                if em.message_type in ("exception", "error"):
                    message = obj.get("message") if isinstance(obj, dict) else None
                    acc.set_error(
                        "stream_error",
                        message or em.headers.get(":error-message", ""),
                        em.event_type,
                        em.headers.get(":error-code"),
                    )
                    continue
                fmt.on_event(obj, em.event_type, acc, em.ts_ns)
        else:  # NDJSON or JSON array
            for obj, ts in dec.feed(data, ev.ts_ns):
                acc.events += 1
                fmt.on_event(obj, None, acc, ts)

    # --- record -----------------------------------------------------------------------------

    def _finish(
        self,
        msg: _Msg,
        end_ns: int,
        error: ExchangeError | None,
        *,
        ended: bool = False,
        missing: int = 0,
        closed_early: bool = False,
    ) -> LlmExchange:
        ctx = self.ctx
        lim = self.limits
        head = msg.head
        det = msg.det
        if msg.parsed is None:
            self._request_done(msg)  # partial body: parsed as far as possible
        parsed = msg.parsed or ParsedRequest()
        acc = msg.acc
        rh = msg.resp_head
        status = rh.status if rh else None
        stream = msg.decoder is not None or bool(parsed.stream)  # asked for, even if an error answered it
        resp_rec: ResponseRecord | None = None
        raw_resp: str | None = None
        resp_truncated = msg.resp_cut

        if rh is not None:
            dec = msg.decoder
            if dec is None:
                self._parse_whole_response(msg, ended and not msg.resp_cut)
            else:
                if isinstance(dec, NdjsonParser):
                    for obj, ts in dec.close(end_ns):
                        acc.events += 1
                        det.fmt.on_event(obj, None, acc, ts)
                acc.bad_events += (
                    getattr(dec, "bad", 0) + getattr(dec, "crc_failures", 0) + getattr(dec, "header_errors", 0)
                )
                if isinstance(dec, EventStreamParser) and dec.broken:
                    acc.set_error("stream_error", f"event stream unreadable: {dec.broken}")
                pending = dec.pending_bytes()
                if pending and error is None and ended:
                    error = ExchangeError(kind="incomplete", message=f"stream ended inside an event ({pending} bytes)")
            keep_raw = dec is None or (not acc.text_parts and not acc.tool_calls and acc.events == 0)
            if keep_raw and msg.resp_body:
                raw_resp = bytes(msg.resp_body[: lim.max_raw_response_bytes]).decode("utf-8", "replace")
                resp_truncated = resp_truncated or msg.resp_bytes > lim.max_raw_response_bytes
            resp_rec = ResponseRecord(
                status=status,
                reason=rh.reason,
                headers=[[k, v] for k, v in rh.headers],
                id=acc.response_id,
                model=acc.model,
                text="".join(acc.text_parts),
                tool_calls=[t.build() for t in acc.tool_calls.values()],
                thinking="".join(acc.thinking_parts) or None,
                finish_reason=acc.finish_reason,
                events=acc.events,
                bad_events=acc.bad_events,
                embeddings=acc.embeddings,
                dimensions=acc.dimensions,
                body=raw_resp,
                body_bytes=msg.resp_bytes,
                body_truncated=resp_truncated and raw_resp is not None,
            )
            if (
                error is None
                and ended
                and msg.decoder is not None
                and not acc.done
                and status is not None
                and status < 300
                and acc.error is None
            ):
                # the body ended cleanly but the stream's own end marker never came (proxy cut it, server died)
                error = ExchangeError(kind="incomplete", message="stream ended without its end event")

        # provider errors: an error body or error event wins over "incomplete", the HTTP status fills in
        if acc.error is not None and (error is None or error.kind == "incomplete"):
            error = acc.error.model_copy(update={"status": status})
        if error is None and status is not None and status >= 400:
            error = ExchangeError(kind="http_error", status=status, message=(raw_resp or "")[:2000])
        if error is not None and error.type is None and rh is not None:
            for k, v in rh.headers:
                if k == "x-amzn-errortype":  # AWS: "ValidationException:http://internal.amazon.com/..."
                    error.type = v.split(":", 1)[0]
        if error is None and msg.request_error and rh is None:
            error = ExchangeError(kind="parse_error", message=msg.request_error)

        req_raw = bytes(msg.body[: lim.max_raw_request_bytes]).decode("utf-8", "replace") if msg.body else None
        req_truncated = msg.body_cut or msg.body_bytes > lim.max_raw_request_bytes
        start = head.ts_ns
        first_byte = rh.ts_ns if rh else None
        off = ctx.clock_offset_ns
        real_end = end_ns if (ended or rh is not None) else max(msg.last_ns, start)
        timing = Timing(
            request_start_ns=start,
            request_end_ns=msg.req_end_ns,
            response_start_ns=first_byte,
            first_token_ns=acc.first_token_ns,
            end_ns=real_end,
            request_start=wall_iso(start, off),
            response_start=wall_iso(first_byte, off),
            first_token=wall_iso(acc.first_token_ns, off),
            end=wall_iso(real_end, off),
        )
        pinfo = ctx.process
        proc = ProcessRef(pid=ctx.pid, comm=ctx.comm or (pinfo.comm if pinfo else ""), cgroup_id=ctx.cgroup_id)
        if pinfo is not None:
            proc.exe, proc.cmdline, proc.uid = pinfo.exe, pinfo.cmdline, pinfo.uid
            proc.cgroup, proc.container = pinfo.cgroup, pinfo.container
        peer = ctx.peer
        conn = ConnectionRef(
            conn=f"{ctx.conn:#x}",
            fd=ctx.fd,
            authority=head.authority,
            http_version=head.http_version or ctx.http_version,
            tls_stack=ctx.stack,
            peer_addr=peer.addr if peer else None,
            peer_port=peer.port if peer else None,
            local_port=peer.local_port if peer and peer.local_port else None,
        )
        truncated = req_truncated or msg.resp_cut
        complete = (
            ended and error is None or (ended and error is not None and error.kind in ("http_error", "stream_error"))
        )
        complete = complete and missing == 0 and not truncated
        ex = LlmExchange(
            id=_exchange_id(ctx, head.msg, start),
            provider=det.provider,
            api=det.api,
            model=parsed.model or acc.model,
            stream=stream,
            latency_ms=round((real_end - start) / 1e6, 3) if (ended or rh is not None) else None,
            ttft_ms=round((acc.first_token_ns - start) / 1e6, 3) if acc.first_token_ns is not None else None,
            timing=timing,
            process=proc,
            connection=conn,
            request=RequestRecord(
                method=head.method,
                path=head.target,
                headers=[[k, v] for k, v in head.headers],
                system=parsed.system,
                messages=parsed.messages,
                tools=parsed.tools,
                parameters=parsed.parameters,
                body=req_raw,
                body_bytes=msg.body_bytes,
                body_truncated=req_truncated,
            ),
            response=resp_rec,
            usage=acc.usage,
            complete=complete,
            missing_bytes=missing,
            truncated=truncated,
            closed_early=closed_early,
            error=error,
        )
        try:
            self.conversations.assign(ex, parsed.tool_result_ids, parsed.previous_response_id)
        except Exception:
            self._count("conversation_errors")
        self._count("exchanges")
        if acc.bad_events:
            self._count("bad_stream_events", acc.bad_events)
        if error is not None:
            self._count(f"exchanges_error_{error.kind}")
        return ex

    def _parse_whole_response(self, msg: _Msg, whole: bool) -> None:
        acc = msg.acc
        if not msg.resp_body:
            return
        try:
            body = json.loads(msg.resp_body)
        except ValueError as e:
            status = msg.resp_head.status if msg.resp_head else 0
            if status < 400:
                acc.set_error(
                    "parse_error" if whole else "incomplete",
                    f"response body is not JSON: {e}" if whole else "response body incomplete",
                )
            return
        msg.det.fmt.parse_response(body, acc)
        if not (acc.text_parts or acc.tool_calls or acc.error or acc.embeddings is not None or acc.thinking_parts):
            # the body is not in the format the request suggested (a gateway answering its own way): read it by shape
            _GENERIC.parse_response(body, acc)

    def _count(self, what: str, n: int = 1) -> None:
        self.stats[what] += n
        COUNTERS[what] += n


# A request body cut by a gap or a limit is not JSON; its first bytes usually still name the model.
SALVAGE_BYTES = 64 * 1024
_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_STREAM_RE = re.compile(rb'"stream"\s*:\s*(true|false)')


def _salvage(head: bytes, parsed: ParsedRequest) -> None:
    m = _MODEL_RE.search(head)
    if m and parsed.model is None:
        parsed.model = m.group(1).decode("utf-8", "replace")
    m = _STREAM_RE.search(head)
    if m and parsed.stream is None:
        parsed.stream = m.group(1) == b"true"


def _exchange_id(ctx: ConnContext, mid: int, start_ns: int) -> str:
    """Stable: the same capture replayed gives the same id (no randomness, no clock read)."""
    h = hashlib.blake2b(f"{ctx.pid}:{ctx.conn}:{mid}:{start_ns}:{ctx.clock_offset_ns}".encode(), digest_size=16)
    return str(uuid.UUID(bytes=h.digest()))
