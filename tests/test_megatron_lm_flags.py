"""Megatron-LM's flags: sample-based schedules and warmup fractions counted as Megatron-LM counts
them, flags this build already satisfies accepted and said once, flags that cannot apply here
refused in one line."""

import re

import pytest
import torch

from megatron_lsh.training.arguments import ArgumentError
from tests.launch import pretrain_error
from tests.test_resume_rules import MOCK


def schedule_of(*flags):
    from megatron_lsh.training.arguments import parse_args, set_schedule_steps

    args = parse_args("test", [*MOCK[:MOCK.index("--train-iters")], "--lr", "1e-3", "--global-batch-size", "8",
                               *flags])
    set_schedule_steps(args)
    return (args.train_iters, args.lr_warmup_steps, args.lr_decay_steps, args.schedule_total_steps,
            args.schedule_increment)


def test_schedules_count_iterations_or_samples_as_megatron_lm_does():
    assert schedule_of("--train-iters", "100", "--lr-warmup-iters", "10") == (100, 10, 100, 100, 1)
    assert schedule_of("--train-iters", "100", "--lr-warmup-fraction", "0.1", "--lr-decay-iters", "80") == \
        (100, 8.0, 80, 100, 1)
    # Samples: iterations are the samples over the global batch; the schedule advances a batch a step.
    assert schedule_of("--train-samples", "800", "--lr-warmup-samples", "80") == (100, 80, 800, 800, 8)
    assert schedule_of("--train-samples", "800", "--lr-warmup-fraction", "0.25", "--lr-decay-samples", "400") == \
        (100, 100.0, 400, 800, 8)


@pytest.mark.parametrize("flags, message", [
    ([], "--train-iters or --train-samples is required"),
    (["--train-iters", "10", "--train-samples", "80"], "--train-iters and --train-samples: pass one"),
    (["--train-samples", "80", "--lr-warmup-iters", "2"], "--lr-warmup-iters counts iterations; with --train-samples "
                                                           "pass --lr-warmup-samples"),
    (["--train-iters", "10", "--lr-decay-samples", "80"], "--lr-decay-samples counts samples; pass --train-samples, "
                                                          "or --lr-decay-iters with --train-iters"),
    (["--train-iters", "10", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"],
     "--lr-warmup-fraction and --lr-warmup-iters: pass one"),
    (["--train-samples", "4"], "--train-samples 4 is less than one --global-batch-size 8"),
])
def test_schedule_flags_that_contradict_each_other_are_refused(flags, message):
    with pytest.raises(ArgumentError, match=re.escape(message)):
        schedule_of(*flags)


def test_megatron_lm_flags_this_build_satisfies_are_accepted_and_said_once():
    from megatron_lsh.training.arguments import parse_args, satisfied_flag_notes

    args = parse_args("test", [*MOCK, "--use-mcore-models", "--no-masked-softmax-fusion", "--no-position-embedding",
                               "--transformer-impl", "local", "--attention-backend", "auto"])
    assert [note.split(":")[0] for note in satisfied_flag_notes(args)] == [
        "accepted --use-mcore-models", "accepted --no-masked-softmax-fusion", "accepted --no-position-embedding"]
    assert satisfied_flag_notes(parse_args("test", MOCK)) == []


@pytest.mark.parametrize("flags, message", [
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine: "),
    (["--distributed-backend", "nccl"], "--distributed-backend nccl needs CUDA GPUs"),
    (["--no-position-embedding", "--position-embedding-type", "learned_absolute"],
     "--no-position-embedding is deprecated (as in Megatron-LM): use --position-embedding-type"),
    (["--multi-latent-attention", "--kv-lora-rank", "512"], "--multi-latent-attention (DeepSeek's MLA) is not built"),
    (["--kv-lora-rank", "512"], "--kv-lora-rank sizes DeepSeek's multi-latent attention"),
    (["--fp8-format", "hybrid"], "--fp8-format: fp8 compute needs Transformer Engine"),
    (["--calculate-per-token-loss"], "--calculate-per-token-loss is not built here"),
    (["--context-parallel-size", "2"], "--context-parallel-size 2: context parallelism is not built here"),
    (["--fp16", "--bf16"], "--fp16 and --bf16: pass one"),
    (["--loss-scale", "1024"], "--loss-scale scales fp16's loss: pass --fp16"),
    (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method"),
    (["--recompute-method", "block", "--recompute-num-layers", "1"],
     "--recompute-method / --recompute-num-layers apply to --recompute-granularity full only"),
    (["--moe-grouped-gemm", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
     "--moe-grouped-gemm runs each expert whole on its rank"),
    (["--moe-router-enable-expert-bias"], "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"),
    (["--global-batch-size", "8", "--rampup-batch-size", "3", "1", "16"],
     "--rampup-batch-size: its start 3 must be a multiple of --micro-batch-size 2"),
    (["--global-batch-size", "8", "--rampup-batch-size", "2", "4", "16"],
     "--rampup-batch-size 2 4 16: --global-batch-size 8 must be the start plus a whole number of increments"),
])
def test_megatron_lm_flags_that_cannot_apply_here_are_refused_in_one_line(flags, message, capfd, monkeypatch):
    if "nccl" in flags and torch.cuda.is_available():
        pytest.skip("nccl applies on a machine with CUDA")
    assert pretrain_error([*MOCK, *flags], capfd, monkeypatch).startswith(f"error: {message}")


def test_more_flags_this_build_satisfies_are_said_once():
    from megatron_lsh.training.arguments import parse_args, satisfied_flag_notes

    args = parse_args("test", [*MOCK, "--overlap-param-gather", "--no-rope-fusion", "--no-bias-swiglu-fusion",
                               "--cross-entropy-loss-fusion", "--no-create-attention-mask-in-dataloader"])
    assert [note.split(":")[0] for note in satisfied_flag_notes(args)] == [
        "accepted --overlap-param-gather", "accepted --no-rope-fusion", "accepted --no-bias-swiglu-fusion",
        "accepted --cross-entropy-loss-fusion", "accepted --no-create-attention-mask-in-dataloader"]


def test_a_batch_ramp_up_counts_its_smaller_steps_as_megatron_lm_does():
    from megatron_lsh.training.arguments import parse_args, set_schedule_steps

    args = parse_args("test", [*MOCK[:MOCK.index("--train-iters")], "--lr", "1e-3", "--global-batch-size", "12",
                               "--train-samples", "64", "--rampup-batch-size", "4", "4", "24"])
    args.data_parallel_size = 1
    set_schedule_steps(args)
    # Batches 4, 4, 4, 8, 8 (24 samples ramp: 8 per increment), then 12s: 4+4+4+8+8 = 28, then 3 x 12 = 64.
    assert args.train_iters == 8


def test_vocabulary_files_without_a_tokenizer_type_are_gpt2_bpe(tmp_path):
    from megatron_lsh.training.arguments import parse_args, satisfied_flag_notes, validate_args

    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text("{}")
    merges.write_text("")
    data = tmp_path / "data_text_document"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"data_text_document{suffix}").write_bytes(b"")
    flags = [flag for flag in MOCK if flag not in ("--mock-data", "--vocab-size", "128")]
    args = parse_args(
        "test", [*flags, "--data-path", str(data), "--vocab-file", str(vocab), "--merge-file", str(merges)]
    )
    validate_args(args, world_size=1)
    assert args.tokenizer_type == "GPT2BPETokenizer"
    assert any(
        note.startswith("no --tokenizer-type: --vocab-file with --merge-file") for note in satisfied_flag_notes(args)
    )
