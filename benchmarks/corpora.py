"""Public corpora of real documents for the retrieval benchmarks, with questions of their own.

Question sets, shipped unmodified (gzip) in benchmarks/data/ (see its README for sources and licences):
  SQuAD 2.0    English Wikipedia paragraphs; each answerable question was written from one of them.
  KorQuAD 1.0  Korean Wikipedia paragraphs and questions, built the same way.
A question's relevant document is the paragraph it was written from, so nDCG@10 needs no judging.

Bulk documents, to reach 10k and 100k chunks, from Debian's archive (which CI reaches): the HTML
manuals of documentation packages, one document per page, fetched with `apt-get download` and
unpacked with `dpkg-deb` into .dreamseed/bench/debian/ on first use. English: the manuals in
ENGLISH_MANUALS; Korean: LibreOffice's help in Korean, the pages that are mostly Hangul (about half
of them; the rest are untranslated English). Korean text that can be fetched here ends there:
KorQuAD's paragraphs, those pages and the konlpy wheel's laws and bills come to about 4k chunks, so
the Korean figures at 10k and 100k chunks are Korean queries against tables that are mostly English
(benchmarks/README.md says so beside them).

`python benchmarks/corpora.py` fetches everything and prints how many documents and chunks each
source gives.
"""

from __future__ import annotations

import gzip
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE.parent / ".dreamseed" / "bench" / "debian"
HANGUL = re.compile(r"[\uac00-\ud7a3]")

# Documentation packages whose manuals are English prose (Debian 12 names; the first name apt knows of
# each group is used). Licences: PSF, PostgreSQL, MPL-2.0, GFDL-1.2+, BSD-3-Clause (Django), MIT
# (SQLAlchemy), public domain (SQLite), GPL-2 (Git), GPL-2+ (Debian Administrator's Handbook), GPL-2+
# (Debian Reference), GFDL-1.1+ (GnuCash), BSD-3-Clause (scikit-learn,
# SciPy).
ENGLISH_MANUALS: tuple[tuple[str, ...], ...] = (
    ("python3.11-doc", "python3.12-doc", "python3.13-doc"),
    ("postgresql-doc-15", "postgresql-doc-16", "postgresql-doc-17"),
    ("libreoffice-help-en-us",),
    ("gimp-help-en",),
    ("python-django-doc",),
    ("python-sqlalchemy-doc",),
    ("sqlite3-doc",),
    ("git-doc",),
    ("debian-handbook",),
    ("debian-reference-en",),
    ("gnucash-docs",),
    ("python-sklearn-doc",),
    ("python-scipy-doc",),
)
# Manuals that ship several languages: the folders of their English pages.
ENGLISH_FOLDERS = {"debian-handbook": "/en-US/", "gnucash-docs": "-en/"}
KOREAN_MANUALS: tuple[tuple[str, ...], ...] = (("libreoffice-help-ko",),)
KOREAN_SHARE = 0.2  # a Korean page: at least this share of its characters are Hangul syllables


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    text: str
    document: str  # the id of the paragraph it was written from
    answers: tuple[str, ...] = ()  # the spans annotators marked in it


@dataclass(frozen=True)
class QASet:
    name: str
    language: str
    documents: list[Document]
    questions: list[Question]


def _squad_layout(name: str, language: str, path: Path) -> QASet:
    """SQuAD's JSON layout (KorQuAD uses it too): articles of paragraphs, each with its questions."""
    data = json.loads(gzip.decompress(path.read_bytes()))
    documents, questions = [], []
    for article in data["data"]:
        for number, paragraph in enumerate(article["paragraphs"]):
            doc_id = f"{name}:{article['title']}:{number}"
            documents.append(Document(doc_id, article["title"].replace("_", " "), paragraph["context"]))
            questions += [Question(" ".join(qa["question"].split()), doc_id,
                                   tuple(dict.fromkeys(a["text"] for a in qa["answers"] if a["text"].strip())))
                          for qa in paragraph["qas"] if not qa.get("is_impossible") and qa["question"].strip()]
    return QASet(name, language, documents, questions)


def squad() -> QASet:
    return _squad_layout("squad", "en", HERE / "data" / "squad-v2.0-dev-half.json.gz")


def korquad() -> QASet:
    return _squad_layout("korquad", "ko", HERE / "data" / "korquad-v1.0-dev.json.gz")


class _PageText(html.parser.HTMLParser):
    """The readable text of an HTML page: its title, and its body with block elements as line breaks."""

    SKIP = {"script", "style", "head", "nav"}
    PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "pre", "section", "div", "table"}
    LINE = {"br", "li", "tr", "dt", "dd"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in self.SKIP
        self._in_title |= tag == "title"
        if tag in self.PARAGRAPH or tag in self.LINE:
            self.parts.append("\n\n" if tag in self.PARAGRAPH else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skip = max(self._skip - 1, 0)
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def page_text(markup: str) -> tuple[str, str]:
    parser = _PageText()
    parser.feed(markup)
    body = re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts))
    body = re.sub(r"\n{3,}", "\n\n", re.sub(r"\n ", "\n", body)).strip()
    return " ".join(parser.title.split()), body


def _known(names: tuple[str, ...]) -> str | None:
    for name in names:
        shown = subprocess.run(["apt-cache", "show", "--no-all-versions", name], capture_output=True, text=True)
        if shown.returncode == 0 and shown.stdout.strip():
            return name
    return None


def _unpacked(package: str) -> Path:
    """The package's files, unpacked under CACHE (fetched and unpacked on first use)."""
    folder = CACHE / package
    if (folder / ".complete").exists():
        return folder
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmarks/corpora.py: the bulk corpora come from Debian packages and need {tool} "
                             "(a Debian or Ubuntu machine)")
    download = CACHE / "downloads"
    download.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(["apt-get", "download", package], cwd=download, capture_output=True, text=True)
    if fetched.returncode != 0 and os.geteuid() == 0:  # a fresh machine or container: no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        fetched = subprocess.run(["apt-get", "download", package], cwd=download, capture_output=True, text=True)
    debs = sorted(download.glob(f"{package}_*.deb"))
    if fetched.returncode != 0 or not debs:
        raise SystemExit(f"benchmarks/corpora.py: apt-get download {package} failed ({fetched.stderr.strip()[-300:]});"
                         " run `apt-get update` first if the package lists are missing")
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(folder)], check=True)
    (folder / ".complete").write_text(debs[-1].name)
    return folder


def manual_pages(package: str, *, korean: bool = False) -> Iterator[Document]:
    """Each HTML page of ``package`` with 200 characters of text or more, in path order. English
    pages of a multilingual manual are taken from its English folders only (ENGLISH_FOLDERS)."""
    root = _unpacked(package)
    pages = root / ".pages.jsonl"  # the parsed pages: parsing them all again takes a minute
    if not pages.exists():
        with pages.with_suffix(".part").open("w", encoding="utf-8") as out:
            for path in sorted(root.rglob("*.html")):
                if package in ENGLISH_FOLDERS and ENGLISH_FOLDERS[package] not in str(path):
                    continue
                title, text = page_text(path.read_text(encoding="utf-8", errors="replace"))
                if len(text) >= 200:
                    out.write(json.dumps([f"{package}:{path.relative_to(root)}", title, text], ensure_ascii=False) + "\n")
        pages.with_suffix(".part").rename(pages)
    with pages.open(encoding="utf-8") as lines:
        for line in lines:
            document = Document(*json.loads(line))
            if not korean or len(HANGUL.findall(document.text)) >= KOREAN_SHARE * len(document.text):
                yield document


def manuals(groups: tuple[tuple[str, ...], ...], *, korean: bool = False) -> Iterator[tuple[str, Document]]:
    """(package, document) for every page of the first package apt knows in each group."""
    for names in groups:
        package = _known(names)
        if package is None:
            print(f"benchmarks/corpora.py: none of {', '.join(names)} is known to apt here; skipped", file=sys.stderr)
            continue
        for document in manual_pages(package, korean=korean):
            yield package, document


def package_versions() -> dict[str, str]:
    """The .deb files the bulk corpora came from (a figure is only comparable on the same ones)."""
    return {path.parent.name: (path.read_text().strip()) for path in sorted(CACHE.glob("*/.complete"))}


def main() -> None:
    from dreamseed.rag.chunking import chunk_text

    def chunks(documents: list[Document]) -> int:
        return sum(len(chunk_text(f"{d.title}\n\n{d.text}", 800, 100)) for d in documents)

    for qa in (squad(), korquad()):
        print(f"{qa.name}: {len(qa.documents)} paragraphs, {chunks(qa.documents)} chunks, {len(qa.questions)} questions")
    for label, groups, korean in (("English", ENGLISH_MANUALS, False), ("Korean", KOREAN_MANUALS, True)):
        by_package: dict[str, list[Document]] = {}
        for package, document in manuals(groups, korean=korean):
            by_package.setdefault(package, []).append(document)
        for package, documents in by_package.items():
            print(f"{label} {package}: {len(documents)} pages, {chunks(documents)} chunks")


if __name__ == "__main__":
    main()
