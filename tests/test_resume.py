"""Resuming is exact: the losses after a stop and a resume equal an uninterrupted run's."""

import argparse
import re
import shutil
import signal
import subprocess

import pytest
import torch

from tests.launch import REPO, assert_checkpoints_equal, environment, losses, run_ranks, torchrun_command

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
    import psutil

    save = tmp_path / "run"
    first = losses(run_ranks(flags(**LSH, **{"--save": str(save), "--exit-interval": "5"})))
    assert sorted(first) == list(range(1, 6))
    output = run_ranks(flags(**LSH, **{"--save": str(save), "--load": str(save), "--exit-duration-in-mins": "0.001"}))
    assert "resuming at iteration 5" in output
    assert "stopping at iteration 6: --exit-duration-in-mins 0.001 reached" in output
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert all(loss == uninterrupted[0][i] for i, loss in {**first, **losses(output)}.items())

    process = subprocess.Popen(
        torchrun_command(flags(**LSH, **{"--save": str(save), "--load": str(save), "--exit-signal-handler": True})),
        cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if re.search(r"iteration\s+8/", line):
            # What SLURM does ahead of a time limit: SIGTERM to every process of the job.
            for worker in psutil.Process(process.pid).children(recursive=True):
                worker.send_signal(signal.SIGTERM)
            break
    output.append(process.stdout.read())
    output = "".join(output)
    assert process.wait(timeout=120) == 0, output[-3000:]
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
