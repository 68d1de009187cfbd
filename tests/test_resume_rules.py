"""Where a job starts from and what it keeps, read off the files alone: a resubmitted job continues
its own checkpoint, a missing or foreign one is refused, a changed schedule is refused unless a flag
says whose wins, old checkpoints are pruned but never the last, the run's clock continues, and bad
counts or an unwritable --save stop a run before its first step."""

import argparse
import os
import time

import pytest
import torch

from megatron_lsh.training.arguments import ArgumentError
from megatron_lsh.training.checkpointing import (
    COMPLETE_MARKER,
    TRACKER_FILE,
    _rng_state,
    _set_rng_state,
    complete_iterations,
    foreign_checkpoints,
    iteration_dir,
    prune_checkpoints,
)
from megatron_lsh.training.resume import RunClock, plan_resume, schedule_differences
from tests.launch import pretrain_error


def fake_checkpoint(root, iteration, scheduler=True):
    """A complete checkpoint as far as the resume rules read it: the marker and a common state."""
    path = iteration_dir(str(root), iteration)
    os.makedirs(path)
    torch.save({"scheduler": {"max_lr": 1e-3} if scheduler else None, "args": {}}, os.path.join(path, "common.pt"))
    (root / f"iter_{iteration:07d}" / "metadata.json").write_text(
        '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", '
        '"common_backend_version": 1}')
    (root / f"iter_{iteration:07d}" / COMPLETE_MARKER).write_text(f"{iteration}\n")
    (root / TRACKER_FILE).write_text(f"{iteration}\n")


def job(save=None, load=None, finetune=False, ckpt_step=None):
    return argparse.Namespace(save=None if save is None else str(save), load=None if load is None else str(load),
                              finetune=finetune, ckpt_step=ckpt_step)


def test_a_resubmitted_job_resumes_from_its_own_save_whatever_load_and_finetune_say(tmp_path):
    base, own = tmp_path / "base", tmp_path / "own"
    fake_checkpoint(base, 100)
    fake_checkpoint(own, 40)
    plan = plan_resume(job(save=own, load=base, finetune=True))
    assert (plan.directory, plan.finetune) == (str(own), False)
    assert f"--save {own} holds this job's own checkpoint (iteration 40): resuming from it" in plan.note
    # The first submission of the same job fine-tunes from --load.
    plan = plan_resume(job(save=tmp_path / "empty", load=base, finetune=True))
    assert (plan.directory, plan.finetune, plan.note) == (str(base), True, None)
    # A job saving where it loads: from scratch the first time, resumed afterwards, no note.
    assert plan_resume(job(save=tmp_path / "fresh", load=tmp_path / "fresh")) is None
    plan = plan_resume(job(save=own, load=own))
    assert (plan.directory, plan.finetune, plan.note) == (str(own), False, None)
    # --ckpt-step picks an iteration of --load when --load is --save.
    assert plan_resume(job(save=own, load=own, ckpt_step=20)).step == 20


def test_an_imported_checkpoint_in_save_is_fine_tuned_not_resumed(tmp_path):
    imported = tmp_path / "imported"
    fake_checkpoint(imported, 0, scheduler=False)  # import_hf writes weights only
    plan = plan_resume(job(save=imported, load=imported, finetune=True))
    assert (plan.directory, plan.finetune) == (str(imported), True)


def test_finetune_or_a_separate_load_that_finds_nothing_is_refused(tmp_path):
    with pytest.raises(ArgumentError, match=r"--load \S+ holds no complete checkpoint; --finetune needs the weights"):
        plan_resume(job(save=tmp_path / "out", load=tmp_path / "missing", finetune=True))
    with pytest.raises(ArgumentError, match=r"--load \S+ holds no complete checkpoint; pass the directory"):
        plan_resume(job(save=tmp_path / "out", load=tmp_path / "missing"))
    with pytest.raises(ArgumentError, match=r"--load \S+ holds no complete checkpoint; --finetune"):
        plan_resume(job(save=tmp_path / "same", load=tmp_path / "same", finetune=True))
    with pytest.raises(ArgumentError, match="--finetune needs --load DIR"):
        plan_resume(job(save=tmp_path / "out", finetune=True))


def test_checkpoints_this_project_did_not_write_are_never_taken_for_ours(tmp_path):
    megatron_lm = tmp_path / "megatron-lm"
    (megatron_lm / "iter_0000100").mkdir(parents=True)
    (megatron_lm / TRACKER_FILE).write_text("100")
    assert foreign_checkpoints(str(megatron_lm)) == ["iter_0000100"]
    before = sorted(p.name for p in megatron_lm.iterdir())
    with pytest.raises(ArgumentError, match=r"--save \S+ holds iter_0000100, which megatron-lsh did not write"):
        plan_resume(job(save=megatron_lm, load=megatron_lm))
    with pytest.raises(ArgumentError, match=r"--load \S+ holds iter_0000100, which megatron-lsh did not write"):
        plan_resume(job(save=tmp_path / "new", load=megatron_lm))
    assert sorted(p.name for p in megatron_lm.iterdir()) == before
    tracker_only = tmp_path / "tracker-only"
    tracker_only.mkdir()
    (tracker_only / TRACKER_FILE).write_text("release")
    assert foreign_checkpoints(str(tracker_only)) == [f"{TRACKER_FILE} ('release')"]
    # Ours, with a crashed save's leftover, is not foreign.
    ours = tmp_path / "ours"
    fake_checkpoint(ours, 10)
    (ours / "iter_0000020.partial").mkdir()
    assert foreign_checkpoints(str(ours)) == []


def schedule(**changes):
    values = dict(max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=10, lr_decay_style="cosine", lr_decay_steps=1000,
                  start_wd=0.01, end_wd=0.01, num_steps=500, wd_incr_style="constant", wd_incr_steps=1000)
    return {**values, **changes}


def test_a_changed_schedule_flag_is_named_with_both_values():
    args = argparse.Namespace(lr_decay_style="cosine", train_samples=None, lr_warmup_fraction=None)
    assert schedule_differences(schedule(), {}, schedule(num_steps=0), args) == []
    assert schedule_differences(schedule(), {}, schedule(max_lr=2e-3, lr_decay_steps=2000), args) == [
        ("--lr", 2e-3, 1e-3), ("--lr-decay-iters (default: --train-iters)", 2000, 1000)]
    assert schedule_differences(schedule(), {}, schedule(start_wd=0.1, end_wd=0.1), args) == [
        ("--weight-decay", 0.1, 0.01)]
    # A longer run whose decay was set apart changes nothing of the schedule (constant weight decay).
    assert schedule_differences(schedule(), {}, schedule(wd_incr_steps=4000), args) == []
    wsd = argparse.Namespace(lr_decay_style="WSD", lr_wsd_decay_steps=200, lr_wsd_decay_style="linear")
    saved_args = {"lr_wsd_decay_iters": 100, "lr_wsd_decay_style": "linear"}  # saved before sample schedules
    assert schedule_differences(schedule(lr_decay_style="WSD"), saved_args, schedule(lr_decay_style="WSD"), wsd) == [
        ("--lr-wsd-decay-iters", 200, 100)]


def test_the_run_clock_continues_from_the_checkpoint_and_keeps_restart_gaps_apart():
    first = RunClock(job_start=time.time() - 100.0)
    saved = first.state()
    assert saved["seconds"] == pytest.approx(100.0, abs=1.0)
    saved["saved_at"] -= 30.0  # the job was killed, and waited in the queue, 30 s after this save
    second = RunClock()
    gap = second.resume(saved)
    assert gap == pytest.approx(30.0, abs=1.0)
    assert second.seconds() == pytest.approx(100.0, abs=1.0)
    assert second.state()["restart_gap_seconds"] == pytest.approx(30.0, abs=1.0)
    assert RunClock().resume(None) is None  # a checkpoint from before clocks were saved


def test_pruning_keeps_the_newest_checkpoints_and_never_the_last_one_less(tmp_path):
    for iteration in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, iteration)
    (tmp_path / "iter_0000050.partial").mkdir()
    assert prune_checkpoints(str(tmp_path), 2) == [10, 20]
    assert complete_iterations(str(tmp_path)) == [30, 40]
    assert prune_checkpoints(str(tmp_path), 1) == [30]
    assert prune_checkpoints(str(tmp_path), 1) == []
    assert complete_iterations(str(tmp_path)) == [40]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000040", "iter_0000050.partial", TRACKER_FILE]


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    from megatron_lsh import compat

    compat.apply()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


@pytest.mark.parametrize("flag, value, message", [
    ("--eval-interval", "0", "--eval-interval 0 must be positive; --eval-iters 0 turns evaluation off"),
    ("--log-interval", "0", "--log-interval 0 must be positive"),
    ("--save-interval", "-5", "--save-interval -5 must be positive; leave it out to save only at the end (and on a "
                              "stop)"),
    ("--micro-batch-size", "0", "--micro-batch-size 0 must be positive"),
    ("--global-batch-size", "-8", "--global-batch-size -8 must be positive"),
    ("--eval-iters", "-1", "--eval-iters -1 must be zero or more"),
    ("--ckpt-keep-last", "0", "--ckpt-keep-last 0 must be positive; leave it out to keep every checkpoint"),
])
def test_zero_or_negative_counts_are_refused_in_one_line(flag, value, message, tmp_path, capfd, monkeypatch):
    flags = [*MOCK, "--save", str(tmp_path), flag, value]
    assert pretrain_error(flags, capfd, monkeypatch) == f"error: {message}"


MOCK = ["--mock-data", "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length",
        "32", "--micro-batch-size", "2", "--num-experts", "2", "--vocab-size", "128", "--train-iters", "4",
        "--lr", "1e-3"]


def test_an_unwritable_save_directory_is_refused_before_the_first_step(tmp_path, capfd, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    error = pretrain_error([*MOCK, "--save", str(blocker / "checkpoints")], capfd, monkeypatch)
    assert error.startswith(f"error: --save {blocker / 'checkpoints'} is not a writable directory (")


def test_resume_flags_that_find_nothing_are_refused_before_the_first_step(tmp_path, capfd, monkeypatch):
    error = pretrain_error([*MOCK, "--finetune", "--load", str(tmp_path / "none"), "--save", str(tmp_path / "out")],
                           capfd, monkeypatch)
    assert error == f"error: --load {tmp_path / 'none'} holds no complete checkpoint; --finetune needs the weights " \
                    "to start from"
    error = pretrain_error([*MOCK, "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"],
                           capfd, monkeypatch)
    assert error.startswith("error: --override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                            "contradict each other")


def test_a_split_that_leaves_a_needed_split_without_documents_is_refused(corpus, capfd, monkeypatch):
    from megatron_lsh.data.gpt_data import SPLIT_NAMES, DataError  # noqa: F401 - the names the error uses

    flags = ["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--micro-batch-size", "2", "--num-experts", "2", "--train-iters", "4", "--lr", "1e-3",
             "--data-path", corpus["train"], "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", corpus["tokenizer"], "--num-workers", "0", "--eval-iters", "1"]
    error = pretrain_error([*flags, "--split", "999,1,0"], capfd, monkeypatch)
    assert error.startswith(f"error: --split 999,1,0: the validation split of {corpus['train']} gets none of its ")
    assert "give it a larger share (e.g. --split 90,5,5)" in error


def test_a_schedule_in_samples_names_the_sample_flags():
    args = argparse.Namespace(lr_decay_style="cosine", train_samples=6400, lr_warmup_fraction=None)
    assert schedule_differences(schedule(), {}, schedule(lr_decay_steps=6400, lr_warmup_steps=64), args) == [
        ("--lr-warmup-samples", 64, 10), ("--lr-decay-samples (default: --train-samples)", 6400, 1000)]



def test_a_save_directory_whose_newest_checkpoint_lost_its_common_state_still_resumes_from_it(tmp_path):
    """So that loading it names the missing file instead of a job silently starting elsewhere."""
    own = tmp_path / "own"
    fake_checkpoint(own, 40)
    (own / "iter_0000040" / "common.pt").unlink()
    plan = plan_resume(job(save=own, load=tmp_path / "base", finetune=True))
    assert (plan.directory, plan.finetune) == (str(own), False)
