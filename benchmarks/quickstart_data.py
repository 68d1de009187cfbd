"""The quickstart's corpus, tokenizer and .bin/.idx files, shared by the studies in benchmarks/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parent.parent


def prepare_data(work: Path) -> Dict[str, str]:
    """The quickstart's corpus, tokenizer and .bin/.idx files, made once under work/data."""
    data = work / "data"
    steps = [
        (data / "corpus" / "valid.jsonl", ["data_tools/prepare_corpus.py", "--output-dir", str(data / "corpus")]),
        (data / "tokenizer" / "spm.model", ["data_tools/train_tokenizer.py", "--input", str(data / "corpus" / "train.jsonl"),
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
