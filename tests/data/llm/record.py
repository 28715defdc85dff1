"""Regenerate the recorded LLM exchanges in this folder.

    PYTHONPATH=. .venv/bin/python tests/data/llm/record.py

Where an official SDK is installed (openai, anthropic), the request bytes
and headers are the SDK's own, captured by an httpx mock transport whose
answer is the fake provider's (tests/fakeprovider.py, built after the API
references). For Gemini, Ollama and Bedrock the requests are written out as
their SDKs send them (google-genai, ollama-python, botocore). Each case is a
folder: case.json (head, status, headers, how the response was flushed),
request.bin, response.bin. The expected records next to them are made by
`python -m tests.unit.llm_cases --regen` and reviewed by hand.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from pathlib import Path
from typing import Any
from collections.abc import Callable

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from tests import fakeprovider  # noqa: E402
from tests.fakeprovider import Reply  # noqa: E402

FAKE_OPENAI_KEY = "sk-proj-FAKEfakeFAKEfake0123456789"
FAKE_ANTHROPIC_KEY = "sk-ant-api03-FAKEfakeFAKE0123456789"
FAKE_GOOGLE_KEY = "AIzaSyFAKEfakeFAKEfake0123456789"


def save(
    name: str,
    description: str,
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes,
    r: Reply,
    http_version: str = "1.1",
) -> None:
    u = urllib.parse.urlsplit(url)
    target = u.path + (f"?{u.query}" if u.query else "")
    d = HERE / name
    d.mkdir(exist_ok=True)
    (d / "request.bin").write_bytes(body)
    (d / "response.bin").write_bytes(r.body)
    case = {
        "description": description,
        "method": method,
        "target": target,
        "authority": u.netloc,
        "http_version": http_version,
        "request_headers": [[k.lower(), v] for k, v in headers],
        "status": r.status,
        "response_headers": [[k, v] for k, v in r.headers],
        "response_chunks": [len(c) for c in r.chunks],
    }
    (d / "case.json").write_text(json.dumps(case, indent=1) + "\n")
    print(f"{name}: {len(body)} B request, {len(r.body)} B response in {len(r.chunks)} pieces")


def capture(
    run: Callable[[httpx.BaseTransport], Any], patch: Callable[[Reply], Reply] | None = None, httpx_mod: Any = httpx
) -> tuple[str, str, list[tuple[str, str]], bytes, Reply]:
    """Run an SDK call against a mock transport; return what it sent and what it was answered."""
    seen: dict[str, Any] = {}

    def handler(request: Any) -> Any:
        body = request.read()
        r = fakeprovider.reply(
            request.method,
            request.url.path,
            request.url.query.decode() if isinstance(request.url.query, bytes) else str(request.url.query),
            [],
            body,
        )
        if patch:
            r = patch(r)
        seen.update(method=request.method, url=str(request.url), headers=list(request.headers.raw), body=body, reply=r)
        return httpx_mod.Response(r.status, headers=r.headers, content=r.body)

    try:
        run(httpx_mod.MockTransport(handler))
    except Exception as e:  # error cases: the SDK raises, the exchange is still recorded
        print(f"  (SDK raised {type(e).__name__})")
    hdrs = [
        (k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
        for k, v in seen["headers"]
    ]
    return seen["method"], seen["url"], hdrs, seen["body"], seen["reply"]


def openai_cases() -> None:
    import openai

    def client(t: httpx.BaseTransport, base: str = "https://api.openai.com/v1", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=FAKE_OPENAI_KEY, base_url=base, http_client=httpx.Client(transport=t), max_retries=0, **kw
        )

    weather = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    msgs = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello in one line."},
    ]

    def drain(stream: Any) -> None:
        for _ in stream:
            pass

    cases: list[tuple[str, str, Callable[[httpx.BaseTransport], Any], Callable[[Reply], Reply] | None]] = [
        (
            "openai_chat",
            "OpenAI SDK chat.completions.create, not streamed",
            lambda t: client(t).chat.completions.create(
                model="gpt-4o-mini", messages=msgs, temperature=0.2, max_tokens=64
            ),
            None,
        ),
        (
            "openai_chat_stream",
            "OpenAI SDK chat stream with stream_options.include_usage (final usage chunk)",
            lambda t: drain(
                client(t).chat.completions.create(
                    model="gpt-4o-mini", messages=msgs, stream=True, stream_options={"include_usage": True}
                )
            ),
            None,
        ),
        (
            "openai_chat_tools_stream",
            "chat stream whose answer is a tool call (tool_calls deltas by index)",
            lambda t: drain(
                client(t).chat.completions.create(
                    model="gpt-4o",
                    messages=[{"role": "user", "content": "Weather in Paris?"}],
                    tools=weather,
                    stream=True,
                )
            ),
            None,
        ),
        (
            "openai_chat_tool_result",
            "follow-up request carrying the tool result (tool_call_id)",
            lambda t: client(t).chat.completions.create(
                model="gpt-4o",
                tools=weather,
                messages=[
                    {"role": "user", "content": "Weather in Paris?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_Qx7fake1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_Qx7fake1", "content": "18°C, sunny"},
                ],
            ),
            None,
        ),
        (
            "openai_chat_error_404",
            "unknown model: OpenAI error body with 404",
            lambda t: client(t).chat.completions.create(model="error-400", messages=msgs),
            None,
        ),
        (
            "openai_chat_stream_error",
            "error object in the middle of a chat stream",
            lambda t: drain(client(t).chat.completions.create(model="error-stream", messages=msgs, stream=True)),
            None,
        ),
        (
            "openai_responses",
            "Responses API, not streamed, with instructions",
            lambda t: client(t).responses.create(model="gpt-4.1", instructions="Answer in French.", input="Say hello."),
            None,
        ),
        (
            "openai_responses_stream",
            "Responses API stream: created, in_progress, output_item/content_part, deltas, completed",
            lambda t: drain(
                client(t).responses.create(
                    model="gpt-4.1", input=[{"role": "user", "content": "Say hello."}], stream=True
                )
            ),
            None,
        ),
        (
            "openai_responses_tools_stream",
            "Responses stream with a function call (function_call_arguments.delta)",
            lambda t: drain(
                client(t).responses.create(
                    model="gpt-4.1",
                    input="Weather in Paris?",
                    stream=True,
                    tools=[
                        {
                            "type": "function",
                            "name": "get_weather",
                            "description": "Current weather in a city",
                            "parameters": weather[0]["function"]["parameters"],
                        }
                    ],
                )
            ),
            None,
        ),
        (
            "openai_responses_tool_result",
            "Responses follow-up: function_call_output with call_id, previous_response_id",
            lambda t: client(t).responses.create(
                model="gpt-4.1",
                previous_response_id="resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
                input=[{"type": "function_call_output", "call_id": "call_fake_resp_1", "output": "18°C, sunny"}],
            ),
            None,
        ),
        (
            "openai_responses_stream_error",
            "Responses stream ending in an error event",
            lambda t: drain(client(t).responses.create(model="error-stream", input="Say hello.", stream=True)),
            None,
        ),
        (
            "openai_responses_reasoning_stream",
            "Responses stream with a reasoning summary (reasoning_summary_text.delta)",
            lambda t: drain(
                client(t).responses.create(
                    model="o4-mini", input="Say hello.", stream=True, reasoning={"effort": "low", "summary": "auto"}
                )
            ),
            None,
        ),
        (
            "deepseek_reasoner_stream",
            "DeepSeek reasoner: chat stream with reasoning_content deltas before the answer",
            lambda t: drain(
                client(t, "https://api.deepseek.com/v1").chat.completions.create(
                    model="deepseek-reasoner", messages=msgs, stream=True
                )
            ),
            None,
        ),
        (
            "openai_completions",
            "legacy completions, not streamed",
            lambda t: client(t).completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=20),
            None,
        ),
        (
            "openai_completions_stream",
            "legacy completions streamed",
            lambda t: drain(
                client(t).completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello", stream=True)
            ),
            None,
        ),
        (
            "openai_embeddings",
            "embeddings of two inputs",
            lambda t: client(t).embeddings.create(
                model="text-embedding-3-small", input=["hello", "world"], dimensions=8, encoding_format="float"
            ),
            None,
        ),
        (
            "openrouter_chat_stream",
            "OpenRouter: OpenAI format, SSE keep-alive comments before the first chunk",
            lambda t: drain(
                client(t, "https://openrouter.ai/api/v1").chat.completions.create(
                    model="anthropic/claude-3.5-haiku", messages=msgs, stream=True
                )
            ),
            lambda r: Reply(
                r.status, r.headers, [b": OPENROUTER PROCESSING\n\n", b": OPENROUTER PROCESSING\n\n"] + r.chunks
            ),
        ),
        (
            "vllm_chat_stream",
            "self-hosted vLLM (unknown host): OpenAI-compatible, found from path and body",
            lambda t: drain(
                client(t, "https://gpu-box.internal:8000/v1").chat.completions.create(
                    model="meta-llama/Llama-3.1-8B-Instruct", messages=msgs, stream=True
                )
            ),
            None,
        ),
        (
            "litellm_chat",
            "LiteLLM proxy: unknown host, known by its x-litellm response headers",
            lambda t: client(t, "https://llm-gateway.corp.example:4000").chat.completions.create(
                model="claude-3-5-sonnet", messages=msgs
            ),
            lambda r: Reply(
                r.status, r.headers + [("x-litellm-model-id", "9f3c0d"), ("x-litellm-version", "1.52.0")], r.chunks
            ),
        ),
        (
            "ollama_openai_chat",
            "Ollama's OpenAI-compatible endpoint on port 11434",
            lambda t: client(t, "https://127.0.0.1:11434/v1").chat.completions.create(model="llama3.2", messages=msgs),
            None,
        ),
    ]
    for name, desc, run, patch in cases:
        method, url, headers, body, r = capture(run, patch)
        save(name, desc, method, url, headers, body, r)

    # Azure: /openai/deployments/{deployment}/chat/completions?api-version=...
    def azure(t: httpx.BaseTransport) -> None:
        c = openai.AzureOpenAI(
            api_key="0123fakeazurekey4567",
            api_version="2024-10-21",
            azure_endpoint="https://contoso-eastus.openai.azure.com",
            azure_deployment="gpt4o-prod",
            http_client=httpx.Client(transport=t),
            max_retries=0,
        )
        drain(
            c.chat.completions.create(
                model="gpt-4o", messages=msgs, stream=True, stream_options={"include_usage": True}
            )
        )

    method, url, headers, body, r = capture(azure)
    save("azure_chat_stream", "Azure OpenAI deployment path with api-version", method, url, headers, body, r)


def anthropic_cases() -> None:
    import anthropic
    import httpx2

    def client(t: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key=FAKE_ANTHROPIC_KEY, http_client=httpx2.Client(transport=t), max_retries=0)

    tools = [
        {
            "name": "get_weather",
            "description": "Current weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    ]
    system = [{"type": "text", "text": "You are a terse assistant.", "cache_control": {"type": "ephemeral"}}]

    def drain(stream: Any) -> None:
        for _ in stream:
            pass

    cases = [
        (
            "anthropic_messages",
            "Anthropic SDK messages.create, not streamed, system as cached blocks",
            lambda t: client(t).messages.create(
                model="claude-sonnet-4-5",
                max_tokens=256,
                system=system,
                messages=[{"role": "user", "content": "Say hello."}],
            ),
        ),
        (
            "anthropic_messages_stream_thinking",
            "streamed with extended thinking (thinking_delta, signature_delta)",
            lambda t: drain(
                client(t).messages.create(
                    model="claude-sonnet-4-5",
                    max_tokens=2048,
                    stream=True,
                    thinking={"type": "enabled", "budget_tokens": 1024},
                    messages=[{"role": "user", "content": "Say hello."}],
                )
            ),
        ),
        (
            "anthropic_tools_stream",
            "streamed tool use (content_block_start tool_use, input_json_delta)",
            lambda t: drain(
                client(t).messages.create(
                    model="claude-sonnet-4-5",
                    max_tokens=512,
                    stream=True,
                    tools=tools,
                    messages=[{"role": "user", "content": "Weather in Paris?"}],
                )
            ),
        ),
        (
            "anthropic_tool_result",
            "follow-up with the tool_result for tool_use_id",
            lambda t: client(t).messages.create(
                model="claude-sonnet-4-5",
                max_tokens=512,
                tools=tools,
                messages=[
                    {"role": "user", "content": "Weather in Paris?"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "text", "text": "I'll check the weather."},
                            {
                                "type": "tool_use",
                                "id": "toolu_01A09q90qw90lq917835lq9",
                                "name": "get_weather",
                                "input": {"city": "Paris"},
                            },
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                                "content": "18°C, sunny",
                            }
                        ],
                    },
                ],
            ),
        ),
        (
            "anthropic_error_404",
            "unknown model: Anthropic error body",
            lambda t: client(t).messages.create(
                model="error-400", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            ),
        ),
        (
            "anthropic_stream_error",
            "overloaded_error event in the middle of a stream",
            lambda t: drain(
                client(t).messages.create(
                    model="error-stream",
                    max_tokens=100,
                    stream=True,
                    messages=[{"role": "user", "content": "Say hello."}],
                )
            ),
        ),
    ]
    for name, desc, run in cases:
        method, url, headers, body, r = capture(run, None, httpx2)
        save(name, desc, method, url, headers, body, r)


GENAI_HEADERS = [
    ("content-type", "application/json"),
    ("x-goog-api-key", FAKE_GOOGLE_KEY),
    ("user-agent", "google-genai-sdk/1.20.0 gl-python/3.11.2"),
    ("x-goog-api-client", "google-genai-sdk/1.20.0 gl-python/3.11.2"),
]
OLLAMA_HEADERS = [
    ("content-type", "application/json"),
    ("accept", "application/json"),
    ("user-agent", "ollama-python/0.4.7 (x86_64 linux) Python/3.11.2"),
]


def _direct(
    name: str, desc: str, url: str, headers: list[tuple[str, str]], req: dict, http_version: str = "1.1"
) -> None:
    body = json.dumps(req, separators=(",", ":")).encode()
    u = urllib.parse.urlsplit(url)
    r = fakeprovider.reply("POST", u.path, u.query, headers, body)
    headers = (
        [("host", u.netloc)] + headers + [("content-length", str(len(body)))] if http_version == "1.1" else headers
    )
    save(name, desc, "POST", url, headers, body, r, http_version)


def gemini_cases() -> None:
    base = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"
    req = {
        "contents": [{"parts": [{"text": "Say hello."}], "role": "user"}],
        "systemInstruction": {"parts": [{"text": "You are a terse assistant."}], "role": "user"},
        "generationConfig": {"temperature": 0.2, "maxOutputTokens": 128},
    }
    _direct("gemini_generate", "Gemini generateContent", base + ":generateContent", GENAI_HEADERS, req, "2")
    _direct(
        "gemini_stream_sse",
        "Gemini streamGenerateContent?alt=sse",
        base + ":streamGenerateContent?alt=sse",
        GENAI_HEADERS,
        req,
        "2",
    )
    _direct(
        "gemini_stream_array",
        "Gemini streamGenerateContent without alt: one JSON array flushed element by element",
        base + ":streamGenerateContent",
        GENAI_HEADERS,
        req,
        "2",
    )
    tools_req = {
        "contents": [{"parts": [{"text": "Weather in Paris?"}], "role": "user"}],
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "get_weather",
                        "description": "Current weather in a city",
                        "parameters": {
                            "type": "OBJECT",
                            "properties": {"city": {"type": "STRING"}},
                            "required": ["city"],
                        },
                    }
                ]
            }
        ],
    }
    think = dict(req, generationConfig={"thinkingConfig": {"includeThoughts": True, "thinkingBudget": 1024}})
    _direct(
        "gemini_thinking_stream_sse",
        "Gemini stream with thought summaries (parts with thought: true)",
        base + ":streamGenerateContent?alt=sse",
        GENAI_HEADERS,
        think,
        "2",
    )
    _direct("gemini_tools", "Gemini function call", base + ":generateContent", GENAI_HEADERS, tools_req, "2")
    _direct(
        "gemini_error_404",
        "Gemini error body",
        "https://generativelanguage.googleapis.com/v1beta/models/error-400:generateContent",
        GENAI_HEADERS,
        req,
        "2",
    )


def ollama_cases() -> None:
    base = "https://127.0.0.1:11434"
    chat = {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello."},
        ],
        "tools": [],
        "options": {"temperature": 0.2},
    }
    _direct(
        "ollama_chat_stream",
        "Ollama /api/chat, NDJSON stream (the default)",
        base + "/api/chat",
        OLLAMA_HEADERS,
        dict(chat, stream=True),
    )
    _direct(
        "ollama_chat",
        "Ollama /api/chat with stream=false",
        base + "/api/chat",
        OLLAMA_HEADERS,
        dict(chat, stream=False),
    )
    _direct(
        "ollama_generate_stream",
        "Ollama /api/generate NDJSON stream",
        base + "/api/generate",
        OLLAMA_HEADERS,
        {"model": "llama3.2", "prompt": "Say hello.", "system": "You are a terse assistant.", "stream": True},
    )
    _direct(
        "ollama_generate",
        "Ollama /api/generate with stream=false",
        base + "/api/generate",
        OLLAMA_HEADERS,
        {"model": "llama3.2", "prompt": "Say hello.", "stream": False, "options": {"num_predict": 64}},
    )
    _direct(
        "ollama_error_404",
        "Ollama error body for an unknown model",
        base + "/api/chat",
        OLLAMA_HEADERS,
        {"model": "error-400", "messages": [{"role": "user", "content": "hi"}]},
    )
    _direct(
        "ollama_chat_tools",
        "Ollama /api/chat answering with tool_calls",
        base + "/api/chat",
        OLLAMA_HEADERS,
        {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "stream": False,
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "description": "Current weather in a city",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    },
                }
            ],
        },
    )


def bedrock_cases() -> None:
    host = "bedrock-runtime.us-east-1.amazonaws.com"
    model = "anthropic.claude-3-5-sonnet-20240620-v1:0"
    enc = urllib.parse.quote(model, safe="")
    hdrs = [
        ("content-type", "application/json"),
        (
            "user-agent",
            "Boto3/1.35.54 md/Botocore#1.35.54 ua/2.0 os/linux#6.18 "
            "md/arch#x86_64 lang/python#3.11.2 md/pyimpl#CPython cfg/retry-mode#legacy Botocore/1.35.54",
        ),
        ("x-amz-date", "20241119T085320Z"),
        (
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIAFAKEFAKEFAKE/20241119/us-east-1/bedrock/aws4_request, "
            "SignedHeaders=content-type;host;x-amz-date, Signature=0fakefakefakefakefakefakefakefakefakefakefakefakefakefakefakefake",
        ),
    ]
    conv = {
        "messages": [{"role": "user", "content": [{"text": "Say hello."}]}],
        "system": [{"text": "You are a terse assistant."}],
        "inferenceConfig": {"maxTokens": 256, "temperature": 0.2},
    }
    _direct("bedrock_converse", "Bedrock Converse", f"https://{host}/model/{enc}/converse", hdrs, conv)
    _direct(
        "bedrock_converse_stream",
        "Bedrock ConverseStream: binary event stream",
        f"https://{host}/model/{enc}/converse-stream",
        hdrs,
        conv,
    )
    tools = dict(
        conv,
        toolConfig={
            "tools": [
                {
                    "toolSpec": {
                        "name": "get_weather",
                        "description": "Current weather in a city",
                        "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}}}},
                    }
                }
            ]
        },
    )
    tools["messages"] = [{"role": "user", "content": [{"text": "Weather in Paris?"}]}]
    _direct(
        "bedrock_converse_tools_stream",
        "Bedrock ConverseStream answering with toolUse (contentBlockStart, input deltas)",
        f"https://{host}/model/{enc}/converse-stream",
        hdrs,
        tools,
    )
    _direct(
        "bedrock_error_400",
        "Bedrock ValidationException (JSON body with message, x-amzn-errortype header)",
        f"https://{host}/model/error-400/converse",
        hdrs,
        conv,
    )
    _direct(
        "bedrock_converse_stream_exception",
        "ConverseStream with a throttlingException frame mid-stream",
        f"https://{host}/model/error-stream/converse-stream",
        hdrs,
        conv,
    )
    claude = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 256,
        "system": "You are a terse assistant.",
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    _direct(
        "bedrock_invoke_stream",
        "Bedrock InvokeModelWithResponseStream (Claude): base64 Anthropic events in chunks",
        f"https://{host}/model/{enc}/invoke-with-response-stream",
        hdrs,
        claude,
    )
    _direct("bedrock_invoke", "Bedrock InvokeModel (Claude)", f"https://{host}/model/{enc}/invoke", hdrs, claude)


def generic_cases() -> None:
    req = {"model": "company-llm-large", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64}
    body = json.dumps(req).encode()
    r = fakeprovider.openai_chat(req)
    save(
        "generic_gateway_chat",
        "unknown host and path, OpenAI-shaped body: kept as an OpenAI-compatible exchange",
        "POST",
        "https://ai-gw.corp.example/proxy/v2/run",
        [
            ("host", "ai-gw.corp.example"),
            ("content-type", "application/json"),
            ("authorization", "Bearer gw-FAKE-token-123456"),
            ("content-length", str(len(body))),
        ],
        body,
        r,
    )
    req2 = {"model": "tgi-mistral", "inputs": "Say hello.", "parameters": {"max_new_tokens": 20}}
    body2 = json.dumps(req2).encode()
    r2 = Reply(200, [("content-type", "application/json")], [json.dumps([{"generated_text": "Hello there!"}]).encode()])
    save(
        "generic_text_api",
        "unknown JSON API with a model and inputs: generic exchange, text from generated_text",
        "POST",
        "https://tgi.internal/generate",
        [("host", "tgi.internal"), ("content-type", "application/json"), ("content-length", str(len(body2)))],
        body2,
        r2,
    )


# Bodies written out as the providers' API references show them (not produced by tests/fakeprovider.py).
DOCS_ANTHROPIC_STREAM = """event: message_start
data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-4-20250514", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ", let's check the weather for San Francisco, CA:"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"location\\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \\"San Francisco, CA\\""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":", \\"unit\\": \\"fahrenheit\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""

DOCS_OPENAI_CHAT_STREAM = """data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}

data: [DONE]

"""

DOCS_OLLAMA_GENERATE = [
    '{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","response":"The","done":false}\n',
    '{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","response":" sky","done":false}\n',
    '{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","response":" is blue.","done":false}\n',
    '{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","response":"","done":true,"context":[1,2,3],'
    '"total_duration":10706818083,"load_duration":6338219291,"prompt_eval_count":26,"prompt_eval_duration":130079000,'
    '"eval_count":259,"eval_duration":4232710000}\n',
]


def _sse_pieces(text: str) -> list[bytes]:
    return [(e + "\n\n").encode() for e in text.split("\n\n") if e.strip()]


def docs_cases() -> None:
    req = json.dumps(
        {
            "model": "claude-opus-4-20250514",
            "max_tokens": 1024,
            "stream": True,
            "tools": [
                {
                    "name": "get_weather",
                    "description": "Get the current weather in a given location",
                    "input_schema": {
                        "type": "object",
                        "properties": {"location": {"type": "string"}},
                        "required": ["location"],
                    },
                }
            ],
            "messages": [{"role": "user", "content": "What is the weather like in San Francisco?"}],
        }
    ).encode()
    save(
        "docs_anthropic_tools_stream",
        "Anthropic streaming docs example: text then tool_use with input_json_delta",
        "POST",
        "https://api.anthropic.com/v1/messages",
        [
            ("host", "api.anthropic.com"),
            ("x-api-key", FAKE_ANTHROPIC_KEY),
            ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"),
            ("content-length", str(len(req))),
        ],
        req,
        Reply(
            200,
            [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")],
            _sse_pieces(DOCS_ANTHROPIC_STREAM),
        ),
    )
    req = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "developer", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello!"},
            ],
            "stream": True,
        }
    ).encode()
    save(
        "docs_openai_chat_stream",
        "OpenAI API reference streaming example",
        "POST",
        "https://api.openai.com/v1/chat/completions",
        [
            ("host", "api.openai.com"),
            ("authorization", f"Bearer {FAKE_OPENAI_KEY}"),
            ("content-type", "application/json"),
            ("content-length", str(len(req))),
        ],
        req,
        Reply(200, [("content-type", "text/event-stream; charset=utf-8")], _sse_pieces(DOCS_OPENAI_CHAT_STREAM)),
    )
    req = json.dumps({"model": "llama3.2", "prompt": "Why is the sky blue?"}).encode()
    save(
        "docs_ollama_generate_stream",
        "Ollama API docs /api/generate streaming example (stream unset: streams)",
        "POST",
        "https://localhost:11434/api/generate",
        [("host", "localhost:11434"), ("content-type", "application/json"), ("content-length", str(len(req)))],
        req,
        Reply(200, [("content-type", "application/x-ndjson")], [x.encode() for x in DOCS_OLLAMA_GENERATE]),
    )


if __name__ == "__main__":
    docs_cases()
    openai_cases()
    anthropic_cases()
    gemini_cases()
    ollama_cases()
    bedrock_cases()
    generic_cases()
