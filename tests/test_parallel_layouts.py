"""Tensor, sequence, pipeline and expert parallelism together, on 4 CPU ranks."""

import re
import shutil
import subprocess
import sys

import pytest

from tests.launch import REPO, environment, kill_at_checkpoint_and_resume, losses, model_flags, run_ranks

VALIDATION_LINE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+) \|")

TP2_EP2 = {"--tensor-model-parallel-size": "2", "--sequence-parallel": True,
           "--expert-model-parallel-size": "2", "--expert-tensor-parallel-size": "1"}
PP2_EP2 = {"--pipeline-model-parallel-size": "2", "--expert-model-parallel-size": "2"}
# The controller alone (training's default is the bound): its rates are the ones to check.
CONTROLLER = {"--lsh-target-compression": "0.3", "--lsh-error-bound": "off", "--lsh-num-hashes": "6"}


def validation_losses(output):
    return {int(it): float(loss) for it, loss in VALIDATION_LINE.findall(output)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        TP2_EP2,
        # Experts split over the tensor-parallel pair too (the dispatcher gathers centroids).
        {**TP2_EP2, "--expert-tensor-parallel-size": "2", "--disable-bias-linear": True},
        # (The interleaved pipeline trains in the kill-and-resume test below.)
    ],
    ids=["tp2-sp-ep2", "tp2-sp-ep2-etp2"],
)
def test_four_ranks_train_with_lsh_and_falling_loss(corpus, layout):
    output = run_ranks(model_flags(corpus, **{
        "--train-iters": "16", "--log-interval": "4", "--eval-interval": "100", **CONTROLLER, **layout}), nproc=4)
    loss = losses(output)
    assert sorted(loss) == [4, 8, 12, 16]
    assert loss[16] < loss[4] - 0.3, loss
    rates = [float(r) for r in re.findall(r"lsh compression rate: ([0-9.]+) \| a2a bytes", output)]
    # The controller (target 0.3) starts coarse-to-fine at threshold 1.0 and pulls the rate down:
    # neither every row its own cluster (1.0) nor one cluster per expert and first bucket.
    assert len(rates) == 4 and all(0.1 < r < 0.6 for r in rates) and rates[-1] < rates[0], rates
    bytes_ratios = [float(r) for r in re.findall(r"a2a bytes: ([0-9.]+)x stock", output)]
    assert all(r < 1.0 for r in bytes_ratios), bytes_ratios


@pytest.mark.slow
def test_pipeline_parallel_kill_and_resume_gives_the_same_losses(corpus, tmp_path):
    # Interleaved: two chunks of one layer per rank. The controller with an error bound: its merge
    # thresholds travel in the checkpoint (each stage saves its own layers'), so the resumed run
    # merges exactly as the uninterrupted one would have. A half-written save of a later
    # iteration is ignored.
    flags = lambda save: model_flags(corpus, **{  # noqa: E731
        "--train-iters": "12", "--log-interval": "1", "--eval-interval": "100",
        "--save": str(save), "--load": str(save), "--save-interval": "4", **PP2_EP2,
        "--num-layers": "4", "--num-layers-per-virtual-pipeline-stage": "1",
        "--lsh-error-bound": "2.0", "--lsh-target-compression": "0.3"})
    uninterrupted, resumed = kill_at_checkpoint_and_resume(flags, tmp_path, killed_after=8, nproc=4,
                                                           crash_mid_save=True)
    assert uninterrupted[12] < uninterrupted[1] - 0.3, uninterrupted
    assert sorted(resumed) == [9, 10, 11, 12]
    assert all(resumed[i] == uninterrupted[i] for i in resumed), (resumed, uninterrupted)


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_ep2_resumes_at_tp1_ep4_with_a_sharded_optimizer_and_the_same_losses(corpus, tmp_path):
    # Stock dispatch and no dropout: nothing but the layout differs between the runs, so the
    # steps after the checkpoint (optimizer state resharded too) and the validation loss at the
    # end agree up to the order of floating-point sums. 8-bit payloads in all four directions:
    # every row is quantised whatever the expert-parallel size, so they agree with them too.
    save = tmp_path / "ckpt"
    mxfp8 = {f"--moe-{name}-dtype": "mxfp8" for name in ("dispatch-fwd", "dispatch-bwd", "combine-fwd", "combine-bwd")}
    common = {"--no-lsh": True, "--hidden-dropout": "0", "--attention-dropout": "0", "--log-interval": "1",
              "--eval-interval": "6", "--save": str(save), **mxfp8}
    first = run_ranks(model_flags(corpus, **{**common, **TP2_EP2, "--train-iters": "10", "--save-interval": "6"}),
                      nproc=4)
    at6 = tmp_path / "at6"  # the run's iteration-6 checkpoint as the newest of a directory
    shutil.copytree(save / "iter_0000006", at6 / "iter_0000006")
    (at6 / "latest_checkpointed_iteration.txt").write_text("6\n")
    # The resumed run shards its optimizer state: the replicated checkpoint loads into it.
    resumed = run_ranks(model_flags(corpus, **{
        **common, "--train-iters": "10", "--load": str(at6), "--save": str(at6),
        "--expert-model-parallel-size": "4", "--use-distributed-optimizer": True}), nproc=4)
    assert "resuming at iteration 6" in resumed
    assert validation_losses(resumed)[10] == pytest.approx(validation_losses(first)[10], rel=1e-4)
    before, after = losses(first), losses(resumed)
    assert sorted(after) == [7, 8, 9, 10]
    for iteration in after:
        assert after[iteration] == pytest.approx(before[iteration], rel=1e-4)

    # Both final checkpoints, one saved tensor-parallel and one not, load into one process alike.
    assert evaluated_loss(save, corpus) == pytest.approx(evaluated_loss(at6, corpus), rel=1e-4)


def evaluated_loss(checkpoint_dir, corpus) -> float:
    result = subprocess.run(
        [sys.executable, "-m", "megatron_lsh.tools.evaluate", "--load", str(checkpoint_dir),
         "--input", str(corpus["jsonl"]["valid"])],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return float(re.search(r"loss ([0-9.]+), perplexity", result.stdout)[1])


@pytest.mark.slow
def test_t5_trained_at_tp2_ep2_evaluates_alike_at_tp1_ep4(corpus, tmp_path):
    from tests.test_pretrain_t5 import t5_flags

    save = tmp_path / "ckpt"
    common = {"--no-lsh": True, "--hidden-dropout": "0", "--attention-dropout": "0", "--train-iters": "4",
              "--log-interval": "2", "--eval-interval": "4", "--save": str(save), "--load": str(save)}
    tensor_parallel = run_ranks(t5_flags(corpus, **common, **TP2_EP2), nproc=4, script="pretrain_t5_moe.py")
    # Resumed at its last iteration, the run only evaluates: now with whole attention layers.
    expert_parallel = run_ranks(t5_flags(corpus, **common, **{"--expert-model-parallel-size": "4"}), nproc=4,
                                script="pretrain_t5_moe.py")
    assert "resuming at iteration 4" in expert_parallel
    assert validation_losses(expert_parallel)[4] == pytest.approx(validation_losses(tensor_parallel)[4], rel=1e-5)


def test_t5_refuses_pipeline_parallelism_naming_the_flag(corpus, capfd, monkeypatch):
    from tests.launch import pretrain_error
    from tests.test_pretrain_t5 import t5_flags

    error = pretrain_error(
        t5_flags(corpus, **{"--train-iters": "2", "--pipeline-model-parallel-size": "2",
                            "--expert-model-parallel-size": "1"}),
        capfd, monkeypatch, world_size=2, model="t5")
    assert error.startswith("error: --pipeline-model-parallel-size: T5-MoE trains without pipeline parallelism")


@pytest.mark.slow
def test_distributed_optimizer_and_overlapped_reduction_train_like_the_replicated_optimizer(corpus, tmp_path):
    # 4 ranks, expert parallel 2: dense state shared out over 4 replicas, expert state over 2;
    # bf16, so the fp32 master weights are sharded too.
    flags = {"--train-iters": "8", "--log-interval": "1", "--eval-interval": "100",
             "--expert-model-parallel-size": "2", "--micro-batch-size": "2", "--bf16": True}
    replicated = losses(run_ranks(model_flags(corpus, **flags), nproc=4))
    save = tmp_path / "ckpt"
    sharded = losses(run_ranks(model_flags(corpus, **{
        **flags, "--use-distributed-optimizer": True, "--overlap-grad-reduce": True,
        "--save": str(save), "--save-interval": "4"}), nproc=4))
    assert sorted(sharded) == list(range(1, 9))
    for iteration, loss in replicated.items():
        assert sharded[iteration] == pytest.approx(loss, rel=1e-6), (iteration, sharded, replicated)
    # Killed at 4 and resumed, sharded state and all: the same steps again.
    shutil.rmtree(save / "iter_0000008")
    (save / "latest_checkpointed_iteration.txt").write_text("4\n")
    resumed = losses(run_ranks(model_flags(corpus, **{
        **flags, "--use-distributed-optimizer": True, "--overlap-grad-reduce": True,
        "--save": str(save), "--load": str(save), "--save-interval": "4"}), nproc=4))
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[i] == sharded[i] for i in resumed), (resumed, sharded)


@pytest.mark.slow
def test_distributed_optimizer_holds_a_share_of_the_state_on_each_rank():
    from benchmarks.optimizer_memory import run

    results = run(4, dict(ep=2, hidden=64, layers=2, experts=4, bf16=True, repeats=1))
    replicated = [r["replicated"]["bytes"] for r in results]
    distributed = [r["distributed"]["bytes"] for r in results]
    assert len(set(replicated)) == 1  # every rank holds all of its model's state
    # Dense state over 4 replicas, expert state over 2: each rank keeps well under two thirds.
    assert all(d < 0.65 * r for d, r in zip(distributed, replicated)), (distributed, replicated)
