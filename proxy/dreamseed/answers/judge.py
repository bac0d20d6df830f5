"""An LLM as judge, for free-form answers that phrase matching scores too strictly: a rubric, the
gold answers and the model's answer go to a judge backend through the proxy (retrieval off), and
its verdict is read strictly: one word, CORRECT or INCORRECT. Anything else is counted as
unparseable, never guessed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence

import httpx

from .asking import Answer, AnswerCache, Asking, cache_key, chat
from .dataset import Question

RUBRIC = """You are grading an answer to a question.
Question: {question}
Acceptable answers: {golds}
Answer to grade: {answer}
The answer is correct if it states one of the acceptable answers or the same fact in other words.
Reply with one word: CORRECT or INCORRECT."""

_VERDICT = re.compile(r"\s*\**\s*(CORRECT|INCORRECT)\s*\**\s*\.?\s*", re.IGNORECASE)
VERDICT_TOKENS = 8


def parse_verdict(text: str) -> bool | None:
    """True for CORRECT, False for INCORRECT (either case, bold or a full stop allowed), None else."""
    match = _VERDICT.fullmatch(text)
    return None if match is None else match.group(1).upper() == "CORRECT"


def rubric(question: Question, answer: str) -> str:
    return RUBRIC.format(question=question.text, golds=" | ".join(question.answers), answer=answer.strip() or "(empty)")


async def judge_all(answers: Sequence[Answer], questions: Mapping[str, Question], asking: Asking, judge: str,
                    cache: AnswerCache, progress: Callable[[], object] = lambda: None) -> dict[tuple[str, str], Answer]:
    """The judge's reply to each answered question, by (question id, arm)."""
    semaphore = asyncio.Semaphore(asking.concurrency)

    async with httpx.AsyncClient(timeout=asking.timeout) as client:
        async def one(answer: Answer) -> tuple[tuple[str, str], Answer]:
            prompt = rubric(questions[answer.question], answer.text)
            arm = f"judge:{answer.arm}"
            key = cache_key(asking, arm, prompt, model=judge)
            found = cache.get(key)
            if found is None:
                async with semaphore:
                    found = await chat(client, asking, answer.question, arm, prompt, "off", model=judge,
                                       max_tokens=VERDICT_TOKENS)
                if found.error is None:
                    cache.put(key, found)
            progress()
            return (answer.question, answer.arm), found

        return dict(await asyncio.gather(*(one(a) for a in answers if a.error is None)))
