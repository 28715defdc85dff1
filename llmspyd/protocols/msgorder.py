"""One request/response pair as the parsers see it: event order, decoding, breakage.

Shared by HTTP/1.1 and HTTP/2. It guarantees the per-msg order promised in
`events.py` (request events, then response events) even when the wire does
not: a server may answer before the request body is complete (100-continue
refused, early 4xx, HTTP/2 responses mid-upload). Response events are held
until the request ends; if the response completes first, the request is
ended there (later request bytes no longer matter to the exchange, they are
counted) and the held response follows.

Once a msg is broken, everything else for it is swallowed: the parser keeps
framing the bytes, the consumer sees nothing more.
"""

from __future__ import annotations

from llmspyd.protocols.decode import BodyDecoder, decoder_for
from llmspyd.protocols.errors import DecodeError
from llmspyd.protocols.events import (
    Headers,
    HttpEvent,
    MessageBroken,
    RequestData,
    RequestEnd,
    RequestHead,
    ResponseData,
    ResponseEnd,
    ResponseHead,
)

# request side progress
_REQ_NONE, _REQ_HEAD, _REQ_ENDED = 0, 1, 2


class Msg:
    __slots__ = (
        "broken",
        "counters",
        "held",
        "id",
        "method",
        "out",
        "req_decoder",
        "req_state",
        "req_ts",
        "resp_decoder",
        "resp_ended",
        "resp_started",
    )

    def __init__(self, msg_id: int, out: list[HttpEvent], counters: dict[str, int], req_ts: int = 0) -> None:
        self.id = msg_id
        self.out = out  # the owning parser's output list (swapped by the parser per call)
        self.counters = counters
        self.req_ts = req_ts
        self.method = ""
        self.req_state = _REQ_NONE
        self.resp_started = False
        self.resp_ended = False
        self.broken = False
        self.held: list[HttpEvent] = []
        self.req_decoder: BodyDecoder | None = None
        self.resp_decoder: BodyDecoder | None = None

    @property
    def request_ended(self) -> bool:
        return self.req_state == _REQ_ENDED

    @property
    def done(self) -> bool:
        return self.broken or (self.req_state == _REQ_ENDED and self.resp_ended)

    # -- request side -------------------------------------------------------------------

    def request_head(self, ev: RequestHead) -> None:
        if self.broken:
            return
        self.req_ts = ev.ts_ns
        self.method = ev.method
        self.req_state = _REQ_HEAD
        self.out.append(ev)
        try:
            self.req_decoder = decoder_for(ev.headers)
        except DecodeError as e:
            self.break_(ev.ts_ns, e.reason, str(e))

    def request_data(self, data: bytes, ts_ns: int) -> None:
        if self.broken or not data:
            return
        if self.req_state == _REQ_ENDED:
            self.counters["request_bytes_after_response"] = self.counters.get("request_bytes_after_response", 0) + len(
                data
            )
            return
        if self.req_decoder is not None:
            try:
                data = self.req_decoder.feed(data)
            except DecodeError as e:
                self.break_(ts_ns, e.reason, f"request body: {e}")
                return
            if not data:
                return
        self.out.append(RequestData(self.id, ts_ns, data))

    def request_end(self, ts_ns: int, trailers: Headers | None = None) -> None:
        if self.broken or self.req_state == _REQ_ENDED:
            return
        if self.req_decoder is not None:
            try:
                tail = self.req_decoder.finish()
            except DecodeError as e:
                self.break_(ts_ns, e.reason, f"request body: {e}")
                return
            if tail:
                self.out.append(RequestData(self.id, ts_ns, tail))
        self.req_state = _REQ_ENDED
        self.out.append(RequestEnd(self.id, ts_ns, trailers or []))
        if self.held:
            self.out.extend(self.held)
            self.held = []

    # -- response side ------------------------------------------------------------------

    def _resp(self, ev: HttpEvent) -> None:
        if self.req_state == _REQ_ENDED:
            self.out.append(ev)
        else:
            self.held.append(ev)

    def response_head(self, ev: ResponseHead) -> None:
        if self.broken:
            return
        self.resp_started = True
        self._resp(ev)
        try:
            self.resp_decoder = decoder_for(ev.headers)
        except DecodeError as e:
            self.break_(ev.ts_ns, e.reason, str(e))

    def response_data(self, data: bytes, ts_ns: int) -> None:
        if self.broken or not data:
            return
        if self.resp_decoder is not None:
            try:
                data = self.resp_decoder.feed(data)
            except DecodeError as e:
                self.break_(ts_ns, e.reason, f"response body: {e}")
                return
            if not data:
                return
        self._resp(ResponseData(self.id, ts_ns, data))

    def response_end(self, ts_ns: int, trailers: Headers | None = None) -> None:
        if self.broken or self.resp_ended:
            return
        if self.resp_decoder is not None:
            try:
                tail = self.resp_decoder.finish()
            except DecodeError as e:
                self.break_(ts_ns, e.reason, f"response body: {e}")
                return
            if tail:
                self._resp(ResponseData(self.id, ts_ns, tail))
        self.resp_ended = True
        if self.req_state != _REQ_ENDED:
            # the server answered in full before the request was complete: the exchange
            # is decided, so end the request here and let the held response through
            self.counters["early_responses"] = self.counters.get("early_responses", 0) + 1
            self.req_decoder = None
            self.request_end(ts_ns)
        self.out.append(ResponseEnd(self.id, ts_ns, trailers or []))

    # -- breakage -----------------------------------------------------------------------

    def break_(self, ts_ns: int, reason: str, detail: str = "", missing_bytes: int = 0) -> None:
        """No more events for this msg; what was delivered stays valid."""
        if self.broken or (self.req_state == _REQ_ENDED and self.resp_ended):
            return
        self.broken = True
        key = "broken_" + reason
        self.counters[key] = self.counters.get(key, 0) + 1
        if self.held:
            # response events held behind an unfinished request cannot be delivered
            # without breaking the per-msg order; count them instead of hiding the loss
            self.counters["held_events_dropped"] = self.counters.get("held_events_dropped", 0) + len(self.held)
            self.held = []
        self.req_decoder = self.resp_decoder = None
        self.out.append(MessageBroken(self.id, ts_ns, reason, detail, missing_bytes))
