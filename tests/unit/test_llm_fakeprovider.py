"""The fake provider over real TLS on 127.0.0.1, HTTP/1.1 and h2, spoken to by the official SDKs.

No root needed: this checks the server that e2e tests point real clients at
answers in formats the SDKs accept, and that streams leave it piece by piece.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator

import httpx
import pytest

from tests.fakeprovider import FakeProvider, reply
from tests.tlsserver import Certs

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")


@pytest.fixture(scope="module")
def fake(certs: Certs) -> Iterator[FakeProvider]:
    with FakeProvider(certs.cert, certs.key) as fp:
        yield fp


@pytest.mark.parametrize("h2", [False, True])
def test_openai_sdk_chat_and_responses(fake: FakeProvider, certs: Certs, h2: bool) -> None:
    http = httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca)), http2=h2)
    client = openai.OpenAI(api_key="sk-test", base_url=fake.url + "/v1", http_client=http, max_retries=0)
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from gpt-4o-mini! You said: hi"
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    resp = client.responses.create(model="gpt-4.1", input="yo")
    assert resp.output_text == "Hello from gpt-4.1! You said: yo"
    assert http.get(fake.url + "/v1/models").http_version == ("HTTP/2" if h2 else "HTTP/1.1")


@pytest.mark.parametrize("h2", [False, True])
def test_anthropic_sdk_stream_with_tools(fake: FakeProvider, certs: Certs, h2: bool) -> None:
    client = anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url=fake.url,
        max_retries=0,
        http_client=httpx2.Client(verify=ssl.create_default_context(cafile=str(certs.ca)), http2=h2),
    )
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    with client.messages.stream(
        model="claude-x", max_tokens=100, tools=tools, messages=[{"role": "user", "content": "Weather?"}]
    ) as s:
        msg = s.get_final_message()
    assert msg.stop_reason == "tool_use"
    assert [b.input for b in msg.content if b.type == "tool_use"] == [{"city": "Paris"}]


def test_errors_like_the_real_apis(fake: FakeProvider, certs: Certs) -> None:
    client = openai.OpenAI(
        api_key="sk-test",
        base_url=fake.url + "/v1",
        max_retries=0,
        http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca))),
    )
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="error-400", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"


def test_streams_leave_in_pieces(fake: FakeProvider, certs: Certs) -> None:
    """Each SSE event is its own write, so a capture sees first-token time before the end."""
    with httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca))) as http:
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * 50}], "stream": True}
        with http.stream("POST", fake.url + "/v1/chat/completions", json=body) as r:
            pieces = list(r.iter_raw())
    assert len(pieces) > 5 and all(p.endswith(b"\n\n") for p in pieces)


@pytest.mark.parametrize(
    "path,query,req,ctype",
    [
        (
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            "alt=sse",
            {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
            "text/event-stream",
        ),
        (
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            "",
            {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
            "application/json",
        ),
        (
            "/api/chat",
            "",
            {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
            "application/x-ndjson",
        ),
        (
            "/model/amazon.nova-pro-v1:0/converse-stream",
            "",
            {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
            "application/vnd.amazon.eventstream",
        ),
    ],
)
def test_other_formats(fake: FakeProvider, certs: Certs, path: str, query: str, req: dict, ctype: str) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca)), http2=True) as http:
        r = http.post(fake.url + path + (f"?{query}" if query else ""), json=req)
    assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
    expect = reply("POST", path, query, [], json.dumps(req).encode())
    assert r.content == expect.body


def test_subprocess_helper(certs: Certs) -> None:
    from tests.fakeprovider import start_subprocess

    proc, url = start_subprocess(certs.cert, certs.key)
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca))) as http:
            r = http.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False})
        assert r.json()["response"] == "Hello from llama3.2! You said: hi"
    finally:
        proc.terminate()
        proc.wait(10)
