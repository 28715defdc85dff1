"""Chain exchanges into conversations.

An agent's next request carries the results of the tools the model asked
for (OpenAI `tool_call_id`, Anthropic `tool_use_id`, Responses `call_id`,
Bedrock `toolUseId`, Gemini `functionResponse.id`) or names the previous
response (`previous_response_id`). Those ids link it to the exchange that
asked; a chain takes the id of its first exchange as `conversation_id`.
Agents also resend the whole history every turn, so the same process
sending the same system prompt and first user message continues the chain.

Memory is bounded: the newest MAX_CONVERSATION_KEYS keys are kept (LRU).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from llmspyd.llm.record import LlmExchange

# Keys remembered (tool ids, response ids, thread keys). A busy agent makes a few keys per exchange;
# 50k covers hours of one machine's traffic in a few MB.
MAX_CONVERSATION_KEYS = 50_000
# Characters of system prompt and first user message hashed into a thread key: enough to tell sessions apart.
THREAD_KEY_CHARS = 4096


class ConversationTracker:
    def __init__(self, max_keys: int = MAX_CONVERSATION_KEYS) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[tuple[str, ...], str] = OrderedDict()
        self._lock = threading.Lock()  # one tracker may serve several pipeline threads
        self.linked = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._keys)

    def assign(self, ex: LlmExchange, tool_result_ids: list[str], previous_response_id: str | None) -> str:
        """Set and return `ex.conversation_id`, and remember what later exchanges may refer to."""
        thread = _thread_key(ex)
        candidates: list[tuple[str, ...]] = [("tool", t) for t in tool_result_ids]
        if previous_response_id:
            candidates.append(("resp", previous_response_id))
        # tool calls replayed in the request's history link as well as their results do
        candidates += [("tool", tc.id) for m in ex.request.messages for tc in m.tool_calls if tc.id]
        if thread:
            candidates.append(thread)
        with self._lock:
            cid = None
            for key in candidates:
                cid = self._keys.get(key)
                if cid is not None:
                    self._keys.move_to_end(key)
                    self.linked += 1
                    break
            cid = cid or ex.id
            ex.conversation_id = cid
            if ex.response is not None:
                for tc in ex.response.tool_calls:
                    if tc.id:
                        self._put(("tool", tc.id), cid)
                if ex.response.id:
                    self._put(("resp", ex.response.id), cid)
            if thread:
                self._put(thread, cid)
        return cid

    def _put(self, key: tuple[str, ...], cid: str) -> None:
        self._keys[key] = cid
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
            self.evicted += 1


def _thread_key(ex: LlmExchange) -> tuple[str, ...] | None:
    first_user = next((m.content for m in ex.request.messages if m.role == "user" and m.content), None)
    if not first_user:
        return None
    h = hashlib.blake2b(digest_size=12)
    h.update((ex.request.system or "")[:THREAD_KEY_CHARS].encode("utf-8", "replace"))
    h.update(b"\0")
    h.update(first_user[:THREAD_KEY_CHARS].encode("utf-8", "replace"))
    return ("thread", str(ex.process.pid), h.hexdigest())


_default: ConversationTracker | None = None
_default_lock = threading.Lock()


def default_tracker() -> ConversationTracker:
    """The process-wide tracker assemblers use when none is given (conversations span connections)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ConversationTracker()
        return _default
