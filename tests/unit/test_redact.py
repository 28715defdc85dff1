"""Secrets never leave: redaction of headers, URLs, raw bodies, and the metadata-only mode."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from llmspyd.llm.record import LlmExchange
from llmspyd.sinks import JsonLinesSink, Outputs, Redactor
from llmspyd.sinks.journald import encode_entry, journal_fields

API_KEY = "sk-ant-api03-TESTSECRET0123456789abcdefXYZ"
GOOGLE_KEY = "AIzaSyTESTSECRET-googlekey-0123456789"
COOKIE_VAL = "sessiontoken-0a1b2c3d4e5f"
SAS_SIG = "sv2024sigTESTSECRETvalue%3D"


def exchange() -> LlmExchange:
    body = json.dumps(
        {
            "model": "claude-sonnet-4",
            "messages": [{"role": "user", "content": "please echo my key " + API_KEY}],
            "callback": f"https://example.com/hook?key={GOOGLE_KEY}&x=1",
            "api_key": API_KEY,
        }
    )
    return LlmExchange.model_validate(
        {
            "id": "ex-1",
            "provider": "anthropic",
            "api": "messages",
            "model": "claude-sonnet-4",
            "process": {"pid": 4242, "comm": "claude", "exe": "/usr/bin/claude", "cmdline": ["claude", "-p", "hi"]},
            "request": {
                "method": "POST",
                "path": f"/v1beta/models/gemini:generateContent?key={GOOGLE_KEY}&alt=sse&sig={SAS_SIG}",
                "headers": [
                    ["host", "api.anthropic.com"],
                    ["x-api-key", API_KEY],
                    ["authorization", f"Bearer {API_KEY}"],
                    ["x-goog-api-key", GOOGLE_KEY],
                    ["cookie", f"sid={COOKIE_VAL}; theme=dark"],
                    ["content-type", "application/json"],
                ],
                "system": "You are terse.",
                "messages": [{"role": "user", "content": "please echo my key " + API_KEY}],
                "body": body,
                "body_bytes": len(body),
            },
            "response": {
                "status": 200,
                "headers": [["set-cookie", f"sid={COOKIE_VAL}; Path=/"], ["content-type", "text/event-stream"]],
                "text": "Your key is " + API_KEY,
                "body": f'{{"echo":"{API_KEY}"}}',
            },
            "usage": {"input_tokens": 12, "output_tokens": 7},
            "latency_ms": 812.5,
            "complete": True,
        }
    )


SECRETS = (API_KEY, GOOGLE_KEY, COOKIE_VAL, SAS_SIG)


def dumped(rec: dict) -> str:
    return json.dumps(rec)


def test_no_secret_anywhere_by_default() -> None:
    out = Redactor()(exchange().model_dump(mode="json"))
    text = dumped(out)
    for s in SECRETS:
        assert s not in text, s
    headers = dict(out["request"]["headers"])
    assert headers["authorization"] == "Bearer REDACTED"
    assert headers["x-api-key"] == "REDACTED"
    assert headers["host"] == "api.anthropic.com"  # harmless headers stay
    assert "alt=sse" in out["request"]["path"] and "key=REDACTED" in out["request"]["path"]
    assert json.loads(out["request"]["body"])["api_key"] == "REDACTED"
    # the prompt text stays, only the key inside it goes
    assert out["request"]["messages"][0]["content"] == "please echo my key REDACTED"


def test_input_not_mutated() -> None:
    rec = exchange().model_dump(mode="json")
    before = dumped(rec)
    Redactor()(rec)
    assert dumped(rec) == before


def test_query_params_in_text() -> None:
    r = Redactor()
    for url, keep in [
        ("GET /x?access_token=abcdefgh123&b=2", "b=2"),
        ("https://h/p?a=1&apikey=zzzzzzzz99#frag", "#frag"),
        ("form: token=abcdefgh12&user=bob", "user=bob"),
        ("/a?KEY=SecretUpper123", "/a?"),
    ]:
        out = r({"s": url})["s"]
        assert "REDACTED" in out and keep in out, out
    # words that merely contain a param name are left alone
    assert r({"s": "monkey=banana"})["s"] == "monkey=banana"
    assert r({"s": "?keyboard=qwerty"})["s"] == "?keyboard=qwerty"


def test_short_secret_not_replaced_globally() -> None:
    out = Redactor()({"request": {"headers": [["x-api-key", "abc"]], "body": "abc abc"}})
    assert out["request"]["headers"][0][1] == "REDACTED"
    assert out["request"]["body"] == "abc abc"


def test_extra_header_and_param() -> None:
    r = Redactor(extra_headers=["X-Internal-Auth"], extra_params=["session"])
    out = r({"headers": [["x-internal-auth", "verysecretvalue1"]], "path": "/?session=verysecretvalue2"})
    assert "verysecretvalue" not in dumped(out)


def test_content_mode_keeps_metadata_only() -> None:
    out = Redactor(content=True)(exchange().model_dump(mode="json"))
    text = dumped(out)
    for s in SECRETS + ("You are terse", "please echo", "Your key is"):
        assert s not in text, s
    assert out["usage"]["input_tokens"] == 12 and out["model"] == "claude-sonnet-4"
    assert out["request"]["body_bytes"] > 0 and "bytes redacted" in out["request"]["body"]


def test_opt_out_keeps_everything() -> None:
    rec = exchange().model_dump(mode="json")
    assert Redactor(secrets=False)(rec) == rec


def test_every_sink_output_is_clean(tmp_path: Path) -> None:
    """Grep what each sink wrote (stdout lines, file, journal wire bytes) for the keys."""
    stdout = io.StringIO()
    path = tmp_path / "x.jsonl"
    wire: list[bytes] = []

    class WireJournal:
        name = "journald"

        def emit(self, record):  # the exact bytes JournaldSink would send
            wire.append(encode_entry(journal_fields(record)))

        def close(self):
            pass

    outs = Outputs([JsonLinesSink(stdout), JsonLinesSink(path=str(path)), WireJournal()])
    outs(exchange())
    outs.close()
    blobs = [stdout.getvalue().encode(), path.read_bytes(), b"".join(wire)]
    assert all(b"claude-sonnet-4" in b for b in blobs)  # the sinks did write the record
    for blob in blobs:
        for s in SECRETS:
            assert s.encode() not in blob
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_broken_sink_does_not_stop_others() -> None:
    class Boom:
        name = "boom"

        def emit(self, record):
            raise OSError("disk full")

        def close(self):
            pass

    stdout = io.StringIO()
    outs = Outputs([Boom(), JsonLinesSink(stdout)])
    outs(exchange())
    assert outs.errors["boom"] == 1 and stdout.getvalue().count("\n") == 1


@pytest.mark.parametrize("spec", ["syslog", "jsonl", "jsonl:", "stdout:x"])
def test_bad_sink_spec(spec: str) -> None:
    from llmspyd.sinks import SinkSpecError, parse_spec

    with pytest.raises(SinkSpecError):
        parse_spec(spec)
