"""Question sets for `dreamseed eval answers`, built from the shipped SQuAD 2.0 and KorQuAD 1.0 dev
files (data/README.md: sources and licences): for each language, the first answerable question of
each paragraph, article by article, up to N questions; the corpus is every paragraph of the
articles those come from, so retrieval has to pick the right paragraph among its neighbours.

    python3 benchmarks/answer_sets.py OUT [--questions 300]    # writes OUT/corpus.jsonl, OUT/questions.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from corpora import QASet, korquad, squad


def pick(qa_set: QASet, questions: int) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    """(corpus rows, question rows): one question per paragraph, whole articles of paragraphs."""
    first: dict[str, dict[str, object]] = {}
    for question in qa_set.questions:
        if question.document not in first and question.answers:
            first[question.document] = {"_id": f"{qa_set.name}-q{len(first) + 1}", "question": question.text,
                                        "answers": list(question.answers), "lang": qa_set.language}
    chosen: list[dict[str, object]] = []
    articles: set[str] = set()
    for document in qa_set.documents:
        if len(chosen) >= questions:
            break
        if document.id in first:
            chosen.append(first[document.id])
            articles.add(document.id.rsplit(":", 1)[0])
    corpus = [{"_id": d.id, "title": d.title, "text": d.text} for d in qa_set.documents
              if d.id.rsplit(":", 1)[0] in articles]
    return corpus, chosen


def write(directory: Path, questions: int) -> Path:
    """An English and a Korean set of `questions` each, in one folder."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus, asked = [], []
    for qa_set in (squad(), korquad()):
        rows, chosen = pick(qa_set, questions)
        corpus += rows
        asked += chosen
    for name, rows in (("corpus.jsonl", corpus), ("questions.jsonl", asked)):
        (directory / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--questions", type=int, default=300, help="per language (default: %(default)s)")
    args = parser.parse_args()
    folder = write(Path(args.out), args.questions)
    print(f"wrote {folder}: " + ", ".join(f"{name} {sum(1 for _ in (folder / name).open())} lines"
                                         for name in ("corpus.jsonl", "questions.jsonl")))


if __name__ == "__main__":
    main()
