"""Routing decisions for the seed policies, as pure functions (no processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dreamseed.policy import Catalog, Routing, load_policies
from dreamseed.routing import Prompt, Router, ScopedText, UnknownModelError, estimate_tokens, keyword_check, normalise
from support import SEED_POLICIES


@pytest.fixture(scope="module")
def router() -> Router:
    policies = load_policies(SEED_POLICIES)
    return Router(policies.routing, policies.catalog)


def route(router: Router, text: str, model: str = "auto") -> tuple[str, tuple[str, ...]]:
    decision = router.route(model, Prompt.of_text(text))
    return decision.rule, decision.chain


@pytest.mark.parametrize("keyword", ["코드", "프로그래밍", "함수", "클래스"])
def test_seed_korean_coding_keywords_go_to_code_with_general_fallback(router: Router, keyword: str) -> None:
    assert route(router, f"이 {keyword}에 대해 설명해 주세요") == ("code", ("code", "general", "fast"))


@pytest.mark.parametrize("text", ["write some code", "a Python function", "define a class", "CODE REVIEW", "Code"])
def test_english_coding_keywords_in_any_case(router: Router, text: str) -> None:
    assert route(router, text)[0] == "code"


@pytest.mark.parametrize(
    "text",
    ["please encode this string", "a classic novel", "barcodes everywhere", "the subclassing debate",
     "functional analysis", "dysfunction"],
)
def test_keyword_inside_a_longer_english_word_does_not_match(router: Router, text: str) -> None:
    assert route(router, text)[0] == "default"


@pytest.mark.parametrize("text", ["code를 고쳐줘", "class가 뭐예요?", "function(x)", "(code)", "code.", "«code»"])
def test_english_keyword_next_to_korean_or_punctuation_matches(router: Router, text: str) -> None:
    assert route(router, text)[0] == "code"


@pytest.mark.parametrize(("text", "rule"), [("ｃｏｄｅ please", "code"), ("ＣＯＤＥ", "code"), ("Ｆａｓｔ answer", "fast")])
def test_full_width_forms_are_normalised(router: Router, text: str, rule: str) -> None:
    assert route(router, text)[0] == rule


def test_korean_in_decomposed_jamo_still_matches(router: Router) -> None:
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "빠른 답변")
    assert decomposed != "빠른 답변"
    assert route(router, decomposed)[0] == "fast"


def test_fast_keywords(router: Router) -> None:
    assert route(router, "빠른 요약 부탁해") == ("fast", ("fast", "general"))
    assert route(router, "give me a FAST answer")[0] == "fast"
    assert route(router, "breakfast ideas")[0] == "default"


def test_prompt_length_boundary_is_2000_characters(router: Router) -> None:
    assert route(router, "a" * 2000)[0] == "default"
    assert route(router, "a" * 2001) == ("long-prompt", ("general70", "general", "fast"))
    # Characters, not bytes: 2001 Hangul syllables are 6003 UTF-8 bytes and still 2001 characters.
    assert route(router, "가" * 2000)[0] == "default"
    assert route(router, "가" * 2001)[0] == "long-prompt"


def test_length_rule_wins_over_keywords_by_order(router: Router) -> None:
    assert route(router, "코드 " + "a" * 2000)[0] == "long-prompt"


def test_length_rule_counts_the_whole_conversation(router: Router) -> None:
    messages = [{"role": "system", "content": "s" * 1500}, {"role": "user", "content": "hello " * 100}]
    assert router.route("auto", Prompt(messages=messages)).rule == "long-prompt"
    # Keywords look only at what users wrote: a system prompt mentioning code does not route to the coder.
    system_code = [{"role": "system", "content": "You review code."}, {"role": "user", "content": "hi"}]
    assert router.route("auto", Prompt(messages=system_code)).rule == "default"


def test_multimodal_content_parts_are_read_as_text(router: Router) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                             {"type": "text", "text": "이 함수 뭐예요"}]}]
    assert router.route("auto", Prompt(messages=messages)).rule == "code"


def test_completions_prompt_strings_and_token_ids(router: Router) -> None:
    assert router.route("auto", Prompt(prompt="빠른 답")).rule == "fast"
    assert router.route("auto", Prompt(prompt=["hello", "write code"])).rule == "code"
    assert router.route("auto", Prompt(prompt=[1, 2, 3])).rule == "default"


def test_direct_model_by_backend_name_or_model_id(router: Router) -> None:
    assert route(router, "빠른", model="code") == ("direct", ("code",))
    assert route(router, "hi", model="meta-llama/Llama-3.1-70B-Instruct") == ("direct", ("general70",))


def test_unknown_model_lists_available(router: Router) -> None:
    with pytest.raises(UnknownModelError) as caught:
        router.route("gpt-4o", Prompt.of_text("hi"))
    assert {"auto", "general", "code", "fast", "general70", "Qwen/Qwen2.5-Coder-7B-Instruct"} <= set(caught.value.available)


def _router(rules: list[dict[str, object]]) -> Router:
    import msgspec

    catalog = msgspec.convert({"backends": {n: {"url": "http://127.0.0.1:1", "model": f"m-{n}", "context_length": 1}
                                            for n in ("a", "b", "c")}}, Catalog)
    return Router(msgspec.convert({"rules": rules}, Routing), catalog)


def test_regex_model_alias_token_and_scope_matchers() -> None:
    router = _router([
        {"name": "sql", "match": {"regex": r"(?i)\bselect\b.+\bfrom\b"}, "target": "b"},
        {"name": "alias", "match": {"models": ["gpt-4o"]}, "target": "c"},
        {"name": "tokens", "match": {"tokens_over": 10, "scope": "last_user"}, "target": "c"},
        {"name": "short", "match": {"chars_under": 5}, "target": "b"},
        {"name": "default", "target": "a"},
    ])
    assert router.route("auto", Prompt.of_text("SELECT id FROM users")).rule == "sql"
    assert router.route("gpt-4o", Prompt.of_text("hello there")).rule == "alias"
    assert router.route("auto", Prompt.of_text("hello there")).rule == "default"  # alias rules need the alias
    long_last = [{"role": "user", "content": "x" * 100}, {"role": "user", "content": "hi there"}]
    assert router.route("auto", Prompt(messages=long_last)).rule == "default"  # only the last user message counts
    assert router.route("auto", Prompt(messages=long_last[::-1])).rule == "tokens"
    assert router.route("auto", Prompt.of_text("hey")).rule == "short"
    with pytest.raises(UnknownModelError):
        router.route("gpt-3.5", Prompt.of_text("x"))


def test_token_estimate_counts_korean_characters_individually() -> None:
    assert estimate_tokens("abcd" * 10) == 10
    assert estimate_tokens("안녕하세요") == 5
    assert estimate_tokens("") == 0


def test_keyword_check_reports_the_keyword_found() -> None:
    check = keyword_check(["코드", "class", "Unit Test", "c++"])
    assert check(ScopedText("파이썬 코드")) == "keyword '코드'"
    assert check(ScopedText("CLASS")) == "keyword 'class'"
    assert check(ScopedText("classical")) is None
    # Keywords that are not a single ASCII word match as substrings of the case-folded text.
    assert check(ScopedText("write a UNIT TEST")) == "keyword 'unit test'"
    assert check(ScopedText("modern C++ please")) == "keyword 'c++'"


def test_keyword_check_finds_what_a_plain_search_finds() -> None:
    """The check skips non-ASCII keywords on ASCII texts and matches words by set: on random
    mixed-script texts it must agree with searching each keyword in turn."""
    import random
    import re

    keywords = ["코드", "함수", "class", "go", "unit test", "c++", "x86_64", "é"]
    check = keyword_check(keywords)
    alphabet = "aclsgoutnix86_4+ .코드함수é"
    rng = random.Random(5)
    for _ in range(3000):
        text = normalise("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))).casefold()
        found = [k for k in keywords
                 if (re.search(rf"(?<![a-z0-9]){re.escape(k)}(?![a-z0-9])", text) if re.fullmatch(r"[a-z0-9]+", k)
                     else k in text)]
        assert (check(ScopedText(text)) is not None) == bool(found), (text, found)


def test_a_prompts_ascii_words_are_the_runs_a_regex_finds() -> None:
    """ScopedText.words finds words with bytes.translate (faster than a regex): it must find
    exactly the maximal runs of [a-z0-9] of the folded text, whatever surrounds them."""
    import random
    import re

    alphabet = "abcXYZ019 .,-_()'\"\n\t코드를é" + "ｃｏｄｅ" + "ß" + "ﬁ" + "²" + "\u200b"
    rng = random.Random(17)
    texts = ["", "class를", "(class)", "subclass classic", "파이썬 코드 python3 x86_64", "ＣＬＡＳＳ ｃｏｄｅ"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(2000)]
    for text in texts:
        scoped = ScopedText(normalise(text))
        expected = {w.encode() for w in re.findall(r"[a-z0-9]+", scoped.folded)}
        assert scoped.words == expected, text


def test_scopes_with_the_same_text_and_scopes_without_it() -> None:
    system = {"role": "system", "content": "You write SQL."}
    one = Prompt(messages=[{"role": "user", "content": "a quick question"}])
    assert one.scoped("all") is one.scoped("user") is one.scoped("last_user")
    two = Prompt(messages=[system, {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": "second"}])
    assert (two.text("all"), two.text("user"), two.text("last_user")) == (
        "You write SQL.\nfirst\nok\nsecond", "first\nsecond", "second")
    assert two.scoped("all").words == {b"you", b"write", b"sql", b"first", b"ok", b"second"}
    assert two.scoped("last_user").words == {b"second"}


@pytest.mark.parametrize("message", [
    {"role": "user", "content": "코드 please"},
    {"role": "system", "content": "You write SQL."},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "image_url", "image_url": {"url": "x"}},
                                 {"type": "text", "text": "둘째"}]},
    {"role": "user", "content": None},
    {"role": "user"},
    {"content": "no role"},
], ids=["user", "system", "assistant", "parts", "null-content", "no-content", "no-role"])
def test_a_single_message_has_the_scopes_a_conversation_of_one_would(message: dict[str, object]) -> None:
    """One message takes a shorter path (no joins): its scopes must read as they do when the same
    message follows another one, minus that one's text."""
    alone = Prompt(messages=[message])
    after = Prompt(messages=[{"role": "assistant", "content": "EARLIER"}, message])
    for scope in ("all", "user", "last_user"):
        expected = after.text(scope).removeprefix("EARLIER").removeprefix("\n")
        assert alone.text(scope) == expected, scope


def test_route_command_explains_the_decision() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dreamseed.cli", "route", "파이썬 함수 좀 짜줘", "--policies", str(SEED_POLICIES)],
        capture_output=True, text=True, check=True)
    out = result.stdout
    assert "skip  long-prompt" in out and "MATCH code: keyword '함수'" in out
    assert "backend: code (fallback: general -> fast)" in out
    assert "model: Qwen/Qwen2.5-Coder-7B-Instruct" in out

    long = subprocess.run([sys.executable, "-m", "dreamseed.cli", "route", "-", "--policies", str(SEED_POLICIES)],
                          input="z" * 2001, capture_output=True, text=True, check=True).stdout
    assert "rule: long-prompt" in long and "2001 characters > 2000" in long

    unknown = subprocess.run([sys.executable, "-m", "dreamseed.cli", "route", "x", "--model", "gpt-4", "--policies",
                              str(SEED_POLICIES)], capture_output=True, text=True)
    assert unknown.returncode == 1 and "unknown model 'gpt-4'" in unknown.stderr


def test_route_from_stdin_ignores_the_trailing_newline_and_survives_a_closed_pipe() -> None:
    """A 2000-character prompt piped in with `echo` is 2000 characters (not over the seed's
    long-prompt threshold), and `| head -1` does not end in a BrokenPipeError traceback."""
    prompt = "a" * 2000 + "\n"
    result = subprocess.run([sys.executable, "-m", "dreamseed.cli", "route", "-", "--policies", str(SEED_POLICIES)],
                            input=prompt, capture_output=True, text=True, check=True)
    assert "rule: default" in result.stdout, result.stdout
    # The reader is gone before the command writes a byte (what `| head -1` amounts to).
    reader_gone = subprocess.Popen([sys.executable, "-m", "dreamseed.cli", "route", "hello", "--policies",
                                    str(SEED_POLICIES)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader_gone.stdout is not None and reader_gone.stderr is not None
    reader_gone.stdout.close()
    errors = reader_gone.stderr.read()
    assert reader_gone.wait(timeout=30) == 0 and "Traceback" not in errors and "BrokenPipe" not in errors, errors
