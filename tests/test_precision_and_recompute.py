"""Megatron-LM's memory and precision flags: activation recomputation gives the same losses as
keeping the activations; fp16 scales the loss, skips the steps whose gradients overflow and
resumes with its scale; a batch ramp-up grows the batch as megatron-core's calculator says."""

import re

import pytest

from tests.launch import losses, run_ranks

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--num-experts", "4",
        "--expert-model-parallel-size", "2",
        "--vocab-size", "128", "--lr", "1e-3", "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0",
        "--train-iters", "4", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
    ["--recompute-activations"],
    ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
])
def test_recomputed_activations_give_the_losses_of_kept_ones(recompute):
    kept = losses(run_ranks(TINY))
    assert losses(run_ranks([*TINY, *recompute])) == kept  # dropout masks included: the RNG is replayed


@pytest.mark.slow
def test_fp16_skips_overflowing_steps_lowers_the_scale_and_resumes_with_it(tmp_path):
    flags = [*TINY, "--fp16", "--initial-loss-scale", "65536", "--hysteresis", "1", "--loss-scale-window", "2",
             "--save", str(tmp_path), "--save-interval", "2", "--lr-decay-iters", "6"]
    first = run_ranks(flags)
    scales = [float(s) for s in re.findall(r"loss scale: ([0-9.]+) \|", first)]
    assert len(scales) == 4 and all(scale >= 1 for scale in scales)
    assert all(later in (earlier / 2, earlier, earlier * 2) for earlier, later in zip(scales, scales[1:]))
    resumed = run_ranks([*flags[:flags.index("--train-iters")], "--train-iters", "6",
                         *flags[flags.index("--train-iters") + 2:]])
    assert "resuming at iteration 4" in resumed
    next_scale = float(re.findall(r"loss scale: ([0-9.]+) \|", resumed)[0])
    assert next_scale in (scales[-1] / 2, scales[-1], scales[-1] * 2)  # the saved scale, one update on


@pytest.mark.slow
def test_a_ramped_batch_grows_as_the_calculator_says_and_counts_its_samples():
    output = run_ranks([*TINY[:TINY.index("--train-iters")], "--train-samples", "56",
                        "--rampup-batch-size", "4", "4", "16", "--global-batch-size", "12"])
    batches = [int(b) for b in re.findall(r"global batch size:\s+(\d+) \|", output)]
    consumed = [int(c) for c in re.findall(r"consumed samples:\s+(\d+) \|", output)]
    # 16 ramp-up samples over two increments of 4: 4 from 0, 8 from 8, 12 from 16 samples on.
    assert batches == [4, 4, 8, 12, 12, 12]
    assert consumed == [4, 8, 16, 28, 40, 52]  # 56 samples: the last partial batch is dropped
