"""`dreamseed eval answers`: the scores (SQuAD's and KorQuAD's definitions), the question set's
errors by file and line, and whole runs as processes against a real proxy with the embedded store:
a simulated backend that records what it was sent (the two arms, the cache, the judge's parsing,
failures), and llama-server with SmolLM2 for the real plumbing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dreamseed.answers.judge import parse_verdict
from dreamseed.answers.scoring import bootstrap_difference, contains, exact_match, f1, normalize
from support import ROOT, Process, Sim, free_port, start_proxy, start_sim, write_policies, write_rag

GOLDEN = ROOT / "tests" / "data" / "golden_support"
QUESTIONS = [
    {"_id": "q-e01", "question": "How long is the password reset link valid?", "answers": ["30 minutes"]},
    {"_id": "q-e03", "question": "Where are API keys created?", "answers": ["in the dashboard", "Settings > API keys"]},
    {"_id": "q-e05", "question": "How many concurrent requests does a 7B model backend accept?", "answers": ["16"]},
    {"_id": "q-k01", "question": "비밀번호 재설정 링크는 몇 분 동안 유효한가요?", "answers": ["30분"]},
    {"_id": "q-k02", "question": "2단계 인증은 어느 메뉴에서 켤 수 있나요?", "answers": ["계정 > 보안", "보안 메뉴"]},
    {"_id": "q-k03", "question": "API 키는 생성 직후 몇 번 표시되나요?", "answers": ["한 번"], "lang": "ko"},
]


def answer_set(directory: Path, questions: list[dict[str, object]] = QUESTIONS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(GOLDEN / "corpus.jsonl", directory / "corpus.jsonl")
    (directory / "questions.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions),
                                               encoding="utf-8")
    return directory


def eval_cli(*args: str, state: Path, policies: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dreamseed.cli", "eval", "answers", *args, "--policies", str(policies),
                           "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "DREAMSEED_STATE_DIR": str(state)})


def collections(state: Path, policies: Path) -> str:
    return subprocess.run([sys.executable, "-m", "dreamseed.cli", "rag", "collections", "--policies", str(policies)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=True,
                          env={**os.environ, "DREAMSEED_STATE_DIR": str(state)}).stdout


# -- scores ----------------------------------------------------------------------------------------

def test_normalization_is_nfkc_casefolded_without_punctuation_or_english_articles() -> None:
    assert normalize("The  Ｅｉｆｆｅｌ Tower!") == "eiffel tower"  # full-width letters are NFKC'd
    assert normalize("U.S. $5, an apple") == "us 5 apple"
    assert normalize("그 탑은 '에펠탑'입니다.", "ko") == "그 탑은 에펠탑입니다"  # "the" is English only


def test_accuracy_finds_a_gold_answer_inside_the_answer_by_words_in_english_and_within_words_in_korean() -> None:
    assert contains("The link is valid for 30 minutes.", ["30 minutes"]) == 1.0
    assert contains("It is valid for 300 minutes.", ["30 minutes"]) == 0.0  # whole words: 30 is not 300
    assert contains("링크는 30분 동안 유효합니다.", ["30분"], "ko") == 1.0
    assert contains("계정 보안 메뉴에서 켭니다", ["계정 > 보안"], "ko") == 1.0  # the symbol goes, the words stay
    assert contains("anything", ["..."]) == 0.0  # a gold answer that normalises to nothing matches nothing


def test_exact_match_and_f1_as_squad_and_korquad_compute_them() -> None:
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower", "tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # SQuAD: tokens after normalisation, best gold answer: "cat sat" against "cat sat on mat" is P 1, R 0.5.
    assert f1("the cat sat", ["cat sat on mat", "dog"]) == pytest.approx(2 / 3)
    assert f1("nothing alike", ["cat"]) == 0.0
    # KorQuAD: characters, so a particle costs a little, not everything: 서울에서 against 서울 is P 2/4, R 1.
    assert f1("서울에서", ["서울"], "ko") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1("서울에서", ["서울"], "en") == 0.0  # as words it would be wrong


def test_the_bootstrap_interval_brackets_the_paired_difference() -> None:
    assert bootstrap_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    mean, low, high = bootstrap_difference([1.0] * 40 + [0.0] * 10, [0.0] * 45 + [1.0] * 5)
    assert mean == pytest.approx(0.7) and 0.45 < low < mean < high < 0.95  # about 0.7 ± 1.96 × 0.09
    assert bootstrap_difference([1.0, 0.0] * 20, [0.0, 1.0] * 20)[1] < 0 < bootstrap_difference([1.0, 0.0] * 20,
                                                                                             [0.0, 1.0] * 20)[2]


def test_judge_verdicts_are_read_strictly() -> None:
    assert parse_verdict("CORRECT") is True and parse_verdict(" incorrect.\n") is False
    assert parse_verdict("**Correct**") is True
    for unclear in ("Yes", "CORRECT, mostly", "The answer is CORRECT", "", "INCORRECT CORRECT"):
        assert parse_verdict(unclear) is None


def test_the_table_says_when_retrieval_was_off_for_requests_meant_to_retrieve() -> None:
    from dreamseed.answers.asking import Answer
    from dreamseed.answers.dataset import Question
    from dreamseed.answers.report import summarize, table

    questions = [Question("a", "Where?", ("Paris",), "en"), Question("b", "어디?", ("서울",), "ko")]
    answers = [Answer("a", "with_rag", "In Paris.", 0.5, "off"), Answer("a", "without_rag", "No idea", 0.4, "off"),
               Answer("b", "with_rag", "서울입니다", 0.6, "hits=2"), Answer("b", "without_rag", "", 0.3, "off")]
    result = summarize(questions, answers)
    assert result["with_rag"]["all"]["rag_off"] == 1 and result["with_rag"]["ko"]["accuracy"] == 1.0
    text = table(result)
    assert "note: 1 requests meant to retrieve were answered without retrieval" in text
    assert "scored 2 of 2 questions" in text


# -- the question set ------------------------------------------------------------------------------

def test_a_bad_question_set_is_refused_naming_each_file_and_line(tmp_path: Path) -> None:
    folder = answer_set(tmp_path / "set")
    with (folder / "questions.jsonl").open("a", encoding="utf-8") as lines:
        lines.write('{"_id": "q7", "question": "no answers"}\n')
        lines.write("this is not json\n")
        lines.write('{"_id": "q9", "question": "empty answers", "answers": []}\n')
        lines.write('{"_id": "q-e01", "question": "again", "answers": ["x"]}\n')
    result = eval_cli(str(folder), "--proxy", f"http://127.0.0.1:{free_port()}", state=tmp_path / "state",
                      policies=ROOT / "policies")
    assert result.returncode == 2, result.stderr
    lines = f"{folder / 'questions.jsonl'}"
    assert f"{lines}:7: `answers` must be a non-empty list" in result.stderr
    assert f"{lines}:8: not JSON" in result.stderr
    assert f"{lines}:9: `answers` must be a non-empty list" in result.stderr
    assert f"{lines}:10: `_id` 'q-e01' repeats line 1" in result.stderr
    (folder / "corpus.jsonl").unlink()
    assert f"{folder / 'corpus.jsonl'}: missing" in eval_cli(str(folder), state=tmp_path / "state",
                                                             policies=ROOT / "policies").stderr


# -- whole runs, simulated backend -----------------------------------------------------------------

@dataclass
class Stack:
    proxy: Process
    sim: Sim  # the model that answers
    judge: Sim  # the judge backend
    state: Path
    policies: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sim, judge = start_sim("m", tokens=16), start_sim("j", tokens=8)
    state = tmp_path_factory.mktemp("state")
    policies = write_rag(write_policies(tmp_path_factory.mktemp("policies"), {
        "general": {"url": sim.url, "model": "m", "context_length": 4096},
        "judge": {"url": judge.url, "model": "j", "context_length": 4096}},
        {"rules": [{"name": "default", "target": "general"}]}),
        {"defaults": {"enabled": True, "collection": "support", "mode": "hybrid", "top_k": 2}})
    proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(state)})
    try:
        yield Stack(proxy, sim, judge, state, policies)
    finally:
        proxy.stop()
        sim.stop()
        judge.stop()


def test_each_question_is_asked_with_and_without_retrieval_and_scored_per_language(
        tmp_path: Path, stack: Stack) -> None:
    proxy, sim, state, policies = stack.proxy, stack.sim, stack.state, stack.policies
    sim.reset()
    sim.configure(answer="It is 30 minutes, 16, 30분 or 한 번.")
    folder = answer_set(tmp_path / "support-set")
    result = eval_cli(str(folder), "--proxy", proxy.url, "--json", "--concurrency", "2", state=state, policies=policies)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert set(scores["with_rag"]) == set(scores["without_rag"]) == {"all", "en", "ko"}
    for arm in ("with_rag", "without_rag"):
        assert {k: scores[arm]["all"][k] for k in ("n", "accuracy")} == {"n": 6, "accuracy": 4 / 6}
        assert scores[arm]["en"]["n"] == 3 and scores[arm]["ko"]["n"] == 3
        assert scores[arm]["en"]["accuracy"] == pytest.approx(2 / 3) and scores[arm]["ko"]["accuracy"] == pytest.approx(2 / 3)
        assert 0 < scores[arm]["all"]["p50_ms"] <= scores[arm]["all"]["p95_ms"]
    assert scores["difference"]["all"]["accuracy"] == [0.0, 0.0, 0.0]  # the simulated answer ignores the context
    assert scores["with_rag"]["all"]["rag_off"] == 0 and scores["without_rag"]["all"]["rag_off"] == 6
    # What the backend got: twelve requests, six of them with passages from the throwaway collection.
    bodies = sim.stats()
    assert bodies["requests"] == 12
    assert bodies["last_body"]["temperature"] == 0 and bodies["last_body"]["max_tokens"] == 64
    # The throwaway collection is gone after a complete run; the cache answers a second run alone.
    assert "eval-answers-support-set" not in collections(state, policies)
    again = eval_cli(str(folder), "--proxy", proxy.url, "--json", state=state, policies=policies)
    assert again.returncode == 0 and json.loads(again.stdout)["with_rag"] == scores["with_rag"]
    assert sim.stats()["requests"] == 12  # nothing asked again, nothing ingested again
    table = eval_cli(str(folder), "--proxy", proxy.url, state=state, policies=policies).stdout
    assert "with rag" in table and "without rag" in table and "scored 6 of 6 questions" in table


def test_the_with_rag_arm_carries_the_corpus_passages_and_the_other_does_not(
        tmp_path: Path, stack: Stack) -> None:
    proxy, sim, state, policies = stack.proxy, stack.sim, stack.state, stack.policies
    sim.reset()
    folder = answer_set(tmp_path / "one", QUESTIONS[:1])
    result = eval_cli(str(folder), "--proxy", proxy.url, "--json", "--concurrency", "1", "--keep-collection",
                      "--fresh", state=state, policies=policies)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["with_rag"]["all"]["rag_off"] == 0
    assert "eval-answers-one: 44 sources" in collections(state, policies)  # --keep-collection
    # Asked one at a time, with_rag first: the last request is the one without retrieval.
    assert [m["role"] for m in sim.stats()["last_body"]["messages"]] == ["user"]
    sim.reset()
    with httpx.Client() as client:  # the kept collection answers the with-RAG switch as eval sent it
        response = client.post(f"{proxy.url}/v1/chat/completions", headers={"x-dreamseed-rag": "collection=eval-answers-one"},
                               json={"model": "auto", "messages": [{"role": "user", "content": QUESTIONS[0]["question"]}]})
    assert response.headers["x-dreamseed-rag"].startswith("hits=")
    assert "(e01) Reset your password" in sim.stats()["last_body"]["messages"][0]["content"]


def test_a_judge_backend_grades_answers_and_unclear_verdicts_are_counted_not_guessed(
        tmp_path: Path, stack: Stack) -> None:
    proxy, state, policies = stack.proxy, stack.state, stack.policies
    folder = answer_set(tmp_path / "judged", QUESTIONS[:1])
    for verdict, judge, unparsed in (("CORRECT", 1.0, 0), ("Incorrect.", 0.0, 0), ("It seems right", 0.0, 1)):
        stack.judge.configure(answer=verdict)
        result = eval_cli(str(folder), "--proxy", proxy.url, "--json", "--judge", "judge", "--fresh",
                          state=state, policies=policies)
        assert result.returncode == 0, result.stderr
        row = json.loads(result.stdout)["with_rag"]["all"]
        assert (row["judge"], row["judge_unparsed"], row["judge_failed"]) == (judge, unparsed, 0), verdict
    judged = stack.judge.stats()["last_body"]
    assert judged["model"] == "j" and judged["messages"][0]["content"].startswith("You are grading an answer")
    assert "Question: How long is the password reset link valid?\nAcceptable answers: 30 minutes\n" \
        in judged["messages"][0]["content"]
    assert judged["max_tokens"] == 8 and [m["role"] for m in judged["messages"]] == ["user"]  # no retrieval for it


def test_a_proxy_that_is_down_or_answers_errors_is_named_and_a_partial_run_says_what_it_scored(
        tmp_path: Path, stack: Stack) -> None:
    proxy, sim, state, policies = stack.proxy, stack.sim, stack.state, stack.policies
    folder = answer_set(tmp_path / "failing", QUESTIONS[:3])
    down = f"http://127.0.0.1:{free_port()}"
    result = eval_cli(str(folder), "--proxy", down, "--collection", "support", state=state, policies=policies)
    assert result.returncode == 1 and f"cannot reach the proxy at {down}" in result.stderr
    sim.reset()
    sim.configure(error_rate=1.0, error_status=400)
    try:
        result = eval_cli(str(folder), "--proxy", proxy.url, "--fresh", state=state, policies=policies)
    finally:
        sim.reset()
    assert result.returncode == 1
    assert "scored 0 of 3 questions; 6 requests failed, first: question q-e01" in result.stdout
    assert "HTTP 400" in result.stdout and "the same command asks only the rest" in result.stderr
    # Once the backend answers, the rerun asks what failed and scores everything.
    result = eval_cli(str(folder), "--proxy", proxy.url, "--json", state=state, policies=policies)
    assert result.returncode == 0 and json.loads(result.stdout)["scored"] == 3
    refused = eval_cli(str(folder), "--proxy", proxy.url, "--collection", "payroll", state=state, policies=policies)
    assert refused.returncode == 1 and "collection_not_allowed" in refused.stdout


# -- a whole run, real model -----------------------------------------------------------------------

def test_a_real_model_answers_both_arms_and_judges_through_the_proxy(tmp_path: Path) -> None:
    from real_server import SMOLLM_ID, start_llama

    llama = start_llama(context=4096)
    state = tmp_path / "state"
    policies = write_rag(write_policies(tmp_path / "policies", {
        "general": {"url": llama.url, "model": SMOLLM_ID, "context_length": 4096, "max_concurrency": 2,
                    # A real model on a shared 2-core machine: slow, and its slowness is not under test.
                    "timeouts": {"connect": 5, "read": 300, "write": 30, "pool": 300}}},
        {"rules": [{"name": "default", "target": "general"}]}),
        {"defaults": {"enabled": True, "collection": "support", "top_k": 2}})
    proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(state)})
    try:
        folder = answer_set(tmp_path / "real", [QUESTIONS[0], QUESTIONS[3]])
        result = eval_cli(str(folder), "--proxy", proxy.url, "--json", "--judge", "general", "--max-tokens", "32",
                          state=state, policies=policies)
    finally:
        proxy.stop()
        llama.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    scores = json.loads(result.stdout)
    assert scores["scored"] == 2 and scores["failed_requests"] == 0
    with_rag, without_rag = scores["with_rag"]["all"], scores["without_rag"]["all"]
    assert with_rag["rag_off"] == 0 and without_rag["rag_off"] == 2
    assert with_rag["p50_ms"] > 0 and without_rag["p50_ms"] > 0
    # Every answer got a verdict request; SmolLM2 may or may not reply in the rubric's one word.
    for row in (with_rag, without_rag):
        assert row["judge_failed"] == 0 and 0 <= row["judge_unparsed"] <= 2 and 0.0 <= row["judge"] <= 1.0


def test_a_corpus_that_does_not_ingest_is_named_and_nothing_is_asked(tmp_path: Path) -> None:
    folder = answer_set(tmp_path / "unstorable", QUESTIONS[:1])
    with (folder / "corpus.jsonl").open("a", encoding="utf-8") as lines:  # PostgreSQL text cannot hold NUL
        lines.write(json.dumps({"_id": "nul", "title": "t", "text": "a passage with a \u0000 in it"}) + "\n")
    sim = start_sim("m")
    state = tmp_path / "state"
    policies = write_rag(write_policies(tmp_path / "p", {"general": {"url": sim.url, "model": "m", "context_length": 4096}},
                                        {"rules": [{"name": "default", "target": "general"}]}),
                         {"defaults": {"enabled": True, "collection": "support"}})
    proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(state)})
    try:
        result = eval_cli(str(folder), "--proxy", proxy.url, state=state, policies=policies)
        asked = sim.stats()["requests"]
    finally:
        proxy.stop()
        sim.stop()
    assert result.returncode == 1 and asked == 0, result.stdout + result.stderr
    assert "the corpus of unstorable did not ingest into eval-answers-unstorable" in result.stderr
    assert "nothing was asked" in result.stderr and "Traceback" not in result.stderr


def test_two_questions_that_read_the_same_are_both_scored_from_the_cache(tmp_path: Path, stack: Stack) -> None:
    twins = [QUESTIONS[0], {**QUESTIONS[0], "_id": "q-e01-again"}]
    folder = answer_set(tmp_path / "twins", twins)
    for _ in range(2):  # asked, then answered from the cache
        result = eval_cli(str(folder), "--proxy", stack.proxy.url, "--json", state=stack.state, policies=stack.policies)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["scored"] == 2
