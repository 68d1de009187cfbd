"""The studies' corpora, tokenizers and .bin/.idx files, shared by the studies in benchmarks/.

'quickstart': the quickstart's Shakespeare and Milton. 'code': the Python standard library's
source (of the Python running the study; one document per module, tests left out), a corpus of
another kind, which clusters differently.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parent.parent


CORPORA = ("quickstart", "code")


def python_source_jsonl(path: Path) -> Path:
    """The standard library's modules, one {"text": source} line each, in a fixed order."""
    import json
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    modules = sorted(p for p in stdlib.rglob("*.py") if not skipped & set(p.relative_to(stdlib).parts))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for module in modules:
            text = module.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                out.write(json.dumps({"text": text}) + "\n")
    return path


def prepare_data(work: Path, corpus: str = "quickstart") -> Dict[str, str]:
    """A corpus, its tokenizer and .bin/.idx files, made once under work/data (quickstart) or
    work/data-<corpus>."""
    data = work / ("data" if corpus == "quickstart" else f"data-{corpus}")
    source = []
    if corpus == "code":
        source = ["--input", str(python_source_jsonl(data / "source" / "python_stdlib.jsonl"))]
    steps = [
        (data / "corpus" / "valid.jsonl",
         ["data_tools/prepare_corpus.py", *source, "--output-dir", str(data / "corpus")]),
        (data / "tokenizer" / "spm.model",
         ["data_tools/train_tokenizer.py", "--input", str(data / "corpus" / "train.jsonl"),
          "--vocab-size", "8000", "--output-prefix", str(data / "tokenizer" / "spm")]),
    ]
    for split in ("train", "valid"):
        steps.append((data / "gpt" / f"{split}_text_document.idx",
                      ["data_tools/preprocess_data.py", "--input", str(data / "corpus" / f"{split}.jsonl"),
                       "--output-prefix", str(data / "gpt" / split), "--tokenizer-type", "SentencePieceTokenizer",
                       "--tokenizer-model", str(data / "tokenizer" / "spm.model"), "--append-eod", "--workers", "2",
                       "--no-progress"]))
    for made, command in steps:
        if not made.exists():
            print("  data:", " ".join(command[:1]), flush=True)
            subprocess.run([sys.executable, *command], cwd=REPO, check=True, capture_output=True)
    return {"train": str(data / "gpt" / "train_text_document"), "valid": str(data / "gpt" / "valid_text_document"),
            "tokenizer": str(data / "tokenizer" / "spm.model")}
