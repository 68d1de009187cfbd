"""pretrain_t5_moe.py: span corruption data, training on 2 CPU ranks, resume, and bad input."""

import pytest

from tests.distributed import run_distributed
from tests.launch import (
    as_flags,
    losses,
    pretrain_error,
    run_pretrain_expecting_error,
    run_ranks,
)
from tests.t5_workers import t5_samples

SCRIPT = "pretrain_t5_moe.py"


def t5_flags(corpus, **overrides):
    """A tiny T5-MoE on the test corpus, 2 ranks, expert parallel 2 (a cosine schedule, as the
    tests' expectations were measured with)."""
    return as_flags({
        "--lr-decay-style": "cosine",
        "--encoder-num-layers": "2", "--decoder-num-layers": "2", "--hidden-size": "64",
        "--num-attention-heads": "4", "--encoder-seq-length": "64", "--decoder-seq-length": "24",
        "--vocab-extra-ids": "40", "--micro-batch-size": "4", "--global-batch-size": "16",
        "--num-experts": "4", "--moe-router-topk": "2", "--moe-aux-loss-coeff": "1e-2",
        "--expert-model-parallel-size": "2", "--lr": "2e-3", "--lr-warmup-iters": "3",
        "--train-data-path": corpus["t5_train"], "--valid-data-path": corpus["t5_valid"],
        "--tokenizer-type": "SentencePieceTokenizer", "--tokenizer-model": corpus["t5_tokenizer"],
        "--num-workers": "0", "--eval-iters": "2", "--normalization": "RMSNorm",
    }, overrides)


@pytest.fixture(scope="module", params=[24, 10], ids=["decoder-24", "decoder-10"])
def samples(corpus, request):
    """Samples with a decoder that holds every span (24), and one that cannot (10: T5's own 512/128
    at 15% needs more than 128 positions now and then), whose spans are then bounded."""
    return run_distributed(t5_samples, 1, corpus, 20, 64, request.param)[0]


def test_masking_yields_sentinels_in_order_and_targets_that_restore_the_text(samples):
    sentinels = samples["sentinels"]
    for sample in samples["samples"]:
        encoder = [t for t, m in zip(sample["text_enc"], sample["enc_mask"]) if m]
        decoder_in = [t for t, m in zip(sample["text_dec"], sample["dec_mask"]) if m]
        targets = [t for t, m in zip(sample["labels"], sample["loss_mask"]) if m]
        used = [t for t in encoder if t in sentinels]
        assert used and used == sentinels[: len(used)]  # <extra_id_0>, <extra_id_1>, ... in order
        # Teacher forcing: the decoder reads <s> then the targets shifted by one.
        assert decoder_in[0] == samples["bos"] and decoder_in[1:] == targets[:-1]
        assert targets[-1] == samples["eos"]
        # Replacing each sentinel by the tokens that follow it in the targets restores the text.
        spans, current = {}, None
        for t in targets[:-1]:
            if t in sentinels:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        assert list(spans) == used
        restored = [piece for t in encoder for piece in (spans[t] if t in spans else [t])]
        assert restored == sample["original"]


def test_about_fifteen_percent_of_tokens_are_masked(samples):
    if len(samples["samples"][0]["text_dec"]) < 24:
        pytest.skip("a decoder too short for 15% of the encoder masks less, by design")
    original = sum(len(s["original"]) for s in samples["samples"])
    targets = sum(
        sum(1 for t, m in zip(s["labels"], s["loss_mask"])
            if m and t not in samples["sentinels"] and t != samples["eos"])
        for s in samples["samples"]
    )
    assert 0.08 < targets / original < 0.2


def test_a_decoder_shorter_than_every_span_needs_still_masks_within_it(corpus):
    bounded = run_distributed(t5_samples, 1, corpus, 40, 64, 10)[0]["samples"]
    decoder_tokens = [sum(s["dec_mask"]) for s in bounded]
    assert max(decoder_tokens) <= 10 and min(decoder_tokens) >= 3  # <s>, a sentinel and a token at least
    assert sum(1 for n in decoder_tokens if n >= 9) > len(bounded) // 2  # filled where spans were dropped


@pytest.mark.slow
@pytest.mark.parametrize("lsh", ["--lsh"])  # stock T5 trains in test_parallel_layouts.py
def test_two_ranks_train_t5_moe_with_falling_loss(corpus, lsh):
    output = run_ranks([*t5_flags(corpus, **{"--train-iters": "30", "--log-interval": "5",
                                             "--eval-interval": "15"}), lsh], script=SCRIPT)
    logged = losses(output)
    assert sorted(logged) == [5, 10, 15, 20, 25, 30]
    assert logged[30] < logged[5] - 0.5, logged
    assert "load_balancing_loss" in output
    assert ("lsh compression rate" in output) == (lsh == "--lsh")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"--decoder-seq-length": "2"}, "--decoder-seq-length 2 is too short: <s>, a sentinel and a masked token"),
        ({"--decoder-seq-length": None}, "--decoder-seq-length"),
        ({"--encoder-seq-length": "400", "--decoder-seq-length": "200"}, "--vocab-extra-ids 40 sentinels cannot mark "
                                                                         "up to 60"),
        ({"--vocab-extra-ids": "100", "--encoder-seq-length": "400", "--decoder-seq-length": "200"},
         "holds 40 sentinel pieces but --vocab-extra-ids is 100"),
        ({"--moe-layer-freq": "[1,0,1]"}, "--moe-layer-freq has 3 entries"),
        ({"--global-batch-size": "12"}, "--global-batch-size 12 must be a multiple"),
        ({"--expert-model-parallel-size": "3"}, "--expert-model-parallel-size 3 must divide --num-experts 4"),
    ],
    ids=["decoder-too-short", "no-decoder-length", "too-few-sentinels", "tokenizer-sentinels",
         "layer-pattern", "global-batch", "experts"],
)
def test_bad_t5_input_gives_one_clear_error(corpus, overrides, expected, capfd, monkeypatch):
    error = pretrain_error(t5_flags(corpus, **{"--train-iters": "2", **overrides}), capfd, monkeypatch,
                           world_size=2, model="t5")
    assert expected in error


@pytest.mark.slow
def test_t5_tokenizer_without_sentinels_is_refused(corpus):
    error = run_pretrain_expecting_error(
        t5_flags(corpus, **{"--train-iters": "2", "--tokenizer-model": corpus["tokenizer"]}),
        world_size=2, script=SCRIPT)
    assert "holds 0 sentinel pieces" in error
