"""Asking a running proxy every question twice, with retrieval and without, a bounded number at a
time, through an answer cache that makes an interrupted run resume where it stopped."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from .dataset import Question

ARMS = ("with_rag", "without_rag")


class ProxyDownError(Exception):
    pass


@dataclass(frozen=True)
class Asking:
    """How the questions are asked: where, as whom, of which model, and how retrieval is switched."""

    proxy: str
    key: str | None
    model: str
    max_tokens: int
    collection: str | None  # with retrieval from this collection (x-dreamseed-rag: collection=...); None: the rules'
    concurrency: int
    timeout: float
    policy_hash: str  # part of every cache key: a changed template or top_k asks again
    policy_hash_without_rag: str = ""  # the same less rag.yaml, for the arm that does not retrieve

    def headers(self, rag: str) -> dict[str, str]:
        return {"x-dreamseed-rag": rag, **({"authorization": f"Bearer {self.key}"} if self.key else {})}


@dataclass
class Answer:
    question: str  # the question's _id
    arm: str  # with_rag | without_rag, or judge:<arm> for a judge's verdict on that arm's answer
    text: str
    seconds: float
    rag: str  # what the proxy's x-dreamseed-rag said: hits=N, off, degraded
    error: str | None = None  # why no answer came (not cached: a rerun asks again)


class AnswerCache:
    """One JSON line per answer, appended as each comes in, keyed by everything it depends on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._answers: dict[str, Answer] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    key = row.pop("key")
                    self._answers[key] = Answer(**row)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by an interruption: that answer is asked again
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> Answer | None:
        return self._answers.get(key)

    def put(self, key: str, answer: Answer) -> None:
        self._answers[key] = answer
        self._file.write(json.dumps({"key": key, **asdict(answer)}, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def cache_key(asking: Asking, arm: str, content: str, model: str | None = None) -> str:
    policies = asking.policy_hash_without_rag if arm == "without_rag" and asking.policy_hash_without_rag \
        else asking.policy_hash
    parts = [arm, content, model or asking.model, str(asking.max_tokens), asking.collection or "", policies]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:32]


async def check_proxy(client: httpx.AsyncClient, asking: Asking) -> None:
    try:
        response = await client.get(f"{asking.proxy}/healthz")
    except httpx.HTTPError as exc:
        raise ProxyDownError(f"cannot reach the proxy at {asking.proxy}: {exc or type(exc).__name__} "
                        "(start it with `dreamseed serve`, or name it with --proxy)") from None
    if response.status_code != 200:
        raise ProxyDownError(f"the proxy at {asking.proxy} answered /healthz with {response.status_code}")


async def chat(client: httpx.AsyncClient, asking: Asking, question_id: str, arm: str, content: str, rag: str,
               model: str | None = None, max_tokens: int | None = None) -> Answer:
    """One question through the proxy; a failure comes back as an Answer with its error."""
    body = {"model": model or asking.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens or asking.max_tokens, "temperature": 0}
    started = time.perf_counter()
    try:
        response = await client.post(f"{asking.proxy}/v1/chat/completions", json=body, headers=asking.headers(rag))
    except httpx.HTTPError as exc:
        return Answer(question_id, arm, "", 0.0, "", f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    header = response.headers.get("x-dreamseed-rag", "")
    if response.status_code != 200:
        try:
            error = response.json()["error"]
            why = f"{error['code']}: {error.get('message')}" if error.get("code") else str(error.get("message"))
        except (ValueError, KeyError, TypeError):
            why = response.text[:200]
        return Answer(question_id, arm, "", seconds, header, f"HTTP {response.status_code} {why}")
    try:
        text = response.json()["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        return Answer(question_id, arm, "", seconds, header, f"not a chat completion: {response.text[:200]}")
    return Answer(question_id, arm, text, seconds, header)


async def ask_all(questions: Sequence[Question], asking: Asking, cache: AnswerCache,
                  progress: Callable[[], object] = lambda: None) -> list[Answer]:
    """Every question in both arms (cached ones from the cache), in the questions' order."""
    semaphore = asyncio.Semaphore(asking.concurrency)
    with_rag = f"collection={asking.collection}" if asking.collection else "auto"

    async with httpx.AsyncClient(timeout=asking.timeout) as client:
        await check_proxy(client, asking)

        async def one(question: Question, arm: str) -> Answer:
            key = cache_key(asking, arm, question.text)
            found = cache.get(key)
            if found is not None:
                # Keyed by the text: two questions of a set that read the same share one answer.
                found = dataclasses.replace(found, question=question.id)
            else:
                async with semaphore:
                    found = await chat(client, asking, question.id, arm, question.text,
                                       with_rag if arm == "with_rag" else "off")
                if found.error is None:
                    cache.put(key, found)
            progress()
            return found

        return list(await asyncio.gather(*(one(q, arm) for q in questions for arm in ARMS)))
