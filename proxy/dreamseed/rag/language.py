"""Which language a text is in, as far as retrieval needs to know: Korean if it holds Hangul,
else English (the two languages the seed's users write in)."""

from __future__ import annotations

import re

_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")


def language(text: str) -> str:
    return "ko" if _HANGUL.search(text) else "en"


# Korean particles written onto the word before them (비밀번호를 = 비밀번호 + 를). A query word's
# last bigram would then straddle the particle (호를): a term the relevant chunk rarely holds,
# that weighs a lot because it is rare. Longest first, so 으로 goes before 로.
_PARTICLES = ("에서", "에게", "으로", "까지", "부터", "처럼", "보다", "한테",
              "을", "를", "이", "가", "은", "는", "에", "의", "도", "로", "와", "과", "만")
_PARTICLE_AT_END = re.compile(r"([\uac00-\ud7a3]{2,}?)(?:" + "|".join(_PARTICLES) + r")(?![\uac00-\ud7a3])")


def without_particles(text: str) -> str:
    """``text`` with the particle cut off each Korean word of three or more syllables that ends in
    one (오류가 -> 오류, 스트리밍으로 -> 스트리밍); words of two syllables stay whole."""
    return _PARTICLE_AT_END.sub(r"\1", text)
