"""Our SentencePiece model as a Hugging Face fast tokenizer (tokenizer.json), id for id.

Built with the `tokenizers` library from the model's own pieces and scores: a Unigram model with
byte fallback and SentencePiece's whitespace handling, so ``AutoTokenizer.from_pretrained`` needs
no custom code and no sentencepiece package. Plain text encodes to the same ids; around T5
sentinels written into text the whitespace pieces can differ (training never tokenizes those).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import List

# sentencepiece_model.proto piece types
SPM_PIECE_UNKNOWN, SPM_PIECE_CONTROL, SPM_PIECE_USER_DEFINED = 2, 3, 4


def _pieces(model_path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def build_fast_tokenizer(model_path: str):
    """A `tokenizers.Tokenizer` giving the same ids as the SentencePiece model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = _pieces(model_path)
    vocab = [(p.piece, p.score) for p in proto.pieces]
    unk_id = next(i for i, p in enumerate(proto.pieces) if p.type == SPM_PIECE_UNKNOWN)
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=True))
    # SentencePiece: one "▁" before the text, every space a "▁", pieces never span two words.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # Control pieces and T5 sentinels are special tokens. Other user-defined pieces (the newline)
    # stay ordinary pieces: their score of 0 beats any split of them, as in SentencePiece.
    added = [
        AddedToken(p.piece, special=True, normalized=p.piece.startswith("<extra_id_"))
        for p in proto.pieces
        if p.type in (SPM_PIECE_CONTROL, SPM_PIECE_UNKNOWN)
        or (p.type == SPM_PIECE_USER_DEFINED and p.piece.startswith("<extra_id_"))
    ]
    tokenizer.add_tokens(added)
    return tokenizer


def sentinel_tokens(model_path: str) -> List[str]:
    return [p.piece for p in _pieces(model_path).pieces if p.piece.startswith("<extra_id_")]


def save_hf_tokenizer(model_path: str, output_dir: str, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json (plus the original tokenizer.model) in output_dir."""
    os.makedirs(output_dir, exist_ok=True)
    build_fast_tokenizer(model_path).save(os.path.join(output_dir, "tokenizer.json"))
    shutil.copy(model_path, os.path.join(output_dir, "tokenizer.model"))
    sentinels = sentinel_tokens(model_path)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if sentinels:
        # transformers 4 reads additional_special_tokens, 5 reads extra_special_tokens.
        config["additional_special_tokens"] = sentinels
        config["extra_special_tokens"] = sentinels
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    special = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if sentinels:
        special["additional_special_tokens"] = sentinels
    with open(os.path.join(output_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
