"""Real text for the RAG benchmarks, from sources every machine here has or can fetch from PyPI.

English: the docstrings of Python's standard library (written by people, about 1.5 MB of prose
and examples). Korean: the Constitution of the Republic of Korea and ten National Assembly bills,
the `kolaw`/`kobill` corpora inside the `konlpy` wheel (public-domain government texts; the wheel is
downloaded once into the state directory, read as a zip, never installed).

Chunks are windows of consecutive sentences from those texts, so a chunk reads like a passage of a
real document; queries are words, sentences and 2,000-character runs of the same texts.
"""

from __future__ import annotations

import ast
import random
import re
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KONLPY = "konlpy==0.6.0"
_SENTENCE = re.compile(r"(?<=[.!?。])\s+|\n{2,}")
_WORD = re.compile(r"[A-Za-z]{4,}|[\uac00-\ud7a3]{2,}")


@dataclass(frozen=True)
class TextPool:
    language: str
    sentences: list[str]  # in document order


def english_pool() -> TextPool:
    sentences: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages", "dist-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    sentences += [" ".join(s.split()) for s in _SENTENCE.split(doc) if len(s.split()) >= 3]
    return TextPool("en", sentences)


def korean_pool() -> TextPool:
    folder = ROOT / ".dreamseed" / "bench"
    wheels = sorted(folder.glob("konlpy-*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "--disable-pip-version-check", "-d", str(folder), KONLPY], check=True)
        wheels = sorted(folder.glob("konlpy-*.whl"))
    sentences: list[str] = []
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in sorted(wheel.namelist()):
            if name.startswith("konlpy/data/corpus/ko") and name.endswith(".txt"):
                text = wheel.read(name).decode("utf-8")
                sentences += [" ".join(s.split()) for s in _SENTENCE.split(text) if len(s.split()) >= 3]
    return TextPool("ko", sentences)


def passage(pool: TextPool, rng: random.Random, low: int, high: int) -> str:
    """Consecutive sentences from a random place, between ``low`` and ``high`` characters."""
    target = rng.randint(low, high)
    start = rng.randrange(len(pool.sentences))
    text = ""
    for sentence in pool.sentences[start:] + pool.sentences[:start]:
        if text and len(text) + 1 + len(sentence) > high:
            break
        text = f"{text} {sentence}" if text else sentence[:high]
        if len(text) >= target:
            break
    return text


def words(pool: TextPool, rng: random.Random, count: int) -> str:
    """``count`` content words taken from one sentence (a keyword-style query)."""
    while True:
        found = _WORD.findall(rng.choice(pool.sentences))
        if len(found) >= count:
            start = rng.randrange(len(found) - count + 1)
            return " ".join(found[start:start + count])


def chunks(pools: list[tuple[TextPool, float]], count: int, seed: int, low: int = 300, high: int = 800) -> list[str]:
    """``count`` passages, each from a pool chosen with the given shares."""
    rng = random.Random(seed)
    population = [pool for pool, _ in pools]
    weights = [share for _, share in pools]
    return [passage(rng.choices(population, weights)[0], rng, low, high) for _ in range(count)]


def queries(pool: TextPool, seed: int, per_kind: int) -> dict[str, list[str]]:
    """{kind: queries}: three words, one sentence, and a 2,000-character chat message."""
    rng = random.Random(seed)
    return {
        f"{pool.language}-3-words": [words(pool, rng, 3) for _ in range(per_kind)],
        f"{pool.language}-sentence": [rng.choice([s for s in pool.sentences if 40 <= len(s) <= 200])
                                      for _ in range(per_kind)],
        f"{pool.language}-2000-chars": [passage(pool, rng, 1900, 2000) for _ in range(per_kind)],
    }
