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
    (["--attention-backend", "flash"], "--attention-backend flash is Transformer Engine's attention"),
    (["--distributed-backend", "nccl"], "--distributed-backend nccl needs CUDA GPUs"),
    (["--no-position-embedding", "--position-embedding-type", "learned_absolute"],
     "--no-position-embedding is deprecated (as in Megatron-LM): use --position-embedding-type"),
])
def test_megatron_lm_flags_that_cannot_apply_here_are_refused_in_one_line(flags, message, capfd, monkeypatch):
    if "nccl" in flags and torch.cuda.is_available():
        pytest.skip("nccl applies on a machine with CUDA")
    assert pretrain_error([*MOCK, *flags], capfd, monkeypatch).startswith(f"error: {message}")
