"""Test helpers: realistic HTTP byte streams and replay in several splittings.

A recording is what the TLS probes would see on one connection: a list of
(direction, plaintext bytes, ts_ns) in time order. HTTP/1.1 streams are
serialized by h11 (a real client and a real server state machine); HTTP/2
streams by two h2 Connections talking to each other in memory, so the bytes
are exactly what a TLS library would encrypt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import h11

from llmspyd.chunks import Direction
from llmspyd.protocols.events import RequestData, ResponseData

W, R = Direction.WRITE, Direction.READ
Recording = list[tuple[Direction, bytes, int]]


class Clock:
    def __init__(self, start: int = 1_000) -> None:
        self.t = start

    def __call__(self) -> int:
        self.t += 1_000
        return self.t


def h11_exchange(
    rec: Recording,
    clock: Clock,
    client: h11.Connection,
    server: h11.Connection,
    request: h11.Request,
    request_body: list[bytes],
    response: h11.Response,
    response_body: list[bytes],
    *,
    trailers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """One request/response serialized by h11 on both sides, appended to `rec`."""
    out = client.send(request)
    for piece in request_body:
        out += client.send(h11.Data(data=piece))
    out += client.send(h11.EndOfMessage())
    rec.append((W, out, clock()))
    server.receive_data(out)
    while True:
        ev = server.next_event()
        if ev is h11.NEED_DATA or isinstance(ev, h11.EndOfMessage):
            break
    sent = [server.send(response)]
    sent += [server.send(h11.Data(data=piece)) for piece in response_body]
    sent.append(server.send(h11.EndOfMessage(headers=trailers or [])))
    for piece in sent:
        if piece:
            rec.append((R, piece, clock()))
    client.receive_data(b"".join(sent))  # keep the client's state machine in step
    while True:
        ev = client.next_event()
        if ev is h11.NEED_DATA or isinstance(ev, h11.EndOfMessage) or ev is h11.PAUSED:
            break
    client.start_next_cycle()
    server.start_next_cycle()


def split_random(rec: Recording, rng: random.Random, max_pieces: int = 6) -> Recording:
    out: Recording = []
    for d, data, ts in rec:
        if len(data) < 2:
            out.append((d, data, ts))
            continue
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, max_pieces))))
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            out.append((d, data[a:b], ts))
    return out


def split_at(rec: Recording, cuts: Iterable[int]) -> Recording:
    """Split the items at absolute positions of the concatenated recording (Hypothesis-driven)."""
    cutset = set(cuts)
    out: Recording = []
    pos = 0
    for d, data, ts in rec:
        start = 0
        for i in range(1, len(data)):
            if pos + i in cutset:
                out.append((d, data[start:i], ts))
                start = i
        out.append((d, data[start:], ts))
        pos += len(data)
    return out


def bytewise(rec: Recording) -> Recording:
    return [(d, data[i : i + 1], ts) for d, data, ts in rec for i in range(len(data))]


def replay(conn, rec: Recording, *, close_ts: int | None = None) -> list:
    events = []
    for d, data, ts in rec:
        events += conn.receive(d, data, ts)
    if close_ts is not None:
        events += conn.close(close_ts)
    return events


def normalize(events: list) -> dict:
    """Per msg event list, with consecutive body pieces joined (ts of the last piece)."""
    per: dict = {}
    for ev in events:
        key = getattr(ev, "msg", None)
        if key is None:
            key = ("conn",)
        lst = per.setdefault(key, [])
        if isinstance(ev, (RequestData, ResponseData)) and lst and type(lst[-1]) is type(ev):
            prev = lst[-1]
            lst[-1] = type(ev)(ev.msg, ev.ts_ns, prev.data + ev.data)
        else:
            lst.append(ev)
    return per


def tr(make_conn: Callable[[], object], rec: Recording, *, close_ts: int | None = None, seed: int = 0) -> dict:
    """Replay whole, one byte at a time and split at random points; all must agree. Returns the events."""
    whole = normalize(replay(make_conn(), rec, close_ts=close_ts))
    assert normalize(replay(make_conn(), bytewise(rec), close_ts=close_ts)) == whole
    rng = random.Random(seed)
    for _ in range(3):
        assert normalize(replay(make_conn(), split_random(rec, rng), close_ts=close_ts)) == whole
    return whole


def body(events: list, msg: int, kind: type) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, kind) and e.msg == msg)


def kinds(events: list, msg: int | None = None) -> list[str]:
    return [type(e).__name__ for e in events if msg is None or getattr(e, "msg", None) == msg]


class H2Pair:
    """A real h2 client and server talking in memory; every byte each sends is recorded.

    The client's bytes are the traced process's writes, the server's its reads.
    """

    def __init__(
        self, clock: Clock | None = None, *, client_settings: dict | None = None, server_settings: dict | None = None
    ) -> None:
        import h2.config
        import h2.connection

        self.clock = clock or Clock()
        self.rec: Recording = []
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False)
        )
        self.client.initiate_connection()
        self.server.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        if server_settings:
            self.server.update_settings(server_settings)
        self.server_events: list = []
        self.client_events: list = []
        self.flush()

    def flush(self) -> None:
        """Deliver whatever each side has queued to the other, recording it, until both are quiet."""
        while True:
            moved = False
            out = self.client.data_to_send()
            if out:
                self.rec.append((W, out, self.clock()))
                self.server_events += self.server.receive_data(out)
                moved = True
            out = self.server.data_to_send()
            if out:
                self.rec.append((R, out, self.clock()))
                self.client_events += self.client.receive_data(out)
                moved = True
            if not moved:
                return

    def request(
        self, path: str, body: bytes = b"", *, method: str = "POST", extra: list | None = None, end: bool = True
    ) -> int:
        sid = self.client.get_next_available_stream_id()
        headers = [
            (":method", method),
            (":path", path),
            (":scheme", "https"),
            (":authority", "api.example"),
            ("content-type", "application/json"),
            *(extra or []),
        ]
        self.client.send_headers(sid, headers, end_stream=not body and end)
        if body:
            self.client.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def respond(
        self,
        sid: int,
        status: int = 200,
        pieces: list[bytes] = (),
        *,
        headers: list | None = None,
        trailers: list | None = None,
        pad: int | None = None,
        end: bool = True,
    ) -> None:
        self.server.send_headers(
            sid, [(":status", str(status)), *(headers or [])], end_stream=not pieces and not trailers and end
        )
        self.flush()
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1 and not trailers and end
            self.server.send_data(sid, piece, end_stream=last, pad_length=pad)
            self.flush()
        if trailers:
            self.server.send_headers(sid, trailers, end_stream=True)
            self.flush()


_ALLOWED_AFTER = {
    # event kind -> stages it may follow (-1: nothing yet for this msg)
    "RequestHead": {-1},
    "RequestData": {0, 1},
    "RequestEnd": {0, 1},
    "ResponseHead": {2},
    "ResponseData": {3, 4},
    "ResponseEnd": {3, 4},
}
_STAGE = {"RequestHead": 0, "RequestData": 1, "RequestEnd": 2, "ResponseHead": 3, "ResponseData": 4, "ResponseEnd": 5}


def check_contract(events: list) -> None:
    """The per-msg order promised in protocols/events.py holds, and nothing follows an end."""
    stage: dict[int, int] = {}
    for ev in events:
        kind = type(ev).__name__
        if kind == "ConnectionInfo":
            continue
        prev = stage.get(ev.msg, -1)
        assert prev not in (5, 6), f"{kind} after the end of msg {ev.msg}"
        if kind == "MessageBroken":
            stage[ev.msg] = 6
            continue
        assert prev in _ALLOWED_AFTER[kind], f"{kind} after stage {prev} in msg {ev.msg}"
        stage[ev.msg] = _STAGE[kind]
