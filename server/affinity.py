"""Session affinity for scale-out: which requests should land on the same replica.

A request carries an affinity key when it belongs to a session (an `x-session-id`
header, or the OpenAI `user` field) or when its prompt is a long document (the key is
a hash of the prompt's first characters, so questions about the same document share
it). Ray Serve's consistent-hash router maps each key to a replica.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

SESSION_HEADER = "x-session-id"
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def affinity_key(
    path: str, body: bytes, headers: Mapping[str, str], prefix_chars: int
) -> str | None:
    """The request's affinity key, or None when any replica will do.

    Precedence: the `x-session-id` header, then the body's `user`, then (for prompts of
    at least `prefix_chars` characters) a hash of the first `prefix_chars` characters.
    """
    session = headers.get(SESSION_HEADER)
    if session:
        return "session:" + session
    if path not in GENERATION_PATHS:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None  # the replica answers the 400
    if not isinstance(payload, dict):
        return None
    user = payload.get("user")
    if isinstance(user, str) and user:
        return "user:" + user
    text = prompt_text(payload)
    if len(text) < prefix_chars:
        return None
    return "prefix:" + hashlib.sha256(text[:prefix_chars].encode()).hexdigest()


def prompt_text(payload: Mapping[str, Any]) -> str:
    """The text a completion or chat request starts with ('' when it has none)."""
    if "messages" in payload:
        messages = payload["messages"]
        if not isinstance(messages, list):
            return ""
        return "".join(
            f"{m.get('role', '')}:{_content_text(m.get('content'))}\n"
            for m in messages
            if isinstance(m, dict)
        )
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        prompt = prompt[0]  # a batch of prompts: the first one decides
    if isinstance(prompt, list):
        return ",".join(str(t) for t in prompt)  # token ids
    return prompt if isinstance(prompt, str) else ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""
