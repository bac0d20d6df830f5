"""A question set for `eval answers`: a folder with `corpus.jsonl` (BEIR's layout: `_id`, `title`,
`text`) and `questions.jsonl` (`_id`, `question`, `answers`: acceptable short answers, optional
`lang`). Every problem is named by file and line, all of them at once, before anything is asked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..rag.language import language

MAX_PROBLEMS = 20  # reported at once; a wholly wrong file would otherwise print thousands of lines


class AnswerSetError(Exception):
    pass


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    answers: tuple[str, ...]
    lang: str  # as given, else "ko" for a question with Hangul in it, else "en"


@dataclass(frozen=True)
class AnswerSet:
    name: str
    corpus: list[Passage]
    questions: list[Question]


def _rows(path: Path, problems: list[str]) -> list[tuple[int, dict[str, object]]]:
    if not path.is_file():
        problems.append(f"{path}: missing")
        return []
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{path}: not UTF-8 ({exc})")
        return []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number}: not a JSON object")
            continue
        rows.append((number, row))
    return rows


def _text(row: dict[str, object], field: str, where: str, problems: list[str]) -> str:
    value = row.get(field)
    if isinstance(value, str) and value.strip():
        return value.strip()
    problems.append(f"{where}: `{field}` missing" if value is None else f"{where}: `{field}` must be a non-empty string")
    return ""


def _repeated(ident: str, seen: dict[str, int], where: str, problems: list[str]) -> bool:
    """Whether `ident` was seen before in its file (a problem, naming the line it was first on)."""
    if ident in seen:
        problems.append(f"{where}: `_id` {ident!r} repeats line {seen[ident]}")
        return True
    return False


def load_answer_set(directory: str | Path) -> AnswerSet:
    folder = Path(directory)
    problems: list[str] = []
    corpus: list[Passage] = []
    seen: dict[str, int] = {}
    path = folder / "corpus.jsonl"
    for number, row in _rows(path, problems):
        where = f"{path}:{number}"
        ident = _text(row, "_id", where, problems)
        text = _text(row, "text", where, problems)
        title = row.get("title") if isinstance(row.get("title"), str) else ""
        if not _repeated(ident, seen, where, problems) and ident and text:
            seen[ident] = number
            corpus.append(Passage(ident, str(title).strip(), text))
    questions: list[Question] = []
    asked: dict[str, int] = {}
    path = folder / "questions.jsonl"
    for number, row in _rows(path, problems):
        where = f"{path}:{number}"
        ident = _text(row, "_id", where, problems)
        text = _text(row, "question", where, problems)
        answers = row.get("answers")
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)):
            problems.append(f"{where}: `answers` must be a non-empty list of non-empty strings (got {answers!r:.60})")
            continue
        lang = row.get("lang")
        if lang is not None and not (isinstance(lang, str) and lang.strip()):
            problems.append(f"{where}: `lang` must be a language code such as \"en\" or \"ko\"")
            continue
        if not _repeated(ident, asked, where, problems) and ident and text:
            asked[ident] = number
            questions.append(Question(ident, text, tuple(a.strip() for a in answers),
                                      lang.strip().lower() if isinstance(lang, str) else language(text)))
    if not problems and not questions:
        problems.append(f"{path}: no questions")
    if problems:
        more = f"\n... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise AnswerSetError("\n".join(problems[:MAX_PROBLEMS]) + more)
    return AnswerSet(folder.resolve().name, corpus, questions)
