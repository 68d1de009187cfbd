"""Megatron-LM's --tokenizer-type names, read with megatron-core's tokenizer library from files a
Megatron-LM user already has, with the ids Megatron-LM's training gives them (so its data and
checkpoints fit): BERT's [BOS], [EOS] and sentinels appended after the vocabulary, GPT-2's
<|endoftext|> as end of document, a Llama SentencePiece model's own ids (no padding piece)."""

import json

import numpy as np
import pytest

from megatron_lsh.data.preprocess import preprocess_jsonl
from megatron_lsh.data.tokenizer import TokenizerError, build_tokenizer
from tests.megatron_lm_files import TEXT, bert_vocab, gpt2_bpe_files, jsonl, llama_sentencepiece_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tmp_path_factory.mktemp("megatron_lm_tokenizers")


def test_llama2_and_gpt_sentencepiece_keep_the_models_own_ids(files):
    model = llama_sentencepiece_model(files)
    for name in ("Llama2Tokenizer", "GPTSentencePieceTokenizer"):
        tokenizer = build_tokenizer(name, str(model))
        assert (tokenizer.unk, tokenizer.bos, tokenizer.eos, tokenizer.eod) == (0, 1, 2, 2)
        assert tokenizer.pad == -1  # no padding piece, as Megatron-LM reports it
        assert tokenizer.vocab_size == 200
        ids = tokenizer.tokenize(TEXT[0])
        assert ids[0] != tokenizer.bos and tokenizer.detokenize(ids) == TEXT[0]


def test_gpt2_bpe_ends_documents_with_endoftext(files):
    vocab, merges = gpt2_bpe_files(files)
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    words = json.loads(vocab.read_text())
    assert tokenizer.vocab_size == len(words)
    assert tokenizer.eod == words["<|endoftext|>"]
    assert tokenizer.detokenize(tokenizer.tokenize(TEXT[3])) == TEXT[3]  # byte-level BPE round-trips


def test_bert_wordpiece_appends_bos_eos_and_sentinels_after_the_vocabulary(files):
    vocab = bert_vocab(files)
    words = vocab.read_text().splitlines()
    tokenizer = build_tokenizer("BertWordPieceCase", vocab_file=str(vocab), vocab_extra_ids=3)
    n = len(words)
    assert (tokenizer.bos, tokenizer.eos, tokenizer.eod) == (n, n + 1, n + 1)
    assert tokenizer.additional_special_tokens_ids == [n + 2, n + 3, n + 4]
    assert tokenizer.vocab_size == n + 5
    assert (tokenizer.cls, tokenizer.sep, tokenizer.pad, tokenizer.mask) == tuple(
        words.index(token) for token in ("[CLS]", "[SEP]", "[PAD]", "[MASK]"))
    lower_case = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(vocab))
    assert tokenizer.tokenize("River") != tokenizer.tokenize("river")
    assert lower_case.tokenize("River Mountain") == tokenizer.tokenize("river mountain")


@pytest.mark.parametrize("name, kwargs, message", [
    ("GPT2BPETokenizer", {"vocab_file": "VOCAB"}, "--tokenizer-type GPT2BPETokenizer needs --merge-file FILE"),
    ("BertWordPieceCase", {}, "--tokenizer-type BertWordPieceCase needs --vocab-file FILE"),
    ("Llama2Tokenizer", {}, "--tokenizer-type Llama2Tokenizer needs --tokenizer-model FILE"),
    ("TikTokenizer", {"tokenizer_model": "VOCAB"}, "--tokenizer-type TikTokenizer needs --tiktoken-pattern v1 or v2"),
])
def test_missing_tokenizer_files_are_named(files, name, kwargs, message):
    vocab, _ = gpt2_bpe_files(files)
    kwargs = {key: str(vocab) if value == "VOCAB" else value for key, value in kwargs.items()}
    with pytest.raises(TokenizerError, match=message):
        build_tokenizer(name, **kwargs)


def test_preprocessing_with_megatron_lm_vocabulary_files_records_them(files, tmp_path):
    vocab, merges = gpt2_bpe_files(files)
    result = preprocess_jsonl([str(jsonl(tmp_path / "text.jsonl"))], str(tmp_path / "gpt2"), "GPT2BPETokenizer", None,
                              progress=False, tokenizer_options={"vocab_file": str(vocab), "merge_file": str(merges)})
    prefix = result["text"]["prefix"]
    record = json.loads(open(prefix + ".json").read())
    assert record["vocab_file"] == str(vocab.resolve()) and record["merge_file"] == str(merges.resolve())
    tokens = np.fromfile(prefix + ".bin", dtype=np.uint16)
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    assert list(tokens[: len(tokenizer.tokenize(TEXT[0])) + 1]) == tokenizer.tokenize(TEXT[0]) + [tokenizer.eod]


def test_tiktokenizer_reads_megatron_lms_vocabulary_json(tmp_path):
    import base64

    pytest.importorskip("tiktoken")
    merges = [b"th", b"he", b"the", b" t"]
    vocab = [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(), "token_str": ""} for i in range(256)]
    vocab += [{"rank": 256 + j, "token_bytes": base64.b64encode(m).decode(), "token_str": m.decode()}
              for j, m in enumerate(merges)]
    path = tmp_path / "tiktoken.json"
    path.write_text(json.dumps(vocab))
    tokenizer = build_tokenizer("TikTokenizer", str(path), tiktoken_pattern="v2", tiktoken_num_special_tokens=16)
    assert tokenizer.vocab_size == 16 + 260  # the special tokens first, then the vocabulary
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eod) == (0, 1, 2)  # <unk>, <s>, </s>
    ids = tokenizer.tokenize("the theme")
    assert ids[0] == 16 + 256 + 2 and tokenizer.detokenize(ids) == "the theme"  # 'the' is merge 2
