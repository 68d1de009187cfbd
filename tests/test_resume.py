"""Resuming is exact: the losses after a stop and a resume equal an uninterrupted run's."""

import argparse

import pytest
import torch

from tests.launch import losses, torchrun

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


@pytest.mark.parametrize("lsh", [{"--no-lsh": True}, {"--lsh": True, "--lsh-num-hashes": "4"}],
                         ids=["stock", "lsh"])
def test_exit_interval_then_resume_gives_the_same_losses(tmp_path, lsh):
    straight = losses(torchrun(flags(**lsh, **{"--save": str(tmp_path / "straight")})))
    save = str(tmp_path / "stopped")
    first = losses(torchrun(flags(**lsh, **{"--save": save, "--exit-interval": "10"})))
    assert sorted(first) == list(range(1, 11))
    resumed = torchrun(flags(**lsh, **{"--save": save, "--load": save}))
    assert "resuming at iteration 10" in resumed
    resumed = losses(resumed)
    assert sorted(resumed) == [11, 12, 13, 14]
    assert all(resumed[i] == straight[i] for i in resumed), (resumed, straight)
