"""Tokenizers with the interface megatron-core's datasets read (eod, pad, vocab_size, ...).

``HuggingFaceTokenizer`` reads a Hugging Face model's tokenizer directory (Megatron-LM's
``--tokenizer-type HuggingFaceTokenizer``), so a corpus is preprocessed with the vocabulary of the
model it continues.

``SentencePieceTokenizer`` wraps a model trained by ``train_sentencepiece`` (data_tools/
train_tokenizer.py): pad, eos, unk and bos are pieces 0-3 (T5's layout; other formats find them by
their strings), and T5-style sentinels ``<extra_id_N>``, when asked for, are pieces of the model
itself, so the model file alone defines every id.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from functools import cached_property
from typing import Dict, Iterable, List, Sequence


TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")

# The files of a Hugging Face tokenizer directory that define its ids (what the fingerprint hashes
# and what a checkpoint copies).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or does not fit the data; the message says what to do."""


def file_fingerprint(path: str) -> str:
    """sha256 of a file, to tie preprocessed data to the tokenizer that made it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        import sentencepiece

        if not os.path.isfile(model_path):
            raise TokenizerError(
                f"--tokenizer-model {model_path}: no such file; train one with "
                "data_tools/train_tokenizer.py"
            )
        self.model_path = model_path
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except Exception as error:
            raise TokenizerError(
                f"--tokenizer-model {model_path} is not a SentencePiece model ({error})"
            ) from None
        self.vocab_size = self._sp.get_piece_size()
        self.fingerprint = file_fingerprint(model_path)
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_path", [model_path]),
                ("fingerprint", self.fingerprint),
            ]
        )

    def _special(self, piece: str, name: str) -> int:
        token_id = self._sp.piece_to_id(piece)
        if token_id == self._sp.unk_id() and piece != "<unk>":
            raise TokenizerError(
                f"{self.model_path} has no {name} piece {piece!r}; retrain it with "
                "data_tools/train_tokenizer.py"
            )
        return token_id

    @cached_property
    def pad(self) -> int:
        return self._special("<pad>", "padding")

    @cached_property
    def eos(self) -> int:
        return self._special("</s>", "end-of-sequence")

    @cached_property
    def bos(self) -> int:
        return self._special("<s>", "beginning-of-sequence")

    @cached_property
    def unk(self) -> int:
        return self._special("<unk>", "unknown")

    @property
    def eod(self) -> int:
        """Documents end with the end-of-sequence token."""
        return self.eos

    # megatron-core's masked-LM sampler skips [CLS]/[SEP]; SentencePiece text has neither.
    cls = None
    sep = None

    @property
    def mask(self) -> int:
        """The id megatron-core's span corruption writes over masked tokens before T5 replaces
        each span by a sentinel; it never reaches the model."""
        return self.unk

    @cached_property
    def additional_special_tokens_ids(self) -> List[int]:
        """Ids of the T5 sentinels <extra_id_0>, <extra_id_1>, ... the model holds."""
        ids = []
        while self._sp.piece_to_id(f"<extra_id_{len(ids)}>") != self._sp.unk_id():
            ids.append(self._sp.piece_to_id(f"<extra_id_{len(ids)}>"))
        return ids

    @cached_property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    @cached_property
    def vocab(self) -> Dict[str, int]:
        return {piece: i for i, piece in self.inv_vocab.items()}

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# pad, eos, unk, bos first (T5's order), then newline as a piece of its own: verse and dialogue
# keep their line structure, and byte fallback spells out anything unseen, so text round-trips.
_FIXED_PIECES = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=3)


def train_sentencepiece(
    sentences: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
    vocab_extra_ids: int = 0,
    character_coverage: float = 1.0,
    num_threads: int = 2,
) -> str:
    """Train a SentencePiece model on an iterator of texts; returns the .model path."""
    import sentencepiece

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"] + [f"<extra_id_{i}>" for i in range(vocab_extra_ids)],
        max_sentence_length=1 << 20,
        num_threads=num_threads,
        minloglevel=2,
        **_FIXED_PIECES,
    )
    return model_prefix + ".model"


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer directory (a model's own, e.g. one `import_hf` imports), loaded
    with ``AutoTokenizer`` from local files only. Documents end with its end-of-sequence token."""

    def __init__(self, model_dir: str):
        files = [name for name in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir or "", name))]
        if not model_dir or not os.path.isdir(model_dir) or not files:
            raise TokenizerError(
                f"--tokenizer-model {model_dir}: not a Hugging Face tokenizer directory (no "
                "tokenizer.json, tokenizer_config.json or vocabulary file); pass the model's directory")
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as error:  # transformers raises many kinds; one line for the user
            raise TokenizerError(f"--tokenizer-model {model_dir}: transformers cannot load it ({error})") from None
        self.model_path = model_dir
        if self._tokenizer.eos_token_id is None:
            raise TokenizerError(f"--tokenizer-model {model_dir} has no end-of-sequence token, which ends every "
                                 "document in the data; set eos_token in its tokenizer_config.json")
        self.vocab_size = len(self._tokenizer)
        digest = hashlib.sha256()
        for name in files:
            digest.update(name.encode() + b"\0" + file_fingerprint(os.path.join(model_dir, name)).encode())
        self.fingerprint = digest.hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [model_dir]), ("fingerprint", self.fingerprint)])

    @property
    def eos(self) -> int:
        return self._tokenizer.eos_token_id

    @property
    def eod(self) -> int:
        return self.eos

    @property
    def bos(self):
        return self._tokenizer.bos_token_id

    @property
    def pad(self) -> int:
        """Its padding token, or the end of sequence for tokenizers without one (Llama's)."""
        pad = self._tokenizer.pad_token_id
        return self.eos if pad is None else pad

    @property
    def unk(self):
        return self._tokenizer.unk_token_id

    cls = None
    sep = None

    @cached_property
    def additional_special_tokens_ids(self) -> List[int]:
        """T5 sentinels <extra_id_N> the tokenizer holds, in order."""
        ids = []
        while (token := self._tokenizer.convert_tokens_to_ids(f"<extra_id_{len(ids)}>")) not in (None, self.unk):
            ids.append(token)
        return ids

    @property
    def mask(self):
        return self.unk

    @cached_property
    def vocab(self) -> Dict[str, int]:
        return dict(self._tokenizer.get_vocab())

    @cached_property
    def inv_vocab(self) -> Dict[int, str]:
        """Id to token; megatron-core's span corruption reads it to find word starts."""
        return {i: token for token, i in self.vocab.items()}

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def save(self, output_dir: str) -> None:
        """The tokenizer's files in output_dir (a Hugging Face export's)."""
        self._tokenizer.save_pretrained(output_dir)


class NullTokenizer:
    """Token ids as text of integers; for --mock-data. The last id is the end of document."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or vocab_size < 2:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size of at least 2")
        self.vocab_size = vocab_size
        self.eod = self.eos = vocab_size - 1
        self.pad = 0
        self.fingerprint = f"null-{vocab_size}"
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_size", vocab_size)]
        )

    def tokenize(self, text: str) -> List[int]:
        return [int(token) for token in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None):
    """The tokenizer Megatron-LM's --tokenizer-type / --tokenizer-model flags name."""
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if not tokenizer_model:
            raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise TokenizerError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR (the model's "
                                 "Hugging Face directory)")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise TokenizerError(
        f"--tokenizer-type {tokenizer_type} is not supported; use one of {', '.join(TOKENIZER_TYPES)}"
    )


