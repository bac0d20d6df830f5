"""Where routing happens: pick a backend chain for a request from ``routing.yaml``.

The router is compiled once per policy load (keyword regexes, alias sets) so deciding a
request costs a few microseconds: normalise the prompt once per scope that rules look
at, then evaluate rules in order until one matches.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from .policy import AUTO_MODEL, DIRECT_RULE, Catalog, Match, Routing, Rule, Scope


class Decision(msgspec.Struct, frozen=True):
    """The outcome of routing: which rule fired and the backends to try, in order.

    A msgspec Struct rather than a frozen dataclass: one is made for every request, and a frozen
    dataclass's __init__ sets each field through object.__setattr__
    (docs/decisions/structs-on-the-request-path.md)."""

    rule: str
    chain: tuple[str, ...]
    reason: str
    keyword: bool = False  # the rule matched on keywords (an on-demand start trigger)

    @property
    def backend(self) -> str:
        return self.chain[0]


@dataclass(frozen=True, slots=True)
class RuleTrace:
    rule: str
    matched: bool
    detail: str


class UnknownModelError(Exception):
    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(model)
        self.model = model
        self.available = available


# --- the text a rule looks at -----------------------------------------------------------


def normalise(text: str) -> str:
    """NFKC folds full-width and compatibility forms ("ｃｏｄｅ" -> "code"), so keywords,
    lengths and regexes see one spelling. Korean typed as separate jamo is composed too."""
    return text if unicodedata.is_normalized("NFKC", text) else unicodedata.normalize("NFKC", text)


def estimate_tokens(text: str) -> int:
    """A rough, tokenizer-free estimate: about 4 ASCII characters per token, and one token
    per other character (Hangul syllables and CJK usually cost one or more)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return (ascii_chars + 3) // 4 + (len(text) - ascii_chars)


def content_text(content: Any) -> str:
    """Text of an OpenAI message content: a string, or a list of parts of which we read the text ones."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


class ScopedText:
    """One scope's normalised text, with the derived forms checks need, each made once."""

    __slots__ = ("text", "raw", "_folded", "_words")

    def __init__(self, text: str, raw: str | None = None) -> None:
        self.text = text
        self.raw = text if raw is None else raw  # before normalising
        self._folded: str | None = None
        self._words: frozenset[bytes] | None = None

    @property
    def folded(self) -> str:
        if self._folded is None:
            self._folded = self.text.casefold()
        return self._folded

    @property
    def words(self) -> frozenset[bytes]:
        """Maximal runs of ASCII letters and digits (as UTF-8 bytes): what an ASCII keyword must
        equal. Every other byte, those of non-ASCII characters included, separates words, as
        `[a-z0-9]+` would; bytes.translate and split find the same runs faster than re.findall."""
        if self._words is None:
            self._words = frozenset(self.folded.encode().translate(_WORD_BYTES).split())
        return self._words


_ASCII_WORD = re.compile(r"[a-z0-9]+")
# bytes.translate table: ASCII lower-case letters and digits stay, every other byte becomes a space.
_WORD_BYTES = bytes(b if chr(b) in "abcdefghijklmnopqrstuvwxyz0123456789" else 0x20 for b in range(256))


class Prompt:
    """The routable text of one request, normalised lazily and once per scope."""

    __slots__ = ("_messages", "_prompt", "_cache")

    def __init__(self, *, messages: Sequence[dict[str, Any]] | None = None, prompt: Any = None) -> None:
        self._messages = messages
        self._prompt = prompt
        self._cache: dict[Scope, ScopedText] = {}

    @classmethod
    def of_text(cls, text: str) -> Prompt:
        return cls(messages=[{"role": "user", "content": text}])

    def scoped(self, scope: Scope) -> ScopedText:
        cached = self._cache.get(scope)
        if cached is None:
            raw = self._raw(scope)
            # Scopes often have the same text (one user message: "all", "user" and "last_user");
            # normalise it, fold it and find its words once.
            for other in self._cache.values():
                if other.raw == raw:
                    cached = other
                    break
            else:
                cached = ScopedText(normalise(raw), raw)
            self._cache[scope] = cached
        return cached

    def text(self, scope: Scope) -> str:
        return self.scoped(scope).text

    def _raw(self, scope: Scope) -> str:
        if self._messages is None:
            # /v1/completions: the prompt is a string or a list of strings (token-id prompts have no text).
            prompt = self._prompt
            if isinstance(prompt, str):
                return prompt
            if isinstance(prompt, list):
                strings = [p for p in prompt if isinstance(p, str)]
                return strings[-1] if scope == "last_user" and strings else "\n".join(strings)
            return ""
        messages = self._messages
        if len(messages) == 1:
            # One message, the commonest request: its text without the joins below.
            only = messages[0]
            return content_text(only.get("content")) if scope == "all" or only.get("role") == "user" else ""
        if scope == "all":
            return "\n".join(content_text(m.get("content")) for m in messages)
        users = [content_text(m.get("content")) for m in messages if m.get("role") == "user"]
        if scope == "last_user":
            return users[-1] if users else ""
        return "\n".join(users)


# --- compiled rules ---------------------------------------------------------------------

Check = Callable[[ScopedText], str | None]  # returns why it matched, or None


def _is_word_keyword(keyword: str) -> bool:
    """Single ASCII words (letters, digits) get whole-word matching; anything else -
    Korean, or ASCII with spaces or punctuation - matches as a substring (of the folded text)."""
    return _ASCII_WORD.fullmatch(keyword) is not None


def keyword_check(keywords: Iterable[str]) -> Check:
    """Word keywords may not touch another ASCII letter or digit, so "class" matches "class를"
    (a Korean particle) and "(class)" but not "classic" or "subclass". Checking them is a set
    intersection with the prompt's ASCII words: linear in the prompt, whatever the list's size."""
    folded = sorted({normalise(k).casefold() for k in keywords})
    words = frozenset(k.encode() for k in folded if _is_word_keyword(k))
    substrings = tuple(k for k in folded if not _is_word_keyword(k))
    # A keyword with a non-ASCII character (all the Korean ones) cannot occur in an ASCII text,
    # and str.isascii() reads a flag the string already carries: English prompts skip them.
    ascii_substrings = tuple(k for k in substrings if k.isascii())

    def check(scoped: ScopedText) -> str | None:
        if words:
            found = words & scoped.words
            if found:
                return f"keyword {min(found).decode()!r}"
        text = scoped.folded
        for keyword in ascii_substrings if text.isascii() else substrings:
            if keyword in text:
                return f"keyword {keyword!r}"
        return None

    return check


def _regex_check(expression: str) -> Check:
    pattern = re.compile(expression)

    def check(scoped: ScopedText) -> str | None:
        found = pattern.search(scoped.text)
        return f"regex {expression!r} matched {found.group(0)[:40]!r}" if found else None

    return check


def _length_checks(match: Match) -> list[Check]:
    checks: list[Check] = []
    if match.chars_over is not None:
        n = match.chars_over
        checks.append(lambda s: f"{len(s.text)} characters > {n}" if len(s.text) > n else None)
    if match.chars_under is not None:
        m = match.chars_under
        checks.append(lambda s: f"{len(s.text)} characters < {m}" if len(s.text) < m else None)
    if match.tokens_over is not None:
        k = match.tokens_over
        checks.append(lambda s: f"~{estimate_tokens(s.text)} tokens > {k}" if estimate_tokens(s.text) > k else None)
    if match.tokens_under is not None:
        j = match.tokens_under
        checks.append(lambda s: f"~{estimate_tokens(s.text)} tokens < {j}" if estimate_tokens(s.text) < j else None)
    return checks


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    chain: tuple[str, ...]
    scope: Scope
    models: frozenset[str] | None
    checks: tuple[Check, ...]
    keywords: bool = False

    @classmethod
    def compile(cls, rule: Rule) -> CompiledRule:
        match = rule.match or Match()
        checks = _length_checks(match)
        if match.keywords:
            checks.append(keyword_check(match.keywords))
        if match.regex:
            checks.append(_regex_check(match.regex))
        models = frozenset(match.models) if match.models else None
        return cls(rule.name, rule.chain, match.scope, models, tuple(checks), bool(match.keywords))

    def evaluate(self, model: str, prompt: Prompt) -> str | None:
        """Why this rule matches the request, or None if it does not."""
        reasons = []
        if self.models is not None:
            if model not in self.models:
                return None
            reasons.append(f"model {model!r}")
        if self.checks:
            scoped = prompt.scoped(self.scope)
            for check in self.checks:
                why = check(scoped)
                if why is None:
                    return None
                reasons.append(why)
        return ", ".join(reasons) if reasons else "catch-all"


class Router:
    def __init__(self, routing: Routing, catalog: Catalog) -> None:
        self.rules = tuple(CompiledRule.compile(rule) for rule in routing.rules)
        self.aliases = frozenset(alias for rule in self.rules for alias in (rule.models or ()))
        # A request may name a backend or the model id it serves.
        self.direct: dict[str, str] = {}
        for name, backend in catalog.backends.items():
            self.direct[name] = name
            self.direct.setdefault(backend.model, name)

    def available_models(self) -> list[str]:
        return [AUTO_MODEL, *self.direct, *sorted(self.aliases)]

    def route(self, model: str, prompt: Prompt) -> Decision:
        backend = self.direct.get(model)
        if backend is not None:
            return Decision(DIRECT_RULE, (backend,), f"model {model!r} names backend {backend!r}")
        if model != AUTO_MODEL and model not in self.aliases:
            raise UnknownModelError(model, self.available_models())
        for rule in self.rules:
            why = rule.evaluate(model, prompt)
            if why is not None:
                return Decision(rule.name, rule.chain, why, rule.keywords)
        # The policy check guarantees a catch-all rule; this is reached only if that was bypassed.
        raise UnknownModelError(model, self.available_models())

    def explain(self, model: str, prompt: Prompt) -> tuple[Decision, list[RuleTrace]]:
        """Like :meth:`route`, plus what each rule before the winner said, for ``dreamseed route``."""
        decision = self.route(model, prompt)
        trace: list[RuleTrace] = []
        if decision.rule != DIRECT_RULE:
            for rule in self.rules:
                why = rule.evaluate(model, prompt)
                trace.append(RuleTrace(rule.name, why is not None, why or _why_not(rule, model, prompt)))
                if why is not None:
                    break
        return decision, trace


def _why_not(rule: CompiledRule, model: str, prompt: Prompt) -> str:
    if rule.models is not None and model not in rule.models:
        return f"model {model!r} is not one of {sorted(rule.models)}"
    text = prompt.text(rule.scope)
    return f"no match in {rule.scope} text ({len(text)} characters, ~{estimate_tokens(text)} tokens)"
