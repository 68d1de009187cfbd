"""A small, deterministic English-like corpus with a tokenizer and preprocessed data, for tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["the king", "a fool", "my lord", "the queen", "our army", "this night", "the moon", "her brother"]
VERBS = ["speaks of", "dreams of", "fears", "loves", "betrays", "forgets", "remembers", "commands"]
OBJECTS = ["the crown", "a storm", "the sea", "old friends", "his father", "the city", "sweet music", "the truth"]
ENDINGS = [".", "!", "?", ", and weeps.", ", alas."]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
    return s[0].upper() + s[1:]


def document(rng: random.Random) -> str:
    paragraphs = []
    for _ in range(rng.randint(2, 4)):
        lines = [" ".join(sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 5))]
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def write_corpus(directory: Path, train_docs: int = 300, valid_docs: int = 30, seed: int = 0) -> dict:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", train_docs), ("valid", valid_docs)):
        path = directory / f"{split}.jsonl"
        with path.open("w") as f:
            for _ in range(count):
                f.write(json.dumps({"text": document(rng)}) + "\n")
        paths[split] = path
    return paths


def build_corpus(directory: Path) -> dict:
    """jsonl, a 300-piece tokenizer, and preprocessed train/valid prefixes under directory; for T5
    also a tokenizer with 40 sentinels and sentence-split train/valid prefixes."""
    from megatron_lsh.data.preprocess import preprocess_jsonl
    from megatron_lsh.data.tokenizer import train_sentencepiece

    jsonl = write_corpus(directory / "corpus")
    model = train_sentencepiece(
        (json.loads(line)["text"] for line in open(jsonl["train"])),
        str(directory / "tokenizer" / "spm"),
        vocab_size=300,
    )
    prefixes = {}
    for split in ("train", "valid"):
        result = preprocess_jsonl(
            [str(jsonl[split])], str(directory / "gpt" / split), "SentencePieceTokenizer", model,
            workers=2, progress=False,
        )
        prefixes[split] = result["text"]["prefix"]
    t5_model = train_sentencepiece(
        (json.loads(line)["text"] for line in open(jsonl["train"])),
        str(directory / "tokenizer" / "spm_t5"),
        vocab_size=340,
        vocab_extra_ids=40,
    )
    for split in ("train", "valid"):
        result = preprocess_jsonl(
            [str(jsonl[split])], str(directory / "t5" / split), "SentencePieceTokenizer", t5_model,
            workers=2, progress=False, split_sentences=True,
        )
        prefixes[f"t5_{split}"] = result["text"]["prefix"]
    return {"jsonl": jsonl, "tokenizer": model, "t5_tokenizer": t5_model, **prefixes}
