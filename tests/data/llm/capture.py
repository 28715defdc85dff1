"""Record real captured TLS chunk streams of real clients (needs root and the built BPF objects).

    sudo PYTHONPATH=. .venv/bin/python tests/data/llm/capture.py

The fake provider runs in this process (the capture never traces its own
process); each client runs as a subprocess and every TlsChunk/ConnClosed of
its pid is written to captured/<name>.jsonl, exactly as the ring buffer
delivered it. tests/unit/test_llm_captured.py replays these through the
pipeline. Expected records: `python -m tests.unit.test_llm_captured --regen`.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from llmspyd.capture.session import CaptureSession  # noqa: E402
from llmspyd.chunks import ConnClosed, TlsChunk  # noqa: E402
from tests.fakeprovider import FakeProvider  # noqa: E402
from tests.tlsserver import client_env, make_certs  # noqa: E402

OUT = HERE / "captured"
KEY = "sk-test-captured-0123456789"


def clients(url: str) -> dict[str, list[str]]:
    py = [sys.executable, "-c"]
    return {
        "openai_sdk_chat_stream_h1": py
        + [
            f"""
import openai
c = openai.OpenAI(base_url={url + "/v1"!r}, api_key={KEY!r})
s = c.chat.completions.create(model="gpt-4o-mini", stream=True, stream_options={{"include_usage": True}},
    messages=[{{"role": "system", "content": "Be brief."}}, {{"role": "user", "content": "Capital of France?"}}])
print("".join(ch.choices[0].delta.content or "" for ch in s if ch.choices))
"""
        ],
        "openai_sdk_h2_tools_then_result": py
        + [
            f"""
import httpx, openai
c = openai.OpenAI(base_url={url + "/v1"!r}, api_key={KEY!r}, http_client=httpx.Client(http2=True))
tools = [{{"type": "function", "function": {{"name": "get_weather", "parameters": {{"type": "object"}}}}}}]
msgs = [{{"role": "user", "content": "Weather in Paris?"}}]
r = c.chat.completions.create(model="gpt-4o", messages=msgs, tools=tools)
call = r.choices[0].message.tool_calls[0]
msgs += [r.choices[0].message.model_dump(exclude_none=True),
         {{"role": "tool", "tool_call_id": call.id, "content": "18C"}}]
print(c.chat.completions.create(model="gpt-4o", messages=msgs, tools=tools).choices[0].message.content)
"""
        ],
        "anthropic_sdk_stream_thinking": py
        + [
            f"""
import anthropic
c = anthropic.Anthropic(base_url={url!r}, api_key={KEY!r})
with c.messages.stream(model="claude-sonnet-4-5", max_tokens=2048, thinking={{"type": "enabled", "budget_tokens": 1024}},
                       system="Be brief.", messages=[{{"role": "user", "content": "Say hello."}}]) as s:
    print(s.get_final_text())
"""
        ],
        "node_fetch_responses_stream": [
            "node",
            "-e",
            f"""
(async () => {{
  const r = await fetch({url + "/v1/responses"!r}, {{method: "POST",
    headers: {{"content-type": "application/json", "authorization": "Bearer {KEY}"}},
    body: JSON.stringify({{model: "gpt-4.1", input: "Hello from node", stream: true}})}});
  console.log((await r.text()).length);
}})();
""",
        ],
        "curl_h2_gemini_sse": [
            "curl",
            "-sS",
            "--http2",
            f"{url}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            "-H",
            f"x-goog-api-key: {KEY}",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps({"contents": [{"role": "user", "parts": [{"text": "Hi from curl"}]}]}),
        ],
        "curl_h1_ollama_ndjson": [
            "curl",
            "-sS",
            "--http1.1",
            f"{url}/api/chat",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}]}),
        ],
    }


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("needs root")
    OUT.mkdir(exist_ok=True)
    events: list = []
    lock = threading.Lock()

    def sink(batch: list) -> None:
        with lock:
            events.extend(batch)

    certs = make_certs(Path(tempfile.mkdtemp()))
    env = client_env(certs)
    with CaptureSession(sink, poll_ms=20) as _, FakeProvider(certs.cert, certs.key) as fake:
        for name, argv in clients(fake.url).items():
            p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stdout, stderr = p.communicate(timeout=120)
            if p.returncode != 0:
                print(f"{name}: client failed: {stderr[-500:]}")
                continue
            time.sleep(0.5)  # let the ring drain
            with lock:
                mine = [e for e in events if isinstance(e, (TlsChunk, ConnClosed)) and e.pid == p.pid]
            lines = []
            for e in mine:
                if isinstance(e, TlsChunk):
                    lines.append(
                        {
                            "kind": "chunk",
                            "ts_ns": e.ts_ns,
                            "pid": e.pid,
                            "tid": e.tid,
                            "comm": e.comm,
                            "conn": e.conn,
                            "direction": int(e.direction),
                            "offset": e.offset,
                            "call_len": e.call_len,
                            "stack": int(e.stack),
                            "first": e.first,
                            "last": e.last,
                            "truncated": e.truncated,
                            "fault": e.fault,
                            "fd": e.fd,
                            "data": base64.b64encode(e.data).decode(),
                        }
                    )
                else:
                    lines.append(
                        {"kind": "closed", "ts_ns": e.ts_ns, "pid": e.pid, "conn": e.conn, "stack": int(e.stack)}
                    )
            (OUT / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            print(f"{name}: {len(lines)} events, stdout {stdout.strip()[:60]!r}")


if __name__ == "__main__":
    main()
