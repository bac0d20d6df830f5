"""How an answer is scored against its gold answers.

Normalisation (`normalize`): Unicode NFKC, case folding, punctuation and symbols deleted, English
articles (a, an, the) removed as SQuAD's evaluation script does, whitespace collapsed.
- accuracy: the normalised answer contains one of the normalised gold answers (a sentence that
  states the fact counts; a tiny model rarely answers in exactly the gold span);
- exact match and F1 against the best gold answer, as the SQuAD v1.1/v2.0 evaluation script
  computes them: F1 over word tokens for English; over characters for Korean, as KorQuAD 1.0's
  evaluation script does (Korean words carry particles, 서울에서 = 서울 + 에서, so a word token
  would count a right answer as wrong).
- the difference with and without retrieval, per question pair, with a 95 % percentile bootstrap
  interval over questions (2,000 resamples, fixed seed: the same answers give the same interval).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
BOOTSTRAP_RESAMPLES = 2000


def normalize(text: str, lang: str = "en") -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if unicodedata.category(c)[0] not in "PS")  # deleted, as SQuAD's script does
    if lang == "en":
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokens(text: str, lang: str = "en") -> list[str]:
    normal = normalize(text, lang)
    return list(normal.replace(" ", "")) if lang == "ko" else normal.split()


def contains(answer: str, golds: Sequence[str], lang: str = "en") -> float:
    """1.0 when the answer contains a gold answer, each normalised; gold answers that normalise to
    nothing (pure punctuation) are ignored."""
    said = f" {normalize(answer, lang)} "
    for gold in golds:
        wanted = normalize(gold, lang)
        # Whole words for English ("10" is not in "100"); Korean attaches particles to the answer.
        if wanted and ((f" {wanted} " in said) if lang == "en" else (wanted in said)):
            return 1.0
    return 0.0


def exact_match(answer: str, golds: Sequence[str], lang: str = "en") -> float:
    said = normalize(answer, lang)
    return max((1.0 if said == normalize(gold, lang) else 0.0) for gold in golds)


def f1(answer: str, golds: Sequence[str], lang: str = "en") -> float:
    said = tokens(answer, lang)
    best = 0.0
    for gold in golds:
        wanted = tokens(gold, lang)
        common = sum((Counter(said) & Counter(wanted)).values())
        if common:
            precision, recall = common / len(said), common / len(wanted)
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not said and not wanted:
            best = 1.0
    return best


def bootstrap_difference(with_scores: Sequence[float], without_scores: Sequence[float],
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Mean of with − without over paired questions, and its 95 % percentile bootstrap interval."""
    differences = np.asarray(with_scores, dtype=float) - np.asarray(without_scores, dtype=float)
    if differences.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, differences.size, size=(resamples, differences.size))
    means = differences[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(differences.mean()), float(low), float(high)
