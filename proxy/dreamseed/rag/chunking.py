"""Split a document into overlapping chunks on paragraph, then sentence boundaries.

Sizes are in characters (Python str, so Hangul syllables are never cut in half). Text is
NFC-normalised first: a decomposed 한글 from some editors would otherwise never match the
composed form users type.
"""

from __future__ import annotations

import re
import unicodedata

_PARAGRAPHS = re.compile(r"\n\s*\n")
# A sentence ends at . ! ? (and their full-width forms) or 。 followed by space, or at a line end.
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n")


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _hard_split(text: str, size: int) -> list[str]:
    """A 'sentence' longer than a chunk: cut at the last space before the limit, if any."""
    pieces: list[str] = []
    while len(text) > size:
        cut = text.rfind(" ", size // 2, size)
        cut = size if cut <= 0 else cut
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        pieces.append(text)
    return pieces


def chunk_text(text: str, size: int = 800, overlap: int = 100) -> list[str]:
    """Chunks of at most ``size`` characters. Paragraphs stay whole when they fit; otherwise
    they are packed sentence by sentence. Each chunk after the first starts with the last
    sentences (up to ``overlap`` characters) of the one before, so an answer that straddles
    a boundary is still found whole in one chunk."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").strip()
    if not text:
        return []
    units: list[tuple[str, bool]] = []  # (text, starts a paragraph)
    for paragraph in _PARAGRAPHS.split(text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if len(paragraph) <= size:
            units.append((paragraph, True))
            continue
        first = True
        for sentence in _sentences(paragraph):
            for piece in _hard_split(sentence, size):
                units.append((piece, first))
                first = False

    chunks: list[str] = []
    current: list[tuple[str, bool]] = []
    fresh = 0  # units in `current` that are not overlap carried from the previous chunk

    def joined(parts: list[tuple[str, bool]]) -> str:
        out = ""
        for index, (part, new_paragraph) in enumerate(parts):
            out += part if index == 0 else ("\n\n" if new_paragraph else " ") + part
        return out

    for unit in units:
        candidate = joined([*current, unit])
        if current and len(candidate) > size:
            if fresh:
                chunks.append(joined(current))
            carried: list[tuple[str, bool]] = []
            for part in reversed(current):
                if len(joined([part, *carried])) > overlap:
                    break
                carried.insert(0, part)
            current = carried if len(joined([*carried, unit])) <= size else []
            fresh = 0
        current.append(unit)
        fresh += 1
    if current and fresh:
        chunks.append(joined(current))
    return chunks
