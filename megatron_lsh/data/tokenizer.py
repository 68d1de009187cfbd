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

# Megatron-LM's names (its --tokenizer-type choices that apply to text pretraining).
TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "GPT2BPETokenizer",
                   "BertWordPieceCase", "BertWordPieceLowerCase", "HuggingFaceTokenizer", "TikTokenizer",
                   "NullTokenizer")
# A --tokenizer-model that is one SentencePiece model file (what a checkpoint copies beside it).
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# Read with --vocab-file (and --merge-file): a vocabulary rather than a --tokenizer-model.
VOCAB_FILE_TYPES = ("GPT2BPETokenizer", "BertWordPieceCase", "BertWordPieceLowerCase")

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


class MegatronCoreTokenizer:
    """A tokenizer of megatron-core's library (``megatron.core.tokenizers``) with the attributes
    megatron-core's datasets and our tools read, its ids those Megatron-LM's training gives the
    same --tokenizer-type (so Megatron-LM's data and checkpoints fit)."""

    def __init__(self, tokenizer_type: str, core, files: Sequence[str], vocab: Dict[str, int], *, eod: int,
                 pad: int = -1, bos=None, eos=None, unk=None, cls=None, sep=None, mask=None):
        self.tokenizer_type = tokenizer_type
        self._core = core
        self.vocab = vocab
        self.model_path = files[0]
        self.vocab_size = core.vocab_size
        self.eod, self.pad, self.bos, self.unk, self.cls, self.sep = eod, pad, bos, unk, cls, sep
        self.eos = eod if eos is None else eos
        # megatron-core's span corruption writes the mask id before T5 puts sentinels in.
        self.mask = unk if mask is None else mask
        if len(files) == 1:  # a model file's own hash, as SentencePieceTokenizer's data records it
            self.fingerprint = file_fingerprint(files[0])
        else:
            digest = hashlib.sha256()
            for path in files:
                digest.update(os.path.basename(path).encode() + b"\0" + file_fingerprint(path).encode())
            self.fingerprint = digest.hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", tokenizer_type), ("tokenizer_path", [os.path.abspath(f) for f in files]),
             ("fingerprint", self.fingerprint)])

    @cached_property
    def inv_vocab(self) -> Dict[int, str]:
        """Id to token; megatron-core's span corruption reads it to find word starts."""
        return {i: token for token, i in self.vocab.items()}

    @cached_property
    def additional_special_tokens_ids(self) -> List[int]:
        """Ids of the T5 sentinels <extra_id_0>, <extra_id_1>, ... the vocabulary holds."""
        ids = []
        while (token := self.vocab.get(f"<extra_id_{len(ids)}>")) is not None:
            ids.append(token)
        return ids

    def tokenize(self, text: str) -> List[int]:
        return list(self._core.tokenize(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._core.detokenize([int(i) for i in ids])

    def hugging_face(self):
        """The transformers tokenizer behind GPT2BPETokenizer / BertWordPiece* (added tokens
        included, for an export), else None."""
        return self._core._tokenizer.tokenizer if self._core.library == "huggingface" else None


def _core_tokenizer(path: str, library: str, **kwargs):
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(tokenizer_path=path, metadata_path={"library": library}, **kwargs)


def _library_vocab(core) -> Dict[str, int]:
    """Token -> id for every token of a megatron-core tokenizer. A Hugging Face one's own
    ``vocab`` lists the base vocabulary only, without the tokens BERT's build appends: its
    transformers tokenizer's ``get_vocab`` has them."""
    if core.library == "huggingface":
        return dict(core._tokenizer.tokenizer.get_vocab())
    return {token: i for i, token in core.inv_vocab.items()}


def _sentencepiece_tokenizer(tokenizer_type: str, model_path: str) -> MegatronCoreTokenizer:
    """Llama2Tokenizer / GPTSentencePieceTokenizer: any SentencePiece model, its own ids (Llama's
    has no padding piece: pad is -1, as in Megatron-LM)."""
    if not model_path or not os.path.isfile(model_path):
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model FILE, a SentencePiece model "
                             f"(got {model_path})")
    try:
        core = _core_tokenizer(model_path, "sentencepiece")
    except Exception as error:  # sentencepiece raises RuntimeError/OSError; one line for the user
        raise TokenizerError(f"--tokenizer-model {model_path} is not a SentencePiece model ({error})") from None
    if core.eos < 0:
        raise TokenizerError(f"--tokenizer-model {model_path} has no end-of-sequence piece, which ends every "
                             "document; train it with eos_id set")
    vocab = _library_vocab(core)
    return MegatronCoreTokenizer(tokenizer_type, core, [model_path], vocab, eod=core.eos, pad=core.pad,
                                 bos=core.bos if core.bos >= 0 else None, unk=core.unk)


def _vocabulary_directory(files: Dict[str, str], config: dict) -> str:
    """A Hugging Face tokenizer directory for Megatron-LM's vocabulary files, so megatron-core's
    Hugging Face library reads them offline (its own route for these types asks the Hub for
    'gpt2' / 'bert-large-cased'). Made once per content, atomically (every rank may ask)."""
    import json
    import tempfile

    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, path in sorted(files.items()):
        digest.update(name.encode() + file_fingerprint(path).encode())
    root = os.path.join(os.environ.get("MEGATRON_LSH_CACHE", os.path.join(tempfile.gettempdir(), "megatron_lsh")),
                        "tokenizers", digest.hexdigest()[:24])
    if not os.path.isdir(root):
        os.makedirs(os.path.dirname(root), exist_ok=True)
        scratch = tempfile.mkdtemp(dir=os.path.dirname(root))
        for name, path in files.items():
            with open(path, "rb") as source, open(os.path.join(scratch, name), "wb") as target:
                target.write(source.read())
        with open(os.path.join(scratch, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        try:
            os.rename(scratch, root)
        except OSError:  # another rank made it first
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    return root


def _require_vocabulary_files(tokenizer_type: str, vocab_file, merge_file) -> None:
    if not vocab_file or not os.path.isfile(vocab_file):
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs --vocab-file FILE (got {vocab_file})")
    if tokenizer_type == "GPT2BPETokenizer" and (not merge_file or not os.path.isfile(merge_file)):
        raise TokenizerError(f"--tokenizer-type GPT2BPETokenizer needs --merge-file FILE, the BPE merges beside "
                             f"--vocab-file (got {merge_file})")


def _gpt2_bpe_tokenizer(vocab_file: str, merge_file: str) -> MegatronCoreTokenizer:
    _require_vocabulary_files("GPT2BPETokenizer", vocab_file, merge_file)
    directory = _vocabulary_directory({"vocab.json": vocab_file, "merges.txt": merge_file},
                                      {"tokenizer_class": "GPT2Tokenizer"})
    try:
        core = _core_tokenizer(directory, "huggingface")
    except Exception as error:
        raise TokenizerError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not GPT-2 BPE files "
                             f"({error})") from None
    vocab = _library_vocab(core)
    eod = vocab.get("<|endoftext|>")
    if eod is None:
        raise TokenizerError(f"--vocab-file {vocab_file} has no <|endoftext|>, GPT-2's end of document")
    # Megatron-LM's GPT-2 tokenizer has no padding token, nor a beginning one besides <|endoftext|>.
    return MegatronCoreTokenizer("GPT2BPETokenizer", core, [vocab_file, merge_file], vocab, eod=eod, bos=eod)


def _bert_wordpiece_tokenizer(tokenizer_type: str, vocab_file: str, vocab_extra_ids: int) -> MegatronCoreTokenizer:
    """BERT's WordPiece; as Megatron-LM builds it: [BOS] and [EOS] appended when the vocabulary
    lacks them, then the T5 sentinels <extra_id_N> (--vocab-extra-ids)."""
    _require_vocabulary_files(tokenizer_type, vocab_file, None)
    lower = tokenizer_type == "BertWordPieceLowerCase"
    directory = _vocabulary_directory({"vocab.txt": vocab_file},
                                      {"tokenizer_class": "BertTokenizer", "do_lower_case": lower})
    try:
        core = _core_tokenizer(directory, "huggingface")
    except Exception as error:
        raise TokenizerError(f"--vocab-file {vocab_file}: not a WordPiece vocabulary ({error})") from None
    missing = [token for token in ("[CLS]", "[SEP]", "[PAD]", "[MASK]") if token not in _library_vocab(core)]
    if missing:
        raise TokenizerError(f"--vocab-file {vocab_file} lacks {', '.join(missing)}, which BERT's tokenizer needs")
    core.add_special_tokens({"bos_token": "[BOS]", "eos_token": "[EOS]",
                             "additional_special_tokens": [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]})
    vocab = _library_vocab(core)
    return MegatronCoreTokenizer(tokenizer_type, core, [vocab_file], vocab, eod=vocab["[EOS]"], pad=vocab["[PAD]"],
                                 bos=vocab["[BOS]"], unk=vocab.get("[UNK]"), cls=vocab["[CLS]"],
                                 sep=vocab["[SEP]"], mask=vocab["[MASK]"])


def _tiktoken_tokenizer(model_path: str, pattern, vocab_size, num_special_tokens: int, special_tokens):
    if not model_path or not os.path.isfile(model_path):
        raise TokenizerError(f"--tokenizer-type TikTokenizer needs --tokenizer-model FILE, a vocabulary .json "
                             f"(got {model_path})")
    if pattern not in ("v1", "v2"):
        raise TokenizerError(f"--tokenizer-type TikTokenizer needs --tiktoken-pattern v1 or v2 (got {pattern})")
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        raise TokenizerError("--tokenizer-type TikTokenizer needs the tiktoken package: pip install tiktoken") from None
    if not vocab_size:  # the whole vocabulary (megatron-core's library otherwise assumes 2**17 tokens)
        import json

        with open(model_path) as f:
            vocab_size = len(json.load(f)) + num_special_tokens
    kwargs = dict(pattern=pattern, num_special_tokens=num_special_tokens, vocab_size=vocab_size)
    if special_tokens:
        kwargs["special_tokens"] = list(special_tokens)
    try:
        core = _core_tokenizer(model_path, "tiktoken", **kwargs)
    except Exception as error:
        raise TokenizerError(f"--tokenizer-model {model_path}: not a TikTokenizer vocabulary ({error})") from None
    vocab = _library_vocab(core)
    return MegatronCoreTokenizer("TikTokenizer", core, [model_path], vocab, eod=core.eod, pad=core.pad, bos=core.bos,
                                 unk=core.unk)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None, *,
                    vocab_file: str | None = None, merge_file: str | None = None, vocab_extra_ids: int = 0,
                    tiktoken_pattern: str | None = None, tiktoken_num_special_tokens: int = 1000,
                    tokenizer_special_tokens: Sequence[str] | None = None):
    """The tokenizer Megatron-LM's --tokenizer-type and its files' flags name."""
    if tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type in ("GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        return _sentencepiece_tokenizer(tokenizer_type, tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return _gpt2_bpe_tokenizer(vocab_file, merge_file)
    if tokenizer_type in ("BertWordPieceCase", "BertWordPieceLowerCase"):
        return _bert_wordpiece_tokenizer(tokenizer_type, vocab_file, vocab_extra_ids)
    if tokenizer_type == "TikTokenizer":
        return _tiktoken_tokenizer(tokenizer_model, tiktoken_pattern, vocab_size, tiktoken_num_special_tokens,
                                   tokenizer_special_tokens)
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


# The flags (argparse destinations) that say which tokenizer a run or a data tool uses.
TOKENIZER_FLAGS = ("tokenizer_type", "tokenizer_model", "vocab_size", "vocab_file", "merge_file", "vocab_extra_ids",
                   "tiktoken_pattern", "tiktoken_num_special_tokens", "tokenizer_special_tokens")


def tokenizer_settings(args) -> dict:
    """build_tokenizer's arguments from parsed flags (or a saved run's args), absent ones defaulted."""
    values = args if isinstance(args, dict) else vars(args)
    defaults = dict(vocab_extra_ids=0, tiktoken_num_special_tokens=1000)
    return {name: values.get(name, defaults.get(name)) for name in TOKENIZER_FLAGS}


def tokenizer_from_args(args):
    return build_tokenizer(**tokenizer_settings(args))
