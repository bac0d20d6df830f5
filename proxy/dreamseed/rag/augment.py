"""Putting retrieved context into a request.

Chat requests get the rendered template as a system message. Chat templates of several
open models (Mistral's among them) accept one system message and only at the start, so the
context is appended to a leading system message when the client sent one, and inserted as
the first message otherwise. Text completions get it in front of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..policy import RagSettings
from ..routing import content_text
from .store import Hit

# Collections whose names start so hold evaluation sets (`rag eval`, `eval answers`): a request may
# name one in its x-dreamseed-rag header, where any other collection is the rules' to choose.
EVAL_COLLECTION_PREFIX = "eval-"


def query_of(payload: dict[str, Any], endpoint: str) -> str | None:
    """The text to retrieve for: the last user message, or a completion's single prompt. NUL
    characters and unpaired surrogates, which PostgreSQL cannot take, are dropped from it (the
    request itself is forwarded as sent)."""
    text: str | None = None
    if endpoint == "chat":
        for message in reversed(payload.get("messages") or ()):
            if isinstance(message, dict) and message.get("role") == "user":
                text = content_text(message.get("content"))
                break
    elif isinstance(payload.get("prompt"), str):
        text = payload["prompt"]
    if text is None:
        return None
    text = text.replace("\x00", "").encode("utf-8", "ignore").decode("utf-8").strip()
    return text or None


def format_context(hits: Sequence[Hit], max_chars: int) -> tuple[str, int]:
    """Numbered passages with their sources, at most ``max_chars``; returns (text, passages used).
    A passage that does not fit whole is cut only when it is the first one."""
    parts: list[str] = []
    used = 0
    for number, hit in enumerate(hits, start=1):
        part = f"[{number}] ({hit.source}) {hit.content}"
        length = used + len(part) + (2 if parts else 0)
        if length > max_chars:
            if not parts:
                parts.append(part[: max_chars - 1].rstrip() + "…")
            break
        parts.append(part)
        used = length
    return "\n\n".join(parts), len(parts)


def augment(payload: dict[str, Any], endpoint: str, settings: RagSettings, query: str,
            hits: Sequence[Hit]) -> int:
    """Add the context to ``payload`` in place; returns how many passages went in."""
    context, used = format_context(hits, settings.max_context_chars)
    if not used:
        return 0
    text = settings.template.format(context=context, query=query)
    if endpoint == "chat":
        messages = list(payload["messages"])
        first = messages[0] if messages else None
        if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
            messages[0] = {**first, "content": f"{first['content']}\n\n{text}"}
        else:
            messages.insert(0, {"role": "system", "content": text})
        payload["messages"] = messages
    else:
        payload["prompt"] = f"{text}\n\n{payload['prompt']}"
    return used
