"""``dreamseed eval answers DIR``: answer accuracy with and without retrieval, through a running proxy.

The corpus goes into a throwaway collection (`eval-answers-<set>`, deleted after a complete run)
unless --collection names one; each question is asked twice through the proxy, with retrieval
(`x-dreamseed-rag: collection=...`) and without (`x-dreamseed-rag: off`), and scored
(answers/scoring.py says how). Answers are cached as they come (keyed by question, arm, model,
max_tokens, collection and the policies' hash, less rag.yaml for the arm without retrieval), so an
interrupted run resumes, a changed policy asks again, and comparing two templates asks only the
arm with retrieval again."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from tqdm import tqdm

from ..answers.asking import ARMS, AnswerCache, Asking, ProxyDownError, ask_all, cache_key
from ..answers.dataset import AnswerSet, AnswerSetError, load_answer_set
from ..answers.judge import judge_all
from ..answers.report import summarize, table
from ..rag.augment import EVAL_COLLECTION_PREFIX
from ..rag.database import state_directory
from ..runtime import policy_hash
from .common import DEFAULT_POLICIES, load_or_exit, run_until_signalled
from .rag import opened_store

DEFAULT_PROXY = "http://127.0.0.1:8080"


def throwaway_collection(answer_set: AnswerSet) -> str:
    return f"{EVAL_COLLECTION_PREFIX}answers-{re.sub(r'[^A-Za-z0-9_.-]+', '-', answer_set.name).strip('-') or 'set'}"


async def ingest(policies: str, collection: str, answer_set: AnswerSet, quiet: bool) -> None:
    from ..rag.ingest import ingest_texts

    rag = load_or_exit(policies).rag
    documents = [(p.id, f"{p.title}\n\n{p.text}" if p.title else p.text, {"title": p.title}) for p in answer_set.corpus]
    bar = tqdm(total=0, unit="chunk", desc=f"ingesting into {collection}", disable=quiet, file=sys.stderr)

    def planned(chunks: int) -> None:
        bar.total = chunks
        bar.refresh()

    async with opened_store(rag) as retriever:
        assert retriever.store is not None and retriever.embedder is not None
        try:
            summary = await ingest_texts(retriever.store, retriever.embedder, collection, documents, rag.chunking,
                                         progress=bar.update, planned=planned)
        except Exception as exc:  # noqa: BLE001 - the store's or the embedder's refusal, said in one line
            raise SystemExit(f"dreamseed: the corpus of {answer_set.name} did not ingest into {collection}: "
                             f"{type(exc).__name__}: {exc}; nothing was asked") from None
        finally:
            bar.close()
    if summary.errors:
        raise SystemExit(f"dreamseed: the corpus did not ingest into {collection}: " + "; ".join(summary.errors[:5]))


async def drop(policies: str, collection: str) -> None:
    async with opened_store(load_or_exit(policies).rag) as retriever:
        assert retriever.store is not None
        await retriever.store.delete(collection, None)


def cmd_answers(args: argparse.Namespace) -> int:
    try:
        answer_set = load_answer_set(args.directory)
    except AnswerSetError as exc:
        print(f"dreamseed: {exc}", file=sys.stderr)
        return 2
    questions = answer_set.questions[:args.limit] if args.limit else answer_set.questions
    throwaway = args.collection is None
    if throwaway and not answer_set.corpus:
        print(f"dreamseed: {args.directory}/corpus.jsonl has no passages; name an ingested collection with --collection",
              file=sys.stderr)
        return 2
    collection = args.collection or throwaway_collection(answer_set)
    asking = Asking(proxy=args.proxy.rstrip("/"), key=args.key, model=args.model, max_tokens=args.max_tokens,
                    collection=collection, concurrency=args.concurrency, timeout=args.timeout,
                    policy_hash=policy_hash(Path(args.policies)),
                    policy_hash_without_rag=policy_hash(Path(args.policies), leave_out=("rag.yaml",)))
    cache_path = Path(args.cache) if args.cache else state_directory() / "eval" / (
        f"answers-{answer_set.name}-" + hashlib.sha256(asking.model.encode()).hexdigest()[:12] + ".jsonl")
    if args.fresh and cache_path.exists():
        cache_path.unlink()
    cache = AnswerCache(cache_path)
    result: dict[str, object] = {}

    async def main() -> int:
        uncached = [q for q in questions if cache.get(cache_key(asking, "with_rag", q.text)) is None]
        if throwaway and uncached:
            await ingest(args.policies, collection, answer_set, args.quiet)
        with tqdm(total=len(questions) * len(ARMS), unit="answer", desc="asking", disable=args.quiet,
                  file=sys.stderr) as bar:
            answers = await ask_all(questions, asking, cache, progress=lambda: bar.update())
        verdicts = None
        if args.judge:
            by_id = {q.id: q for q in questions}
            with tqdm(total=len(answers), unit="verdict", desc=f"judging with {args.judge}", disable=args.quiet,
                      file=sys.stderr) as bar:
                verdicts = await judge_all(answers, by_id, asking, args.judge, cache, progress=lambda: bar.update())
        result.update(summarize(questions, answers, verdicts))
        print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else table(result))
        if result["failed_requests"]:
            print(f"dreamseed: {result['failed_requests']} requests failed; the answers that came are cached in "
                  f"{cache_path}: the same command asks only the rest", file=sys.stderr)
            return 1
        if throwaway and not args.keep_collection:
            await drop(args.policies, collection)
        return 0

    def interrupted(_: str) -> str:
        return (f"stopped: {len(cache)} answers are cached in {cache_path}; the same command resumes from them"
                + (f" (collection {collection} kept)" if throwaway else ""))

    try:
        return run_until_signalled(main(), interrupted)
    except ProxyDownError as exc:
        print(f"dreamseed: {exc}", file=sys.stderr)
        return 1
    finally:
        cache.close()


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    evaluation = commands.add_parser("eval", help="evaluate answers end to end through a running proxy")
    sub = evaluation.add_subparsers(dest="eval_command", required=True)
    answers = sub.add_parser("answers", help="accuracy, exact match and F1 of the proxy's answers with and without "
                                             "retrieval, on a folder with corpus.jsonl and questions.jsonl")
    answers.add_argument("directory")
    answers.add_argument("--proxy", default=DEFAULT_PROXY, help="the running proxy (default: %(default)s)")
    answers.add_argument("--key", help="a client key, for a proxy with keys")
    answers.add_argument("--model", default="auto", help="the model to ask, as a client would (default: %(default)s, "
                                                         "routed by the rules)")
    answers.add_argument("--collection", help="use this ingested collection instead of ingesting the corpus (the "
                                              "rules' own, or an eval-... one)")
    answers.add_argument("--keep-collection", action="store_true", help="keep the throwaway collection after the run")
    answers.add_argument("--judge", metavar="BACKEND", help="also have this backend (or model) judge each answer")
    answers.add_argument("--concurrency", type=int, default=4, help="questions in flight at once (default: %(default)s)")
    answers.add_argument("--max-tokens", dest="max_tokens", type=int, default=64,
                         help="tokens an answer may have (default: %(default)s)")
    answers.add_argument("--timeout", type=float, default=300, help="seconds a request may take (default: %(default)s)")
    answers.add_argument("--limit", type=int, help="ask only the first N questions")
    answers.add_argument("--cache", help="the answer cache file (default: <state>/eval/answers-<set>-<hash>.jsonl)")
    answers.add_argument("--fresh", action="store_true", help="forget cached answers and ask again")
    answers.add_argument("--policies", default=DEFAULT_POLICIES,
                         help="the proxy's policy directory: its store, and its hash in the cache keys "
                              "(default: %(default)s)")
    answers.add_argument("--quiet", action="store_true", help="no progress bars")
    answers.add_argument("--json", action="store_true", help="print the scores as JSON")
    answers.set_defaults(func=cmd_answers)
