"""Resuming is exact: the losses after a stop and a resume equal an uninterrupted run's."""

import argparse
import re
import shutil
import subprocess

import pytest
import torch

from tests.launch import (
    REPO,
    assert_checkpoints_equal,
    environment,
    losses,
    run_ranks,
    sigterm_job_at,
    torchrun_command,
)

# The run of issue 13, as a new user tried it: mock data read by 2 data-loader workers per rank.
MOCK_RUN = {
    "--mock-data": True, "--num-layers": "2", "--hidden-size": "64", "--num-attention-heads": "4",
    "--seq-length": "64", "--max-position-embeddings": "64", "--micro-batch-size": "4",
    "--global-batch-size": "8", "--num-experts": "4", "--moe-router-topk": "2",
    "--expert-model-parallel-size": "2", "--tokenizer-type": "NullTokenizer", "--vocab-size": "256",
    "--seed": "3", "--save-interval": "10", "--train-iters": "14", "--lr": "1e-3", "--log-interval": "1",
}


def flags(**overrides):
    merged = {**MOCK_RUN, **overrides}
    return [str(item) for flag, value in merged.items() if value is not None
            for item in ((flag,) if value is True else (flag, value))]


def test_a_samples_loss_mask_does_not_depend_on_the_sample_read_before_it():
    from megatron_lsh.data.gpt_data import build_gpt_datasets
    from megatron_lsh.data.tokenizer import build_tokenizer

    args = argparse.Namespace(mock_data=True, seed=3, seq_length=64, data_cache_path=None)
    tokenizer = build_tokenizer("NullTokenizer", None, 256)

    def train_dataset():
        return build_gpt_datasets(args, tokenizer, [64, 0, 0])[0]

    # Mock tokens hit the padding id now and then: find samples whose labels do.
    reference = train_dataset()
    padded = [i for i in range(64) if (reference[i]["loss_mask"] == 0).any()]
    assert padded, "no sample with padding labels to test with"
    fresh = {i: train_dataset()[i]["loss_mask"] for i in range(8)}
    for first in padded[:3]:
        dataset = train_dataset()
        dataset[first]  # read first, as one data-loader worker may
        for i, mask in fresh.items():
            assert torch.equal(dataset[i]["loss_mask"], mask), (first, i)


# With Megatron-LM's two 8-bit directions: payload formats resume exactly too.
LSH = {"--lsh": True, "--lsh-num-hashes": "4", "--moe-dispatch-fwd-dtype": "mxfp8", "--moe-combine-bwd-dtype": "mxfp8"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Losses and checkpoint directory (iterations 10 and 14) of a straight LSH run. (Stock dispatch
    resumes exactly in test_parallel_layouts.py, across layouts.)"""
    save = tmp_path_factory.mktemp("straight")
    return losses(run_ranks(flags(**LSH, **{"--save": str(save)}))), save


def resume_and_compare(save, lsh, uninterrupted_run, stopped_at, scratch):
    """The resumed run logs the uninterrupted run's losses and ends on its very checkpoint:
    weights and optimizer state of iteration 14 equal bit for bit."""
    straight, straight_save = uninterrupted_run
    resumed = run_ranks(flags(**lsh, **{"--save": str(save), "--load": str(save)}))
    assert f"resuming at iteration {stopped_at}" in resumed
    resumed = losses(resumed)
    assert sorted(resumed) == list(range(stopped_at + 1, 15))
    assert all(resumed[i] == straight[i] for i in resumed), (resumed, straight)
    assert_checkpoints_equal(straight_save, save, 14, scratch)


@pytest.mark.slow
def test_exit_interval_then_the_time_limit_then_sigterm_then_resume_give_the_same_losses(tmp_path, uninterrupted):
    """Stopped by --exit-interval at 5; resumed and stopped by --exit-duration-in-mins after one
    more whole step (a limit shorter than a step); resumed and stopped by SIGTERM, as SLURM stops
    a job ahead of its time limit, with the signal handler on (it saves and exits 0); resumed again
    to the end. Every loss on the way is the uninterrupted run's."""
    save = tmp_path / "run"
    first = losses(run_ranks(flags(**LSH, **{"--save": str(save), "--exit-interval": "5"})))
    assert sorted(first) == list(range(1, 6))
    output = run_ranks(flags(**LSH, **{"--save": str(save), "--load": str(save), "--exit-duration-in-mins": "0.001"}))
    assert "resuming at iteration 5" in output
    assert "stopping at iteration 6: --exit-duration-in-mins 0.001 reached" in output
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert all(loss == uninterrupted[0][i] for i, loss in {**first, **losses(output)}.items())

    output = sigterm_job_at(
        flags(**LSH, **{"--save": str(save), "--load": str(save), "--exit-signal-handler": True}), 8)
    assert "resuming at iteration 6" in output
    stopped = re.search(r"stopping at iteration (\d+): received SIGTERM", output)
    assert stopped, output[-3000:]
    stopped_at = int(stopped[1])
    assert 8 <= stopped_at < 14, output[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped_at)
    assert all(loss == uninterrupted[0][i] for i, loss in losses(output).items())
    resume_and_compare(save, LSH, uninterrupted, stopped_at, tmp_path)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_and_an_earlier_one_can_be_loaded(tmp_path, uninterrupted):
    straight, original = uninterrupted
    save = tmp_path / "ckpt"
    shutil.copytree(original, save)
    shard = save / "iter_0000014" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    result = subprocess.run(
        torchrun_command(flags(**LSH, **{"--load": str(save), "--save-interval": None, "--train-iters": "16"})),
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error (rank 0)")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"checkpoint {save / 'iter_0000014'} is damaged: __1_0.distcp is truncated (100 of" in errors[0]
    assert "resume from an earlier one with --ckpt-step 10 (complete: [10])" in errors[0]
    assert "]: Traceback" not in result.stderr  # no rank's (torchrun reports the exit code its way)
    resumed = run_ranks(flags(**LSH, **{"--load": str(save), "--save-interval": None, "--ckpt-step": "10"}))
    assert "resuming at iteration 10" in resumed
    assert all(loss == straight[i] for i, loss in losses(resumed).items())
    assert sorted(losses(resumed)) == [11, 12, 13, 14]


@pytest.mark.slow
def test_a_non_finite_step_names_iteration_and_layer_and_saves_nothing_after(tmp_path):
    # A learning rate no model survives: the second step's forward overflows.
    result = subprocess.run(
        torchrun_command(flags(**LSH, **{"--save": str(tmp_path), "--save-interval": "1", "--lr": "1e6",
                                         "--clip-grad": "0", "--lr-decay-style": "constant"})),
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error (rank 0)")]
    assert len(errors) == 1, result.stderr[-3000:]
    failed_at = int(re.search(r"is not finite at iteration (\d+)", errors[0])[1])
    assert re.search(r"first non-finite (output: decoder\.layers\.\d+\.mlp \(MoE layer\)|output: decoder\.layers\.\d+ "
                     r"\(transformer layer\)|gradient: [\w.]+)", errors[0]), errors[0]
    saved = sorted(int(p.name[5:]) for p in tmp_path.glob("iter_*"))
    assert saved == list(range(1, failed_at)), (saved, failed_at)


@pytest.mark.slow
def test_t5_switch_style_stopped_by_the_time_limit_resumes_exactly(corpus, tmp_path):
    # Switch-style routing (top-1, relative position buckets) with LSH.
    from tests.test_pretrain_t5 import t5_flags

    run = {"--train-iters": "6", "--log-interval": "1", "--eval-interval": "100", "--lsh": True,
           "--moe-router-topk": "1", "--position-embedding-type": "relative"}
    straight = losses(run_ranks(t5_flags(corpus, **run, **{"--save": str(tmp_path / "straight")}),
                                script="pretrain_t5_moe.py"))
    save = str(tmp_path / "stopped")
    stopped = run_ranks(t5_flags(corpus, **run, **{"--save": save, "--exit-duration-in-mins": "0.001"}),
                        script="pretrain_t5_moe.py")
    assert "stopping at iteration 1: --exit-duration-in-mins 0.001 reached" in stopped
    resumed = losses(run_ranks(t5_flags(corpus, **run, **{"--save": save, "--load": save}),
                               script="pretrain_t5_moe.py"))
    assert sorted(resumed) == [2, 3, 4, 5, 6]
    assert all(resumed[i] == straight[i] for i in resumed), (resumed, straight)
    assert_checkpoints_equal(tmp_path / "straight", save, 6, tmp_path)


# The job of a SLURM user with periodic saves, stopped by the cluster after it has saved twice.
STOPPED_AFTER_SAVES = {
    "gpt-2-ranks": ("pretrain_gpt_moe.py", 2, {}),
    "gpt-4-ranks": ("pretrain_gpt_moe.py", 4, {"--expert-model-parallel-size": "4", "--global-batch-size": "16"}),
    "t5-2-ranks": ("pretrain_t5_moe.py", 2, {}),
    "t5-4-ranks": ("pretrain_t5_moe.py", 4, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(STOPPED_AFTER_SAVES))
def test_sigterm_to_the_whole_job_after_periodic_saves_saves_and_resumes_exactly(case, corpus, tmp_path):
    """SIGTERM to every process of a job (torchrun included, as SLURM sends it) that has saved
    twice already (megatron-core's checkpoint writer kept a helper process the same signal killed):
    every rank finishes its step, saves and ends cleanly; the resubmitted job's losses and final checkpoint are the
    uninterrupted run's; only
    the newest two checkpoints are kept; RNG files load with weights_only; the time axis is one line."""
    from megatron_lsh.training.checkpointing import complete_iterations
    from tests.test_pretrain_t5 import t5_flags

    script, nproc, extra = STOPPED_AFTER_SAVES[case]

    def job(save, **more):
        run = {"--train-iters": "8", "--save-interval": "2", "--log-interval": "1", "--save": str(save),
               "--load": str(save), "--exit-signal-handler": True, "--ckpt-keep-last": "2", **extra, **more}
        if "t5" in script:
            return t5_flags(corpus, **run, **{"--eval-interval": "100", "--lsh": True})
        return flags(**LSH, **run, **{"--eval-iters": "1", "--num-workers": "0"})

    straight = losses(run_ranks(job(tmp_path / "straight"), nproc=nproc, script=script))
    save = tmp_path / "stopped"
    output = sigterm_job_at(job(save, **{"--tensorboard-dir": str(tmp_path / "tb")}), 5, nproc=nproc, script=script,
                            whole_group=True)
    assert "saved checkpoint" in output and f"{save / 'iter_0000004'}" in output, output[-3000:]
    stopped_at = int(re.search(r"stopping at iteration (\d+): received SIGTERM", output)[1])
    assert 5 <= stopped_at < 8, output[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped_at)
    # --ckpt-keep-last 2: the periodic save before the stop, and the stop's own (a periodic one too when even)
    assert complete_iterations(str(save)) == [stopped_at - (1 if stopped_at % 2 else 2), stopped_at]
    assert not list(save.glob("*.partial"))
    torch.load(save / f"iter_{stopped_at:07d}" / "rng" / "rank_00001.pt", weights_only=True)

    resumed = run_ranks(job(save, **{"--tensorboard-dir": str(tmp_path / "tb")}), nproc=nproc, script=script)
    assert f"resuming at iteration {stopped_at}" in resumed and "restart gap: " in resumed
    every = {**losses(output), **losses(resumed)}
    assert sorted(every) == list(range(1, 9))
    assert all(every[i] == straight[i] for i in every), (every, straight)
    assert_checkpoints_equal(tmp_path / "straight", save, 8, tmp_path)
    assert complete_iterations(str(save)) == [6, 8]

    # Perplexity against time is one line: the resumed rows go on from the stopped job's clock.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = {}
    for events in sorted((tmp_path / "tb").glob("events.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        times = [event.step for event in accumulator.Scalars("lm loss vs time")]
        iterations = [event.step for event in accumulator.Scalars("lm loss")]
        rows.update(zip(iterations, times))
        if "restart gap seconds" in accumulator.Tags()["scalars"]:
            assert [event.step for event in accumulator.Scalars("restart gap seconds")] == [stopped_at + 1]
    ordered = [rows[i] for i in sorted(rows)]
    assert sorted(rows) == list(range(1, 9)) and ordered == sorted(ordered), rows


LEARNING_RATE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.* learning rate: ([0-9.E+-]+) \|")


def learning_rates(output):
    return {int(it): float(lr) for it, lr in LEARNING_RATE.findall(output)}


@pytest.mark.slow
def test_extending_a_cosine_run_is_refused_unless_a_flag_says_whose_schedule_wins(tmp_path):
    """A cosine run of 8 iterations extended to 16: refused in one line naming the flag and both
    values; --override-opt_param-scheduler decays over the 16 iterations the flags now give,
    --use-checkpoint-opt_param-scheduler stays where the checkpoint's schedule ended (--min-lr)."""
    import math

    run = {"--lr": "1e-3", "--min-lr": "1e-4", "--lr-decay-style": "cosine", "--save-interval": None,
           "--eval-iters": "1"}
    base = tmp_path / "base"
    run_ranks(flags(**run, **{"--train-iters": "8", "--save": str(base)}))

    def extended(name, *choice):
        save = tmp_path / name
        shutil.copytree(base, save)
        return flags(**run, **{"--train-iters": "16", "--save": str(save), "--load": str(save),
                               **{flag: True for flag in choice}})

    refused = subprocess.run(torchrun_command(extended("refused")), cwd=REPO, env=environment(),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: --lr-decay-iters (default: --train-iters) 16 differs from the checkpoint's 8 "
                      f"({base.parent / 'refused' / 'iter_0000008'}): pass --override-opt_param-scheduler to train "
                      "with the flags' schedule, or --use-checkpoint-opt_param-scheduler to keep the checkpoint's"], \
        refused.stderr[-3000:]

    overridden = run_ranks(extended("overridden", "--override-opt_param-scheduler"))
    assert "resuming at iteration 8" in overridden
    lrs = learning_rates(overridden)
    assert sorted(lrs) == list(range(9, 17))
    for iteration, lr in lrs.items():  # megatron-core's cosine over 16 iterations, after `iteration` steps
        assert lr == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * iteration / 16)), rel=1e-5)
    kept = learning_rates(run_ranks(extended("kept", "--use-checkpoint-opt_param-scheduler")))
    assert sorted(kept) == list(range(9, 17)) and set(kept.values()) == {1e-4}


@pytest.mark.slow
def test_a_resubmitted_fine_tune_continues_its_own_checkpoint_instead_of_starting_over(tmp_path):
    base = tmp_path / "base"
    run_ranks(flags(**{"--train-iters": "4", "--save-interval": None, "--save": str(base), "--eval-iters": "1"}))

    def fine_tune(save, **more):
        return flags(**{"--finetune": True, "--load": str(base), "--save": str(save), "--train-iters": "8",
                        "--save-interval": "2", "--eval-iters": "1", **more})

    straight = losses(run_ranks(fine_tune(tmp_path / "straight")))
    assert sorted(straight) == list(range(1, 9))
    first = run_ranks(fine_tune(tmp_path / "job", **{"--exit-interval": "4"}))
    assert "fine-tuning from iteration 0" in first
    again = run_ranks(fine_tune(tmp_path / "job"))  # the same command, resubmitted after a preemption
    assert f"--save {tmp_path / 'job'} holds this job's own checkpoint (iteration 4): resuming from it" in again
    assert "resuming at iteration 4" in again
    resumed = losses(again)
    assert sorted(resumed) == [5, 6, 7, 8] and all(resumed[i] == straight[i] for i in resumed)


@pytest.mark.slow
def test_a_save_that_fails_ends_every_rank_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A file-system limit no checkpoint shard fits under (what a full disk does to a write): the
    save fails on every rank, the job ends in one line naming the checkpoint, nobody waits at a
    barrier, and the previous checkpoint stays the newest complete one."""
    import resource

    save = tmp_path / "run"
    run_ranks(flags(**{"--train-iters": "4", "--save-interval": "2", "--save": str(save), "--eval-iters": "1"}))

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = subprocess.run(
        torchrun_command(flags(**{"--train-iters": "8", "--save-interval": "2", "--save": str(save),
                                  "--load": str(save), "--override-opt_param-scheduler": True, "--eval-iters": "1"})),
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=240, preexec_fn=small_files)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: saving checkpoint {save / 'iter_0000006'} failed (rank ")
    assert f"the newest complete checkpoint {save / 'iter_0000004'} is intact" in errors[0]
    assert "]: Traceback" not in result.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not list(save.glob("*.partial"))


@pytest.mark.slow
def test_a_schedule_in_samples_trains_as_the_same_schedule_in_iterations(tmp_path):
    """Megatron-LM's sample-based flags: 64 samples of 8 a step are 8 iterations, the warmup and the
    decay counted in samples; learning rates and losses equal the same schedule in iterations."""
    common = {"--save-interval": None, "--lr-decay-style": "cosine", "--min-lr": "1e-4", "--eval-iters": "1"}
    in_iterations = run_ranks(flags(**common, **{"--train-iters": "8", "--lr-warmup-iters": "2",
                                                 "--lr-decay-iters": "6"}))
    in_samples = run_ranks(flags(**common, **{"--train-iters": None, "--train-samples": "64",
                                              "--lr-warmup-samples": "16", "--lr-decay-samples": "48"}))
    assert learning_rates(in_samples) == learning_rates(in_iterations) and len(learning_rates(in_samples)) == 8
    assert losses(in_samples) == losses(in_iterations)
