"""Checkpoints travel both ways between Megatron-LM and us. A checkpoint in Megatron-LM's layout
(written by tests/megatron_lm_checkpoint.py with megatron-core alone, as Megatron-LM's
checkpointing.py does) resumes here with --no-load-optim at its iteration and consumed samples with
its weights, or fine-tunes from them; what it cannot give (its optimizer state, a model of other
shapes) is refused in one line before any step; and the checkpoints a run then writes beside it
are read by Megatron-LM's way of loading (arguments, iteration, samples, strict model keys, RNG)."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_lsh.training.initialize import free_port
from megatron_lsh.training.resume import plan_resume
from tests.launch import REPO, checkpoint_tensors, environment, pretrain_error, run_ranks
from tests.megatron_lm_checkpoint import FLAGS


def megatron_lm(action, *arguments):
    """tests/megatron_lm_checkpoint.py in its own one-process group."""
    result = subprocess.run([sys.executable, "-m", "tests.megatron_lm_checkpoint", action, *map(str, arguments)],
                            cwd=REPO, env=environment(MASTER_PORT=str(free_port())), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def written_by_megatron_lm(tmp_path_factory):
    """Megatron-LM's checkpoint of iteration 7 after 28 samples."""
    directory = tmp_path_factory.mktemp("megatron-lm") / "run"
    megatron_lm("write", directory, 7, 28)
    return directory


@pytest.fixture
def megatron_lm_run(written_by_megatron_lm, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(written_by_megatron_lm, copy)
    return copy


def model_tensors(save_dir, iteration, scratch):
    return {name: tensor for name, tensor in checkpoint_tensors(save_dir, iteration, scratch).items()
            if not name.startswith("optimizer")}


@pytest.mark.slow
def test_a_megatron_lm_checkpoint_resumes_and_what_we_write_beside_it_megatron_lm_loads(megatron_lm_run, tmp_path):
    run = megatron_lm_run
    theirs = {path.name: path.read_bytes() for path in (run / "iter_0000007").iterdir()}
    # As Megatron-LM's Mixtral script resumes: --save equal to --load, --no-load-optim. At lr 0 a
    # step leaves the weights as they were loaded.
    output = run_ranks([*FLAGS, "--load", run, "--save", run, "--no-load-optim", "--train-iters", "8",
                        "--lr", "0", "--min-lr", "0", "--weight-decay", "0"], nproc=1)
    assert "Megatron-LM's checkpoint iter_0000007; loading all but its optimizer state" in output
    assert "resuming at iteration 7" in output
    assert re.search(r"iteration\s+8/\s*8 \| consumed samples:\s+32 \|", output), output[-2000:]
    loaded, saved = model_tensors(run, 7, tmp_path), model_tensors(run, 8, tmp_path)
    assert sorted(saved) == sorted(loaded) and len(saved) > 5
    for name, tensor in loaded.items():
        assert torch.equal(saved[name], tensor), name
    # Megatron-LM's checkpoint is untouched; the tracker names ours now.
    assert {path.name: path.read_bytes() for path in (run / "iter_0000007").iterdir()} == theirs
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "8"

    megatron_lm("read", run, tmp_path / "read.json")
    read = json.loads((tmp_path / "read.json").read_text())
    assert (read["args_type"], read["checkpoint_version"], read["iteration"]) == ("Namespace", 3.0, 8)
    assert read["consumed_train_samples"] == 32 and read["flops"] > 0
    assert read["missing"] == [] and read["unexpected"] == []  # megatron-core's own model, strictly
    assert read["rng_keys"] == ["cuda_rng_state", "np_rng_state", "random_rng_state", "rng_tracker_states",
                                "torch_rng_state"]
    sums = {name: tensor.float().sum().item() for name, tensor in saved.items()}
    embedding = "embedding.word_embeddings.weight"
    assert sums[embedding] == pytest.approx(read["weights"][embedding])


@pytest.mark.slow
def test_finetuning_from_a_megatron_lm_checkpoint_starts_at_iteration_zero_with_its_weights(megatron_lm_run, tmp_path):
    output = run_ranks([*FLAGS, "--load", megatron_lm_run, "--finetune", "--save", tmp_path / "tuned",
                        "--train-iters", "1", "--lr", "0", "--min-lr", "0", "--weight-decay", "0"], nproc=1)
    assert "fine-tuning from iteration 0" in output
    assert re.search(r"iteration\s+1/\s*1 \| consumed samples:\s+4 \|", output), output[-2000:]
    loaded, tuned = model_tensors(megatron_lm_run, 7, tmp_path), model_tensors(tmp_path / "tuned", 1, tmp_path)
    assert all(torch.equal(tuned[name], tensor) for name, tensor in loaded.items())


def test_its_optimizer_state_is_not_resumed_silently(megatron_lm_run, capfd, monkeypatch):
    error = pretrain_error([*FLAGS, "--load", str(megatron_lm_run), "--save", str(megatron_lm_run),
                            "--train-iters", "8"], capfd, monkeypatch)
    assert "iter_0000007 is Megatron-LM's checkpoint, whose optimizer state is in Megatron-LM's own layout" in error
    assert "pass --no-load-optim" in error and "or --finetune" in error


def test_a_model_of_other_shapes_is_named_by_tensor_and_both_shapes(megatron_lm_run, capfd, monkeypatch):
    flags = [*FLAGS, "--load", str(megatron_lm_run), "--save", str(megatron_lm_run), "--train-iters", "8",
             "--no-load-optim"]
    flags[flags.index("--num-experts") + 1] = "8"
    error = pretrain_error(flags, capfd, monkeypatch, prefix="error (rank 0): ")
    assert re.search(r"tensor decoder\.layers\.mlp\.router\.weight is \[2, 4, 64\] in the checkpoint but "
                     r"\[2, 8, 64\] in this model", error), error


def test_a_separate_save_never_takes_over_a_megatron_lm_directory(megatron_lm_run, tmp_path):
    from megatron_lsh.training.arguments import ArgumentError

    job = dict(finetune=False, ckpt_step=None, no_load_optim=True)
    with pytest.raises(ArgumentError, match=r"--save \S+ holds Megatron-LM's checkpoint iter_0000007: pass --load"):
        plan_resume(argparse_namespace(save=str(megatron_lm_run), load=str(tmp_path / "elsewhere"), **job))
    # A release checkpoint (tracker 'release') gives weights only: a fine-tuning start.
    (megatron_lm_run / "iter_0000007").rename(megatron_lm_run / "release")
    (megatron_lm_run / "latest_checkpointed_iteration.txt").write_text("release")
    plan = plan_resume(argparse_namespace(save=str(tmp_path / "new"), load=str(megatron_lm_run), **job))
    assert plan.finetune and "its weights, from iteration 0" in plan.note


def test_legacy_megatron_lm_checkpoints_are_refused_with_the_conversion_to_make(tmp_path):
    from megatron_lsh.training.arguments import ArgumentError

    (tmp_path / "old" / "iter_0000100" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "old" / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    (tmp_path / "old" / "latest_checkpointed_iteration.txt").write_text("100")
    with pytest.raises(ArgumentError, match="legacy torch format .* re-save it from Megatron-LM with --ckpt-format "
                                            "torch_dist"):
        plan_resume(argparse_namespace(save=None, load=str(tmp_path / "old"), finetune=True, ckpt_step=None))


def argparse_namespace(**values):
    import argparse

    return argparse.Namespace(**values)


@pytest.mark.slow
def test_a_megatron_lm_checkpoint_converts_to_hugging_face_with_its_logits(written_by_megatron_lm, tmp_path):
    pytest.importorskip("transformers")
    from tests.distributed import run_distributed
    from tests.hf_workers import logits_on_random_ids
    from tests.launch import convert

    result = convert(written_by_megatron_lm, tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixtral" in result.stdout
    (compared,) = run_distributed(logits_on_random_ids, 1, str(written_by_megatron_lm), str(tmp_path / "hf"))
    assert compared["architecture"] == "MixtralForCausalLM"
    assert compared["missing_keys"] == [] and compared["unexpected_keys"] == []
    assert compared["logit_scale"] > 0.01 and compared["max_logit_difference"] < 1e-4, compared
