"""The pure parts of RAG: chunking, the evaluation metrics, rag.yaml validation."""

from __future__ import annotations

import itertools
import math
import unicodedata
from pathlib import Path

import pytest
import yaml

from dreamseed.policy import PolicyError, load_policies
from dreamseed.rag.augment import format_context
from dreamseed.rag.chunking import chunk_text
from dreamseed.rag.evaluation import (
    EvalSet,
    EvalSetError,
    Injected,
    load_eval_set,
    mrr_at,
    ndcg_at,
    recall_at,
    scores,
)
from dreamseed.rag.language import language, without_particles
from dreamseed.rag.store import Hit
from support import ROOT, SEED_POLICIES


def test_paragraphs_that_fit_stay_whole_and_chunks_respect_the_size() -> None:
    text = "First paragraph about GPUs.\n\nSecond paragraph about routing.\n\n" + "Long sentence number x. " * 60
    chunks = chunk_text(text, size=200, overlap=50)
    # Small paragraphs are packed together, still separated as paragraphs.
    assert chunks[0].startswith("First paragraph about GPUs.\n\nSecond paragraph about routing.\n\nLong sentence")
    assert all(len(chunk) <= 200 for chunk in chunks)
    assert len(chunks) > 5


def test_consecutive_chunks_overlap_on_sentence_boundaries() -> None:
    sentences = [f"Sentence {i} says something distinct." for i in range(30)]
    chunks = chunk_text(" ".join(sentences), size=150, overlap=60)
    for before, after in itertools.pairwise(chunks):
        last = before.split(". ")[-1].rstrip(".") + "."
        assert after.startswith(last), (before, after)  # the tail sentence is carried over whole
    assert all(any(s in chunk for chunk in chunks) for s in sentences)  # nothing is lost


def test_korean_text_is_split_on_sentences_and_never_inside_a_syllable() -> None:
    text = "비밀번호를 잊어버렸다면 로그인 화면에서 찾기를 누르세요. " * 40
    chunks = chunk_text(text, size=120, overlap=30)
    assert len(chunks) > 5
    for chunk in chunks:
        assert len(chunk) <= 120
        assert chunk.startswith("비밀번호를") and chunk.endswith("누르세요.")


def test_decomposed_hangul_is_normalised_so_it_matches_what_users_type() -> None:
    decomposed = unicodedata.normalize("NFD", "코드 리뷰")
    assert chunk_text(decomposed) == ["코드 리뷰"]


def test_a_sentence_longer_than_a_chunk_is_cut_at_spaces() -> None:
    chunks = chunk_text("word " * 100, size=120, overlap=0)
    assert all(len(c) <= 120 and not c.startswith(" ") for c in chunks)
    assert " ".join(chunks).split() == ["word"] * 100


def test_empty_text_has_no_chunks() -> None:
    assert chunk_text("  \n\n ") == []


def test_metrics_follow_the_standard_definitions() -> None:
    relevant = {"a": 2, "b": 1, "z": 0}
    ranked = ["x", "b", "y", "a"]
    assert recall_at(ranked, relevant, 10) == 1.0
    assert recall_at(ranked, relevant, 2) == 0.5
    assert mrr_at(ranked, relevant, 10) == 0.5
    assert mrr_at(["x", "z"], relevant, 10) == 0.0  # grade 0 is not relevant
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    ideal = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at(ranked, relevant, 10) == pytest.approx(dcg / ideal)
    assert ndcg_at(["a", "b"], relevant, 10) == pytest.approx(1.0)


def test_the_golden_set_is_big_enough_and_bilingual() -> None:
    golden = load_eval_set(ROOT / "tests" / "data" / "golden_support")
    assert len(golden.corpus) >= 40 and len(golden.queries) >= 60
    languages = [language(text) for text in golden.queries.values()]
    assert languages.count("ko") >= 30 and languages.count("en") >= 30
    answerable = [q for q, rel in golden.qrels.items() if any(g > 0 for g in rel.values())]
    assert len(answerable) >= 60
    # Queries the corpus has no answer for (every judged document grade 0), in both languages: with
    # them `rag eval` measures that nothing gets injected when nothing is relevant.
    unanswerable = [golden.queries[q] for q in golden.queries if q not in answerable]
    assert sorted(language(text) for text in unanswerable) == ["en"] * 4 + ["ko"] * 4


def test_context_figures_count_injected_passages_and_empty_answers_to_unanswerable_queries() -> None:
    golden = EvalSet("t", {d: ("", d) for d in "abcd"}, {"q1": "one", "q2": "two", "q3": "셋", "u1": "none"},
                     {"q1": {"a": 1}, "q2": {"b": 2}, "q3": {"c": 1}, "u1": {"d": 0}})
    injected = {"q1": Injected(["a", "d"], 0.002), "q2": Injected(["c"], 0.004), "q3": Injected(["c", "c"], 0.001),
                "u1": Injected([], 0.003)}
    runs = {"q1": ["a"], "q2": ["c", "b"], "q3": ["c"]}
    result = scores(runs, injected, golden, k=10)
    assert result["all"]["queries"] == 3 and result["all"]["unanswerable"] == 1
    assert result["all"]["context_precision"] == pytest.approx(3 / 5)  # a, c, c of a, d, c, c, c
    assert result["all"]["context_recall"] == pytest.approx(2 / 3)  # q2 got only an irrelevant passage
    assert result["all"]["unanswerable_empty"] == 1.0 and result["all"]["passages"] == pytest.approx(5 / 4)
    assert result["ko"]["queries"] == 1 and result["ko"]["context_precision"] == 1.0
    assert result["all"]["p50_ms"] == pytest.approx(2.5) and result["en"]["recall"] == 1.0
    injected["u1"] = Injected(["a"], 0.003)
    assert scores(runs, injected, golden, k=10)["all"]["unanswerable_empty"] == 0.0


def test_korean_particles_come_off_long_words_only() -> None:
    assert without_particles("429 오류가 계속 나요") == "429 오류 계속 나요"
    assert without_particles("답변을 스트리밍으로 받는 방법") == "답변 스트리밍 받는 방법"
    assert without_particles("카드를 바꾸고, 고양이를 봐요") == "카드 바꾸고, 고양이 봐요"
    assert without_particles("나는 English stays") == "나는 English stays"  # two syllables: whole


def test_long_queries_are_embedded_from_their_beginning_and_end() -> None:
    from dreamseed.policy import EmbedderPolicy
    from dreamseed.rag.embedders import FastEmbedder
    from support import rag_model_dir

    embedder = FastEmbedder(EmbedderPolicy(model_path=str(rag_model_dir())), {})
    short = "how do I reset my password"
    assert embedder.shorten(short, 64) == short
    long = "First I tried the settings page. " + "Then nothing happened at all. " * 60 + "Why is my API key rejected?"
    cut = embedder.shorten(long, 64)
    assert cut.startswith("First I tried the settings page.") and cut.endswith("Why is my API key rejected?")
    assert " … " in cut and 56 <= embedder.token_counts([cut])[0] <= 68


def test_each_workers_embedder_gets_its_share_of_the_cores() -> None:
    """With `serve --workers N` every worker loads the model: each ONNX session gets cores // N
    threads (at least one), so N workers embedding at once do not run N x cores threads."""
    from dreamseed.policy import EmbedderPolicy
    from dreamseed.rag.embedders import FastEmbedder
    from dreamseed.workers import cores_available
    from support import rag_model_dir

    def threads(environ: dict[str, str]) -> int:
        model = FastEmbedder(EmbedderPolicy(model_path=str(rag_model_dir())), environ)._model.model
        return int(model.model.get_session_options().intra_op_num_threads)  # type: ignore[attr-defined]

    cores = cores_available()
    assert threads({"DREAMSEED_WORKERS": str(max(cores, 2))}) == 1
    assert threads({"DREAMSEED_WORKERS": str(4 * cores)}) == 1
    assert threads({}) == 0  # one process: ONNX Runtime's default (one per core)


def test_a_broken_eval_set_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n', encoding="utf-8")
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n', encoding="utf-8")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td9\t1\n", encoding="utf-8")
    with pytest.raises(EvalSetError, match=r"test.tsv:2: unknown corpus id 'd9'"):
        load_eval_set(tmp_path)


def test_context_is_numbered_with_sources_and_capped() -> None:
    hits = [Hit(i, f"s{i}", 0, "x" * 50, {}, 1.0, None) for i in range(5)]
    text, used = format_context(hits, 130)
    assert used == 2 and text == f"[1] (s0) {'x' * 50}\n\n[2] (s1) {'x' * 50}"
    alone, used = format_context([Hit(1, "big", 0, "y" * 500, {}, 1.0, None)], 100)
    assert used == 1 and len(alone) == 100 and alone.endswith("…")


def _policies_with_rag(tmp_path: Path, rag: str) -> Path:
    directory = tmp_path / "p"
    directory.mkdir()
    for name in ("backends.yaml", "routing.yaml"):
        (directory / name).write_text((SEED_POLICIES / name).read_text(encoding="utf-8"), encoding="utf-8")
    (directory / "rag.yaml").write_text(rag, encoding="utf-8")
    return directory


@pytest.mark.parametrize(("rag", "expected"), [
    ("rules:\n  no-such-rule:\n    enabled: true\n", "rag.yaml:2: rules.no-such-rule: unknown routing rule"),
    ("backends:\n  nope:\n    top_k: 2\n", "rag.yaml:2: backends.nope: unknown backend 'nope'"),
    ("defaults:\n  template: 'Context: {ctx}'\n", "rag.yaml:2: defaults.template: unknown placeholder(s) {ctx}"),
    ("defaults:\n  template: 'Query: {query}'\n", "defaults.template: the template must contain {context}"),
    ("defaults:\n  mode: semantic\n", "rag.yaml:2: defaults.mode: Invalid enum value 'semantic'"),
    ("defaults:\n  top_k: 0\n", "rag.yaml:2: defaults.top_k: Expected `int` >= 1"),
    ("chunking:\n  size: 400\n  overlap: 300\n", "rag.yaml:3: chunking.overlap: must be less than half of `size`"),
    ("embedder:\n  kind: openai\n  model: e5\n", "embedder.dim: an `openai` embedder must state `dim`"),
    ("store:\n  table: Robert'); DROP TABLE students;--\n", "rag.yaml:2: store.table: Expected `str` matching"),
])
def test_rag_policy_mistakes_name_file_line_and_field(tmp_path: Path, rag: str, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policies(_policies_with_rag(tmp_path, rag))
    assert expected in str(caught.value), str(caught.value)


def test_settings_layer_defaults_then_backend_then_rule(tmp_path: Path) -> None:
    rag = yaml.safe_dump({"defaults": {"enabled": True, "top_k": 4, "collection": "support"},
                          "backends": {"general70": {"top_k": 8, "max_context_chars": 12000}},
                          "rules": {"long-prompt": {"top_k": 6}, "fast": {"enabled": False}}})
    policies = load_policies(_policies_with_rag(tmp_path, rag))
    long_prompt = policies.rag.settings("long-prompt", "general70")
    assert (long_prompt.top_k, long_prompt.max_context_chars, long_prompt.collection) == (6, 12000, "support")
    assert policies.rag.settings("default", "general").top_k == 4
    assert not policies.rag.settings("fast", "fast").enabled
    assert policies.rag.settings("default", "general").template == "Context:\n{context}\nQuery: {query}"


def test_the_seed_policies_pass_with_their_rag_file() -> None:
    policies = load_policies(SEED_POLICIES)
    assert policies.rag.used


def test_concurrent_queries_share_embedder_runs() -> None:
    import asyncio
    import threading

    import numpy as np

    from dreamseed.rag.embedders import BatchingEmbedder

    class Recording:
        model, dim = "fake", 2

        def __init__(self) -> None:
            self.batches: list[int] = []
            self.gate = threading.Event()

        def embed(self, texts):  # type: ignore[no-untyped-def]
            self.gate.wait(5)  # the first run blocks while more queries arrive
            self.batches.append(len(texts))
            return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

        def token_counts(self, texts):  # type: ignore[no-untyped-def]
            return [1 for _ in texts]

    async def scenario() -> list[list[float]]:
        inner = Recording()
        batching = BatchingEmbedder(inner, max_batch=64)
        tasks = [asyncio.create_task(batching.embed_one("x" * (i + 1))) for i in range(20)]
        await asyncio.sleep(0.05)
        inner.gate.set()
        vectors = await asyncio.gather(*tasks)
        batching.close()
        assert sum(inner.batches) == 20 and len(inner.batches) <= 3, inner.batches  # not 20 separate runs
        return [v.tolist() for v in vectors]

    vectors = asyncio.run(scenario())
    assert [v[0] for v in vectors] == [float(i + 1) for i in range(20)]  # each caller gets its own row


def test_a_bulk_embedding_never_holds_up_a_query() -> None:
    import asyncio
    import threading

    import numpy as np

    from dreamseed.rag.embedders import BatchingEmbedder

    release = threading.Event()

    class Slow:
        model, dim = "fake", 1

        def embed(self, texts):  # type: ignore[no-untyped-def]
            if len(texts) > 1:
                release.wait(5)  # a big /v1/embeddings or ingest batch, still running
            return np.ones((len(texts), 1), dtype=np.float32)

        def token_counts(self, texts):  # type: ignore[no-untyped-def]
            return [1 for _ in texts]

    async def scenario() -> None:
        batching = BatchingEmbedder(Slow())
        bulk = asyncio.create_task(batching.embed_many(["a", "b", "c"]))
        await asyncio.sleep(0.05)
        query = await asyncio.wait_for(batching.embed_one("q"), 2)  # answered while the bulk run blocks
        assert query.tolist() == [1.0] and not bulk.done()
        release.set()
        assert (await bulk).shape == (3, 1)
        batching.close()

    asyncio.run(scenario())
