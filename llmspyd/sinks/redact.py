"""Remove secrets from an exchange record before any sink sees it.

Works on the JSON form of the record (`LlmExchange.model_dump(mode="json")`),
walking it generically so that a new field holding headers or a URL is covered
without touching this module:

1. every ``headers`` list of ``[name, value]`` pairs (or a name→value dict):
   values of secret-bearing headers (Authorization, x-api-key, cookies, …)
   become ``REDACTED``;
2. every string: key-like URL query parameters (``?key=…``, ``&access_token=…``)
   and ``"api_key": "…"`` JSON members lose their value;
3. safety net: every secret value found in steps 1–2 is replaced wherever else
   it appears in the record (a raw body that echoes the key, an error message
   quoting the request line, …), so a secret seen once is nowhere.

With ``content=True`` (metadata-only mode) prompt and response text, tool
payloads and raw bodies are dropped as well; sizes and token counts stay.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "REDACTED"

# Headers whose value is a credential. Compared lower-case.
SECRET_HEADERS: frozenset[str] = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",  # Azure OpenAI
        "x-goog-api-key",  # Gemini
        "cookie",
        "set-cookie",
        "x-amz-security-token",  # Bedrock with temporary credentials
        "x-auth-token",
        "openai-organization-key",
    }
)

# URL query parameters whose value is a credential. Compared lower-case.
SECRET_PARAMS: frozenset[str] = frozenset(
    {
        "key",  # Gemini ?key=
        "api_key",
        "api-key",
        "apikey",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth",
        "password",
        "secret",
        "client_secret",
        "sig",  # Azure SAS
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
    }
)

# Record members dropped in metadata-only mode (text the user typed or the model wrote).
CONTENT_KEYS: frozenset[str] = frozenset(
    {"system", "messages", "tools", "text", "tool_calls", "thinking", "body", "raw", "raw_body", "prompt", "input"}
)

# A secret shorter than this is not replaced globally: "x" or "1" would shred unrelated text.
MIN_GLOBAL_SECRET_LEN = 8


def _param_pattern(names: Iterable[str]) -> re.Pattern[str]:
    alts = "|".join(sorted((re.escape(n) for n in names), key=len, reverse=True))
    # ?key=VALUE or &key=VALUE, in a URL or a form body; VALUE ends at a delimiter
    return re.compile(rf"(?i)(?P<pre>(?:^|(?<=[?&;\s]))(?:{alts})=)(?P<val>[^&#;\s\"'<>\\]+)")


def _json_member_pattern(names: Iterable[str]) -> re.Pattern[str]:
    alts = "|".join(sorted((re.escape(n) for n in names), key=len, reverse=True))
    # "api_key": "VALUE" inside a JSON text (a raw body kept as a string)
    return re.compile(rf'(?i)(?P<pre>"(?:{alts})"\s*:\s*")(?P<val>[^"\\]+)')


_AUTH_SCHEME = re.compile(r"(?i)^(bearer|basic|token|digest|aws4-hmac-sha256)\s+")


class Redactor:
    """Callable: record dict -> redacted copy. Never mutates its input."""

    def __init__(
        self,
        *,
        secrets: bool = True,
        content: bool = False,
        extra_headers: Iterable[str] = (),
        extra_params: Iterable[str] = (),
    ) -> None:
        self.secrets = secrets
        self.content = content
        self.headers = SECRET_HEADERS | {h.lower() for h in extra_headers}
        params = SECRET_PARAMS | {p.lower() for p in extra_params}
        self._param_re = _param_pattern(params)
        self._json_re = _json_member_pattern(params | {h.replace("-", "_") for h in self.headers})

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        if not self.secrets and not self.content:
            return record
        found: set[str] = set()
        out = self._walk(record, found, key="")
        if self.secrets and found:
            out = self._scrub(out, sorted((s for s in found if len(s) >= MIN_GLOBAL_SECRET_LEN), key=len, reverse=True))
        return out

    # --- step 1 and 2: structural redaction, collecting the secret values

    def _walk(self, node: Any, found: set[str], key: str) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for k, v in node.items():
                if self.content and k in CONTENT_KEYS and isinstance(v, (str, list, dict)) and v:
                    out[k] = _content_stub(v)
                elif self.secrets and k == "headers":
                    out[k] = self._headers(v, found)
                else:
                    out[k] = self._walk(v, found, k)
            return out
        if isinstance(node, list):
            return [self._walk(v, found, key) for v in node]
        if isinstance(node, str) and self.secrets:
            return self._string(node, found)
        return node

    def _headers(self, headers: Any, found: set[str]) -> Any:
        if isinstance(headers, dict):
            return {k: self._header_value(str(k), v, found) for k, v in headers.items()}
        if isinstance(headers, list):
            out = []
            for item in headers:
                if isinstance(item, (list, tuple)) and len(item) == 2:
                    out.append([item[0], self._header_value(str(item[0]), item[1], found)])
                else:
                    out.append(self._walk(item, found, "headers"))
            return out
        return self._walk(headers, found, "headers")

    def _header_value(self, name: str, value: Any, found: set[str]) -> Any:
        if name.lower() not in self.headers or not isinstance(value, str):
            return self._string(value, found) if isinstance(value, str) else value
        found.add(value)
        m = _AUTH_SCHEME.match(value)
        if m:
            found.add(value[m.end() :].strip())
            return f"{m.group(1)} {REDACTED}"
        if name.lower() in ("cookie", "set-cookie"):
            # keep cookie names, they help debugging; values go
            for part in value.split(";"):
                if "=" in part:
                    found.add(part.split("=", 1)[1].strip())
        return REDACTED

    def _string(self, s: str, found: set[str]) -> str:
        if "=" not in s and '"' not in s:
            return s

        def sub(m: re.Match[str]) -> str:
            if m.group("val") != REDACTED:
                found.add(m.group("val"))
            return m.group("pre") + REDACTED

        s = self._param_re.sub(sub, s)
        if '"' in s:
            s = self._json_re.sub(sub, s)
        return s

    # --- step 3: the safety net

    def _scrub(self, node: Any, secrets: list[str]) -> Any:
        if not secrets:
            return node
        if isinstance(node, dict):
            return {k: self._scrub(v, secrets) for k, v in node.items()}
        if isinstance(node, list):
            return [self._scrub(v, secrets) for v in node]
        if isinstance(node, str):
            for secret in secrets:
                if secret in node:
                    node = node.replace(secret, REDACTED)
            return node
        return node


def _content_stub(value: Any) -> Any:
    """What stays of a content member in metadata-only mode: its size, not its words."""
    if isinstance(value, str):
        return f"[{len(value.encode())} bytes redacted]"
    if isinstance(value, list):
        return f"[{len(value)} items redacted]"
    return "[redacted]"
