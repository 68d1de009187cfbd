"""Tokenizer files as a Megatron-LM user brings them, made with the tokenizers and sentencepiece
libraries directly (not with data_tools/): a Llama-style SentencePiece model (unk 0, bos 1, eos 2,
no padding piece), GPT-2 BPE vocab.json + merges.txt, a BERT WordPiece vocab.txt; and jsonl text."""

from __future__ import annotations

import json
from pathlib import Path

_WORDS = ("river mountain valley forest meadow harbor village castle bridge tower garden orchard market "
          "winter summer autumn spring morning evening shadow thunder lantern compass journey letter "
          "captain sailor farmer weaver baker miller scholar painter singer hunter ranger keeper "
          "quietly swiftly gently boldly rarely often never always slowly brightly darkly "
          "walks carries builds paints sings hunts weaves bakes reads writes sails guards finds").split()


def _sentence(i: int) -> str:
    import random

    pick = random.Random(i)
    words = [pick.choice(_WORDS) for _ in range(pick.randint(6, 14))]
    return f"{' '.join(words).capitalize()}, {i} times; then {pick.choice(_WORDS)}!"


TEXT = [" ".join(_sentence(3 * i + k) for k in range(3)) for i in range(300)]


def llama_sentencepiece_model(directory: Path, vocab_size: int = 200) -> Path:
    import sentencepiece

    prefix = directory / "llama"
    if not prefix.with_suffix(".model").exists():
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_prefix=str(prefix),
                                                 vocab_size=vocab_size, minloglevel=2)
    return prefix.with_suffix(".model")


def gpt2_bpe_files(directory: Path, vocab_size: int = 400) -> tuple:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    vocab, merges = directory / "gpt2-vocab.json", directory / "gpt2-merges.txt"
    if not vocab.exists():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer.model.save(str(directory), "gpt2")
    return vocab, merges


def bert_vocab(directory: Path, vocab_size: int = 200) -> Path:
    from tokenizers import BertWordPieceTokenizer

    vocab = directory / "bert-vocab.txt"
    if not vocab.exists():
        tokenizer = BertWordPieceTokenizer(lowercase=False)
        tokenizer.train_from_iterator(TEXT, vocab_size=vocab_size)
        tokenizer.save_model(str(directory), "bert")
    return vocab


def jsonl(path: Path, copies: int = 1) -> Path:
    with open(path, "w") as f:
        for _ in range(copies):
            for text in TEXT:
                f.write(json.dumps({"text": text}) + "\n")
    return path


def _sentences(text: str) -> list:
    return [part.strip() for part in text.replace("!", "!|").replace(";", ";|").split("|") if part.strip()]


def indexed_dataset(prefix: Path, encode, eod: int, split_sentences: bool = False, copies: int = 50) -> str:
    """TEXT as megatron-core .bin/.idx files, the way Megatron-LM's tools/preprocess_data.py writes
    them (IndexedDatasetBuilder; --append-eod for documents, sentences kept apart for T5), with
    enough copies that the example scripts' splits (99990,8,2) leave documents to validate on, and
    `encode` the tokenizer library's own text -> ids. Returns the prefix for --data-path."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    path = str(prefix) + ("_text_sentence" if split_sentences else "_text_document")
    builder = IndexedDatasetBuilder(get_bin_path(path), dtype=np.int32)
    for _ in range(copies):
        for text in TEXT:
            if split_sentences:
                pieces = [encode(sentence) for sentence in _sentences(text)]
            else:
                pieces = [encode(text) + [eod]]
            builder.add_document(np.concatenate([np.asarray(p, dtype=np.int32) for p in pieces]),
                                 [len(p) for p in pieces])
    builder.finalize(get_idx_path(path))
    return path


def llama_data(directory: Path) -> dict:
    import sentencepiece

    model = llama_sentencepiece_model(directory)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    return {"tokenizer_model": str(model),
            "data_path": indexed_dataset(directory / "llama", processor.encode, processor.eos_id())}


def gpt2_data(directory: Path) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = gpt2_bpe_files(directory)
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    eod = tokenizer.token_to_id("<|endoftext|>")
    return {"vocab_file": str(vocab), "merge_file": str(merges),
            "data_path": indexed_dataset(directory / "gpt2", lambda text: tokenizer.encode(text).ids, eod)}


def bert_sentence_data(directory: Path) -> dict:
    from tokenizers import BertWordPieceTokenizer

    vocab = bert_vocab(directory)
    tokenizer = BertWordPieceTokenizer(str(vocab), lowercase=False)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    return {"vocab_file": str(vocab),
            "data_path": indexed_dataset(directory / "bert", encode, eod=-1, split_sentences=True)}
