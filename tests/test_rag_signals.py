"""Long retrieval commands stop cleanly: `rag ingest` and `rag eval`, sent SIGINT (Ctrl-C) or SIGTERM
mid-run, end within two seconds, say how far they got, and stop the embedded PostgreSQL they started;
an ingestion's committed chunks stay and a rerun skips them."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreamseed.rag.database import forget_dead_users
from support import ROOT, write_policies, write_rag

WORDS = ("retrieval ingestion database embedding interrupt signal postgres chunk vector lexical hybrid budget "
         "collection source policy proxy backend stream token latency quality corpus query answer").split()


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    policies = write_rag(write_policies(tmp_path / "p", {"general": {"url": "http://127.0.0.1:1", "model": "m",
                                                                     "context_length": 1024}},
                                        {"rules": [{"name": "default", "target": "general"}]}), {})
    documents = tmp_path / "docs"
    documents.mkdir()
    rng = random.Random(7)
    for index in range(60):  # about 1,000 chunks: the first group (256) commits after 5-15 s, the last long after 16
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(110)) for _ in range(12)]
        (documents / f"doc{index:02}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    env = {**os.environ, "DREAMSEED_STATE_DIR": str(tmp_path / "state")}
    return policies, documents, env


def rag(args: list[str], policies: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dreamseed.cli", "rag", *args, "--policies", str(policies)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def postgres_running(state: Path) -> bool:
    """Whether a postmaster serves the state directory's database (its pid file names a live process)."""
    pid_file = state / "postgres" / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (ProcessLookupError, ValueError, IndexError):
        return False
    return True


def stop_and_time(process: subprocess.Popen[str], signum: int) -> tuple[float, str]:
    sent = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    return time.monotonic() - sent, stderr


def wait_for(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_ingestion_stops_in_two_seconds_keeps_what_it_committed_and_stops_its_database(
        workspace: tuple[Path, Path, dict[str, str]], signum: int) -> None:
    policies, documents, env = workspace
    state = Path(env["DREAMSEED_STATE_DIR"])
    ingest = rag(["ingest", str(documents), "--collection", "docs", "--quiet"], policies, env)
    # Interrupted in the middle of embedding, once the first group of chunks is committed.
    counts = state / "postgres"
    wait_for(lambda: postgres_running(state), 60)
    time.sleep(16)
    took, stderr = stop_and_time(ingest, signum)
    assert took <= 2.0, (took, stderr)
    assert ingest.returncode == 128 + signum
    said = re.search(rf"stopped by {signal.Signals(signum).name}: (\d+) new chunks of docs were committed and stay",
                     stderr)
    assert said is not None, stderr
    committed = int(said[1])
    assert not postgres_running(state), "the embedded database outlived the command"
    assert json.loads((counts / ".handle_pids.json").read_text()) == []
    if signum == signal.SIGINT:  # the rest comes on the next run; what was committed is skipped
        again = rag(["ingest", str(documents), "--collection", "docs", "--quiet", "--json"], policies, env)
        out, err = again.communicate(timeout=180)
        assert again.returncode == 0, err
        summary = json.loads(out)
        assert summary["skipped"] == committed and summary["added"] == summary["chunks"] - committed


def test_an_interrupted_evaluation_stops_in_two_seconds_and_stops_its_database(
        workspace: tuple[Path, Path, dict[str, str]]) -> None:
    policies, documents, env = workspace
    state = Path(env["DREAMSEED_STATE_DIR"])
    # A BEIR-layout set big enough to be mid-run after six seconds on any machine: 60 documents of
    # about 17 chunks each to ingest, then 100 queries in three modes.
    eval_set = documents.parent / "eval-set"
    (eval_set / "qrels").mkdir(parents=True)
    texts = sorted(documents.iterdir())
    (eval_set / "corpus.jsonl").write_text("\n".join(
        json.dumps({"_id": path.stem, "text": path.read_text(encoding="utf-8")}) for path in texts), encoding="utf-8")
    rng = random.Random(11)
    (eval_set / "queries.jsonl").write_text("\n".join(
        json.dumps({"_id": f"q{i}", "text": " ".join(rng.sample(WORDS, 4))}) for i in range(100)), encoding="utf-8")
    (eval_set / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{texts[i % len(texts)].stem}\t1\n" for i in range(100)), encoding="utf-8")
    evaluation = rag(["eval", str(eval_set), "--mode", "all"], policies, env)
    wait_for(lambda: postgres_running(state), 60)
    time.sleep(6)
    took, stderr = stop_and_time(evaluation, signal.SIGINT)
    assert took <= 2.0, (took, stderr)
    assert evaluation.returncode == 130
    assert re.search(r"stopped by SIGINT: the evaluation stopped while (ingesting|mode \w+: \d+ of 100 queries)",
                     stderr), stderr
    assert not postgres_running(state)


def test_a_user_killed_before_it_let_go_no_longer_keeps_the_embedded_database_up(tmp_path: Path) -> None:
    users = tmp_path / ".handle_pids.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    gone = int(dead.stdout)
    users.write_text(json.dumps([gone, os.getpid()]))
    assert forget_dead_users(tmp_path) == [gone]
    assert json.loads(users.read_text()) == [os.getpid()]
    assert forget_dead_users(tmp_path) == []
