"""The torchrun launchers in scripts/: the parallel layout from environment knobs."""

import subprocess

import pytest

from tests.launch import REPO, environment, losses

# Every test here runs several processes or trains end to end.
pytestmark = pytest.mark.slow

TINY_MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
    "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--train-iters", "4", "--lr-warmup-iters", "1", "--log-interval", "2", "--eval-iters", "1",
    "--eval-interval", "100", "--num-workers", "0",
]


def launch(corpus, tmp_path, **knobs):
    env = environment(
        GPUS_PER_NODE="4", PRECISION="fp32", MASTER_PORT=str(free_port()), DATA_PATH=corpus["train"],
        VALID_DATA_PATH=corpus["valid"], TOKENIZER_MODEL=corpus["tokenizer"],
        CHECKPOINT_DIR=str(tmp_path / "ckpt"), **knobs,
    )
    return subprocess.run(["bash", "scripts/pretrain_gpt_moe_single_node.sh", *TINY_MODEL], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def free_port():
    from megatron_lsh.training.initialize import free_port as port

    return port()


def test_layout_knobs_reach_the_trainer(corpus, tmp_path):
    result = launch(corpus, tmp_path, TENSOR_PARALLEL="2", PIPELINE_PARALLEL="2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Sequence parallel comes with tensor parallel; experts default to what is left per stage.
    assert "data 1 x tensor 2 x pipeline 2, experts 2 x expert-tensor 1, sequence parallel" in result.stdout
    assert sorted(losses(result.stdout)) == [2, 4]


def test_a_layout_that_does_not_fit_the_processes_stops_before_launching(corpus, tmp_path):
    result = launch(corpus, tmp_path, TENSOR_PARALLEL="3")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: TENSOR_PARALLEL=3 x PIPELINE_PARALLEL=1 must divide the 4 processes "
                      "(GPUS_PER_NODE=4 x NNODES=1)"], result.stderr
    assert "torchrun" not in result.stderr and not (tmp_path / "ckpt").exists()
