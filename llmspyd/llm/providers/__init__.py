"""Which provider and API a request is, from its host, path, headers and (when needed) body.

`detect_head` runs on the request head alone and returns one of:
- a `Detection` with `confident=True`: a known API path, or a known provider host;
- a `Detection` with `confident=False`: the path looks like an LLM API but the host is
  unknown (a proxy, a self-hosted server) or it is a POST of JSON we may recognize;
  the body decides (`detect_body`);
- `None`: not LLM traffic (GET of a page, an upload, ...), dropped without reading the body.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from llmspyd.llm.providers import anthropic, bedrock, gemini, generic, ollama, openai
from llmspyd.llm.providers.base import ApiFormat, d

# Provider of well-known API hosts. Matched on the host name's end, so regional hosts match too.
HOST_PROVIDERS: tuple[tuple[str, str], ...] = (
    ("api.openai.com", "openai"),
    (".openai.azure.com", "azure-openai"),
    (".cognitiveservices.azure.com", "azure-openai"),
    (".services.ai.azure.com", "azure-openai"),
    ("openrouter.ai", "openrouter"),
    ("api.anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "gemini"),
    ("aiplatform.googleapis.com", "vertex-ai"),
    ("cloudcode-pa.googleapis.com", "gemini-code-assist"),  # gemini-cli signed in with a Google account
    ("chatgpt.com", "openai"),  # Codex CLI signed in with ChatGPT: /backend-api/codex/responses
    (".amazonaws.com", "bedrock"),  # only with bedrock-runtime in the name, see _host_provider
    ("api.mistral.ai", "mistral"),
    ("api.groq.com", "groq"),
    ("api.deepseek.com", "deepseek"),
    ("api.together.xyz", "together"),
    ("api.fireworks.ai", "fireworks"),
    ("api.x.ai", "xai"),
    ("api.perplexity.ai", "perplexity"),
    ("api.cerebras.ai", "cerebras"),
    ("api.moonshot.ai", "moonshot"),
    ("api.cohere.com", "cohere"),
)
OLLAMA_PORT = 11434  # Ollama's default listen port: enough to call a server Ollama

_CHAT = openai.ChatCompletions()
_RESPONSES = openai.Responses()
_COMPLETIONS = openai.Completions()
_EMBEDDINGS = openai.Embeddings()
_MESSAGES = anthropic.Messages()
_OLLAMA_CHAT = ollama.Chat()
_OLLAMA_GENERATE = ollama.Generate()
_OLLAMA_EMBED = ollama.Embed()
_GENERIC = generic.Generic()

# provider name of an unknown endpoint, from the wire format its body has
_COMPATIBLE: dict[type, str] = {
    openai.ChatCompletions: "openai-compatible",
    openai.Responses: "openai-compatible",
    openai.Completions: "openai-compatible",
    openai.Embeddings: "openai-compatible",
    anthropic.Messages: "anthropic-compatible",
    gemini.GenerateContent: "gemini-compatible",
}

_GEMINI_PATH = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent|embedContent|batchEmbedContents)$")
# Code Assist (gemini-cli): /v1internal:streamGenerateContent, the model in the body
_GEMINI_BARE_PATH = re.compile(r"/[^/:]+:(generateContent|streamGenerateContent)$")
_VERTEX_CLAUDE_PATH = re.compile(r"/publishers/anthropic/models/([^/:]+):(rawPredict|streamRawPredict)$")
_BEDROCK_PATH = re.compile(r"/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$")
_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")
_BEDROCK_APIS = {
    "converse": "bedrock.converse",
    "converse-stream": "bedrock.converseStream",
    "invoke": "bedrock.invoke",
    "invoke-with-response-stream": "bedrock.invokeStream",
}


@dataclass
class Detection:
    provider: str
    api: str
    fmt: ApiFormat
    confident: bool = True
    model: str | None = None  # from the path: Gemini/Bedrock model, Azure deployment
    stream_hint: bool | None = None  # from the path or query (streamGenerateContent, alt=sse, converse-stream)


def _host_provider(authority: str) -> str | None:
    host, port = split_authority(authority)
    for suffix, name in HOST_PROVIDERS:
        if host == suffix.lstrip(".") or host.endswith(suffix):
            if name == "bedrock" and "bedrock-runtime" not in host:
                continue
            return name
    if port == OLLAMA_PORT:
        return "ollama"
    return None


def is_llm_host(authority: str) -> bool:
    return _host_provider(authority) is not None


# GET paths of LLM servers that are not model calls (model lists, health): seen first on a
# connection, they must not get it muted before the model call that follows.
_METADATA_SUFFIXES = ("/models", "/api/tags", "/api/version", "/api/ps", "/api/show", "/health", "/v1/models/info")
# POSTs to LLM APIs that generate nothing: token counting, batch management. Not exchanges.
_NOT_MODEL_CALLS = (
    "/count_tokens",
    ":counttokens",
    "/batches",
    "/cancel",
    "/files",
    "/uploads",
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
)


def is_llm_metadata(target: str) -> bool:
    path = target.partition("?")[0].rstrip("/").lower()
    return path.endswith(_METADATA_SUFFIXES) or path.endswith(_NOT_MODEL_CALLS) or "/models/" in path


def split_authority(authority: str) -> tuple[str, int | None]:
    a = authority.strip().lower()
    if a.startswith("["):  # [v6]:port
        host, _, rest = a[1:].partition("]")
        return host, int(rest[1:]) if rest[1:].isdigit() else None
    host, sep, port = a.rpartition(":")
    if sep and port.isdigit() and host:
        return host, int(port)
    return a, None


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def detect_head(method: str, target: str, authority: str, headers: list[tuple[str, str]]) -> Detection | None:
    path, _, query = target.partition("?")
    path = path.rstrip("/") or "/"
    host_provider = _host_provider(authority)
    if method.upper() != "POST":
        return None  # every model call is a POST; GET /v1/models and friends are not exchanges
    ctype = (_header(headers, "content-type") or "").lower()
    if ctype and "json" not in ctype and not ctype.startswith("text/plain") and "x-amz" not in ctype:
        return None  # multipart uploads, forms, protobuf: not a model call we can read
    lower = path.lower()
    if lower.endswith(_NOT_MODEL_CALLS):
        return None
    provider = host_provider

    m = _BEDROCK_PATH.search(path)
    if m:
        model = urllib.parse.unquote(m.group(1))
        api = _BEDROCK_APIS[m.group(2)]
        fmt: ApiFormat = (
            bedrock.Converse(api)
            if "converse" in m.group(2)
            else bedrock.Invoke(bedrock.inner_format(model, None), api)
        )
        return Detection(
            provider or "bedrock-compatible", api, fmt, provider == "bedrock", model, api.endswith("Stream")
        )
    m = _VERTEX_CLAUDE_PATH.search(path)
    if m:
        return Detection(
            provider or "anthropic-compatible",
            "messages",
            _MESSAGES,
            provider is not None,
            m.group(1),
            m.group(2) == "streamRawPredict",
        )
    m = _GEMINI_PATH.search(path)
    if m:
        model, method_name = m.group(1), m.group(2)
        if method_name in ("embedContent", "batchEmbedContents"):
            fmt = gemini.EmbedContent()
        else:
            fmt = gemini.GenerateContent(method_name)
        stream = method_name == "streamGenerateContent"
        # models/M:generateContent is Google's own URL scheme: a proxy or a test server on another host
        # still speaks Gemini
        return Detection(provider or "gemini", fmt.api, fmt, provider is not None, model, stream)

    m = _GEMINI_BARE_PATH.search(path)
    if m:
        fmt = gemini.GenerateContent(m.group(1))
        return Detection(
            provider or "gemini", fmt.api, fmt, provider is not None, None, m.group(1) == "streamGenerateContent"
        )

    az = _AZURE_DEPLOYMENT.search(path)
    model = urllib.parse.unquote(az.group(1)) if az else None
    if lower.endswith("/api/chat"):
        return Detection(provider or "ollama", "ollama.chat", _OLLAMA_CHAT, provider is not None)
    if lower.endswith("/api/generate"):
        return Detection(provider or "ollama", "ollama.generate", _OLLAMA_GENERATE, provider is not None)
    if lower.endswith(("/api/embed", "/api/embeddings")):
        return Detection(provider or "ollama", "ollama.embed", _OLLAMA_EMBED, provider is not None)
    for suffix, fmt in (
        ("/chat/completions", _CHAT),
        ("/responses", _RESPONSES),
        ("/completions", _COMPLETIONS),
        ("/embeddings", _EMBEDDINGS),
    ):
        if lower.endswith(suffix):
            return Detection(
                provider or ("azure-openai" if az else "openai-compatible"),
                fmt.api,
                fmt,
                provider is not None or az is not None,
                model,
            )
    if lower.endswith("/messages"):
        anth = provider or ("anthropic" if _header(headers, "anthropic-version") else "anthropic-compatible")
        return Detection(anth, "messages", _MESSAGES, provider is not None or anth == "anthropic")
    # unknown path: let the body decide (generic JSON APIs, gateways with their own routes)
    return Detection(provider or "generic", "generic", _GENERIC, False)


def detect_body(
    det: Detection, body: Any, path: str, authority: str, headers: list[tuple[str, str]]
) -> Detection | None:
    """Confirm or refine an unconfident detection from the parsed request body; None: not LLM traffic."""
    if det.confident:
        return det
    if not generic.looks_like_llm_request(body, det.model is not None):
        return None
    body = d(body)
    prov = det.provider
    if det.api != "generic":
        return Detection(prov, det.api, det.fmt, True, det.model, det.stream_hint)
    ollama_host = prov == "ollama"
    if isinstance(body.get("contents"), list):
        fmt: ApiFormat = gemini.GenerateContent()
    elif isinstance(body.get("messages"), list):
        fmt = _MESSAGES if anthropic.is_anthropic_body(body, headers) else _OLLAMA_CHAT if ollama_host else _CHAT
    elif "input" in body and isinstance(body.get("model"), str):
        fmt = _EMBEDDINGS if "embed" in path.lower() else _RESPONSES
    elif isinstance(body.get("prompt"), (str, list)) and isinstance(body.get("model"), str):
        fmt = _OLLAMA_GENERATE if ollama_host else _COMPLETIONS
    else:
        fmt = _GENERIC
    if prov == "generic":
        prov = _COMPATIBLE.get(type(fmt), "generic")
    return Detection(prov, fmt.api, fmt, True, det.model, det.stream_hint)


def refine_provider(provider: str, response_headers: list[tuple[str, str]]) -> str:
    """OpenAI-compatible servers often say who they are in response headers."""
    if provider not in ("openai-compatible", "generic", "anthropic-compatible"):
        return provider
    names = {k for k, _ in response_headers}
    if any(k.startswith("x-litellm") for k in names):
        return "litellm"
    if "x-openrouter-provider" in names or any(k.startswith("x-openrouter") for k in names):
        return "openrouter"
    server = (_header(response_headers, "server") or "").lower()
    if "ollama" in server:
        return "ollama"
    return provider


__all__ = [
    "Detection",
    "detect_body",
    "detect_head",
    "is_llm_host",
    "is_llm_metadata",
    "refine_provider",
    "split_authority",
]
