"""pretrain_gpt_moe.py end to end on 2 CPU ranks: the script's body under torchrun's environment
(tests/launch.py: run_ranks), and torchrun itself where it adds something."""

import glob
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import (
    REPO,
    convert,
    environment,
    losses,
    model_flags,
    pretrain_error,
    run_pretrain_expecting_error,
    run_ranks,
    torchrun_command,
)


@pytest.fixture(scope="module")
def logged_run(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    output = run_ranks(model_flags(
        corpus, **{"--train-iters": "30", "--log-interval": "5", "--eval-interval": "10",
                   "--tensorboard-dir": str(work / "tb"), "--wandb-project": "test",
                   "--wandb-save-dir": str(work / "wandb"), "--save": str(work / "ckpt"),
                   "--timing-log-level": "1", "--moe-dispatch-bwd-dtype": "bf16",
                   "--moe-combine-bwd-dtype": "bf16", "--log-throughput": True,
                   "--log-timers-to-tensorboard": True, "--log-validation-ppl-to-tensorboard": True}))
    return output, work


@pytest.mark.slow
def test_two_ranks_train_thirty_steps_with_falling_loss(logged_run):
    output, _ = logged_run
    logged = losses(output)
    assert sorted(logged) == [5, 10, 15, 20, 25, 30]
    assert logged[30] < logged[5] - 0.5, logged
    perplexities = [float(p) for p in
                    re.findall(r"validation loss at iteration \d+ \|.* lm loss PPL: ([0-9.E+-]+)", output)]
    assert len(perplexities) == 4 and perplexities[-1] < perplexities[0]
    assert "lsh compression rate" in output and "a2a share" in output
    # Centroids in 8 bits forward, bf16 backward: about 2 x 66 + 2 x 128 bytes a centroid against
    # 4 x 128 + 2 x 2 a stock row (the rate counts every row, the bytes those sent to the other rank).
    logged = re.findall(r"lsh compression rate: ([0-9.]+) \| a2a bytes: ([0-9.]+)x stock", output)
    assert len(logged) == 6
    for rate, ratio in logged:
        assert 0.6 * float(rate) < float(ratio) < 0.9 * float(rate), logged


TRACKED = ["lm loss", "learning rate", "grad norm", "tokens per second", "validation lm loss PPL",
           "lsh compression rate", "a2a bytes ratio", "lsh compression rate/layer_1", "a2a bytes sent/layer_2",
           "a2a share of step time", "load_balancing_loss"]


def tensorboard_events(directory):
    """The run's tensorboard events, read, and the names of its scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return events, set(events.Tags()["scalars"])


@pytest.mark.slow
def test_tensorboard_holds_every_metric_against_iteration_tokens_and_time(logged_run):
    _, work = logged_run
    events, tags = tensorboard_events(work / "tb")
    for name in TRACKED:
        for tag in (name, f"{name} vs tokens", f"{name} vs time"):
            assert tag in tags, tag
    steps = [e.step for e in events.Scalars("lm loss")]
    tokens = [e.step for e in events.Scalars("lm loss vs tokens")]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert tokens == [s * 16 * 64 for s in steps]


# Megatron-LM's names (megatron/training/training.py), for dashboards built on its runs.
MEGATRON_LM_TRACKED = ["lm loss", "learning-rate", "grad-norm", "batch-size", "loss-scale", "lm loss validation",
                       "lm loss validation ppl", "iteration-time", "throughput"]


@pytest.mark.slow
def test_tensorboard_and_wandb_also_hold_megatron_lms_names_against_iteration_and_samples(logged_run):
    output, work = logged_run
    events, tags = tensorboard_events(work / "tb")
    for name in MEGATRON_LM_TRACKED:
        assert name in tags and f"{name} vs samples" in tags, name
    assert [e.step for e in events.Scalars("learning-rate vs samples")] == [s * 16 for s in (5, 10, 15, 20, 25, 30)]
    assert [e.step for e in events.Scalars("lm loss validation")] == [0, 10, 20, 30]
    # Seconds there, milliseconds in ours.
    seconds = [e.value for e in events.Scalars("iteration-time")]
    milliseconds = [e.value for e in events.Scalars("iteration time ms")]
    assert seconds == pytest.approx([m / 1000 for m in milliseconds])
    # TFLOP/s per GPU by Megatron-LM's count, on the console as Megatron-LM prints it.
    printed = [float(t) for t in re.findall(r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+) \|", output)]
    assert len(printed) == 6 and all(t > 0 for t in printed)
    rows = read_offline_wandb_history(glob.glob(str(work / "wandb" / "wandb" / "offline-run-*"))[0])
    assert set(MEGATRON_LM_TRACKED) <= set().union(*rows)


def read_offline_wandb_history(run_dir):
    """History rows of an offline run file: a 7-byte header, then LevelDB-log records (32 KiB
    blocks; 7-byte record headers: crc, length, type full/first/middle/last) of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = Path(glob.glob(os.path.join(run_dir, "*.wandb"))[0]).read_bytes()
    payloads, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
    rows = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


@pytest.mark.slow
def test_offline_wandb_run_holds_the_metrics(logged_run):
    _, work = logged_run
    runs = glob.glob(str(work / "wandb" / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    rows = read_offline_wandb_history(runs[0])
    keys = set().union(*rows)
    for name in TRACKED:
        for key in (name, f"by_tokens/{name}", f"by_time/{name}"):
            assert key in keys, key
    assert {"iteration", "consumed_tokens", "wall_clock_seconds"} <= keys


@pytest.mark.slow
def test_checkpoint_tracker_names_the_final_complete_checkpoint(logged_run):
    _, work = logged_run
    assert (work / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (work / "ckpt" / "iter_0000030" / "complete").is_file()


@pytest.mark.slow
def test_checkpoint_without_a_hugging_face_equivalent_names_the_flags(logged_run, tmp_path):
    # LayerNorm, GELU, biases, a tied head: the run above has no Hugging Face architecture.
    _, work = logged_run
    result = convert(work / "ckpt", tmp_path / "hf")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: this checkpoint has no equivalent in Hugging Face")
    mixtral, qwen3_moe = error.split("; or ")
    for flag in ("--normalization RMSNorm", "--swiglu", "--disable-bias-linear",
                 "--untie-embeddings-and-output-weights", "--hf-architecture mixtral"):
        assert flag in mixtral
    for flag in ("--normalization RMSNorm", "--swiglu", "--qk-layernorm", "--hf-architecture qwen3_moe"):
        assert flag in qwen3_moe
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_missing_data_files_name_the_flag_and_file(corpus):
    error = run_pretrain_expecting_error(model_flags(
        corpus, **{"--train-iters": "2", "--expert-model-parallel-size": "1",
                   "--valid-data-path": "/nonexistent/valid_text_document"}))
    assert "--valid-data-path" in error and "/nonexistent/valid_text_document.bin" in error


def test_truncated_bin_file_is_refused(corpus, tmp_path, capfd, monkeypatch):
    for suffix in (".bin", ".idx", ".json"):
        data = open(corpus["train"] + suffix, "rb").read()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2] if suffix == ".bin" else data)
    error = pretrain_error(model_flags(
        corpus, **{"--train-iters": "2", "--expert-model-parallel-size": "1",
                   "--train-data-path": str(tmp_path / "cut")}), capfd, monkeypatch)
    assert "--train-data-path" in error and "truncated" in error


def test_tokenizer_that_does_not_match_the_data_is_refused(corpus, tmp_path, capfd, monkeypatch):
    from megatron_lsh.data.tokenizer import train_sentencepiece

    other = train_sentencepiece(
        (json.loads(line)["text"] for line in open(corpus["jsonl"]["train"])), str(tmp_path / "other"), vocab_size=310
    )
    error = pretrain_error(model_flags(
        corpus, **{"--train-iters": "2", "--expert-model-parallel-size": "1", "--tokenizer-model": other}),
        capfd, monkeypatch)
    assert "tokenized with" in error and "--tokenizer-model" in error


@pytest.mark.parametrize(
    "overrides, world_size, expected",
    [
        ({"--global-batch-size": "12"}, 2, "--global-batch-size 12 must be a multiple of --micro-batch-size 4 x "
                                           "data-parallel size 2"),
        ({"--num-experts": "6", "--expert-model-parallel-size": "4"}, 4, "--expert-model-parallel-size 4 must divide "
                                                                         "--num-experts 6"),
        ({"--expert-model-parallel-size": "2"}, 3, "--expert-model-parallel-size 2 must divide the number of processes "
                                                   "(3)"),
        ({"--lsh-num-hashes": "0"}, 2, "--lsh-num-hashes"),
        ({"--tensor-model-parallel-size": "2"}, 2, "--tensor-model-parallel-size 2 with MoE layers needs "
                                                   "--sequence-parallel"),
        ({"--tensor-model-parallel-size": "2", "--sequence-parallel": True, "--pipeline-model-parallel-size": "2"}, 2,
         "--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2 must divide the number of processes (2)"),
        ({"--tensor-model-parallel-size": "2", "--sequence-parallel": True, "--expert-model-parallel-size": "2"}, 2,
         "--expert-model-parallel-size 2 x --expert-tensor-parallel-size 2 must divide the number of processes (2)"),
        ({"--tensor-model-parallel-size": "3", "--sequence-parallel": True, "--expert-model-parallel-size": "1"}, 3,
         "--num-attention-heads 4 must be divisible by --tensor-model-parallel-size 3"),
        ({"--pipeline-model-parallel-size": "2", "--num-layers": "3", "--expert-model-parallel-size": "1"}, 2,
         "--num-layers 3 must be divisible by --pipeline-model-parallel-size 2"),
        ({"--pipeline-model-parallel-size": "2", "--num-layers-per-virtual-pipeline-stage": "2",
          "--expert-model-parallel-size": "1"}, 2,
         "--num-layers-per-virtual-pipeline-stage 2 must divide the 1 layers of each of the 2 pipeline stages"),
        ({"--pipeline-model-parallel-size": "2", "--num-layers": "4", "--num-layers-per-virtual-pipeline-stage": "1",
          "--expert-model-parallel-size": "1", "--global-batch-size": "4"}, 2,
         "needs at least --pipeline-model-parallel-size 2 micro-batches per step; raise --global-batch-size 4 to 8"),
        ({"--hf-architecture": "mixtral", "--moe-layer-freq": "2"}, 2,
         "--hf-architecture mixtral needs --moe-layer-freq 1 (experts in every layer)"),
        ({"--hf-architecture": "switch_transformers"}, 2, "--hf-architecture switch_transformers is a T5 architecture"),
    ],
    ids=["global-batch", "experts", "world-size", "lsh-hashes", "tp-without-sp", "tp-pp-world",
         "etp-world", "tp-heads", "pp-layers", "virtual-stages", "virtual-stage-batch", "hf-mixtral-layout",
         "hf-t5-architecture"],
)
def test_bad_parallel_and_batch_settings_give_one_clear_error(corpus, overrides, world_size, expected, capfd,
                                                              monkeypatch):
    error = pretrain_error(model_flags(corpus, **{"--train-iters": "2", **overrides}), capfd, monkeypatch,
                           world_size)
    assert expected in error


@pytest.mark.slow
def test_the_controller_brings_the_rate_to_the_target_and_logs_each_layers_threshold(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = run_ranks(model_flags(corpus, **{
        "--train-iters": "40", "--log-interval": "10", "--eval-interval": "100", "--eval-iters": "0",
        "--lsh-target-compression": "0.3", "--lsh-error-bound": "off", "--tensorboard-dir": str(tmp_path / "tb")}))
    rates = [float(r) for r in re.findall(r"lsh compression rate: ([0-9.]+)", output)]
    assert len(rates) == 4 and abs(rates[-1] - 0.3) < 0.06, rates
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    thresholds = {tag for tag in events.Tags()["scalars"]
                  if tag.startswith("lsh merge threshold/") and " vs " not in tag}
    assert thresholds == {"lsh merge threshold/layer_1", "lsh merge threshold/layer_2"}


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--lsh-target-compression", "1.5", "--lsh-target-compression 1.5 must be in (0, 1] (centroids per token "
                                            "row, e.g. 0.2), or 'off' for fixed hashing"),
        ("--lsh-target-compression", "0", "--lsh-target-compression 0.0 must be in (0, 1]"),
        ("--lsh-error-bound", "-0.5", "--lsh-error-bound -0.5 must be a positive number"),
        ("--lsh-error-bound", "0", "--lsh-error-bound 0.0 must be a positive number"),
    ],
)
def test_target_and_bound_out_of_range_stop_the_run_naming_the_flag(corpus, flag, value, expected, capfd,
                                                                    monkeypatch):
    error = pretrain_error(model_flags(
        corpus, **{"--train-iters": "2", "--expert-model-parallel-size": "1", flag: value}), capfd, monkeypatch)
    assert expected in error, error


@pytest.mark.slow
def test_speedup_projection_reads_the_model_and_each_layers_rate_from_a_run(logged_run):
    _, work = logged_run
    result = subprocess.run(
        [sys.executable, "-m", "megatron_lsh.projection", "--load", str(work / "ckpt"),
         "--compression-from", str(work / "tb"), "--nodes", "2", "--gpus-per-node", "2",
         "--intra-node-gbps", "3600", "--inter-node-gbps", "100", "--gpu-tflops", "100"],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"speedup with LSH at compression 0\.\d+ mean of 2 layers with bf16/mxfp8 payloads: \d+\.\d\dx",
                     result.stdout)
    assert "4 GPUs (2 nodes x 2), expert parallel 4" in result.stdout
    # The run's own formats: 8 bits forward (training's default), bf16 backward (its flags).
    assert ("payloads: --moe-dispatch-fwd-dtype mxfp8, --moe-dispatch-bwd-dtype bf16, --moe-combine-fwd-dtype mxfp8, "
            "--moe-combine-bwd-dtype bf16") in result.stdout


@pytest.mark.slow
def test_inter_node_scope_on_one_node_warns_and_trains_every_row_exact(corpus, tmp_path):
    result = subprocess.run(
        torchrun_command(model_flags(corpus, **{"--train-iters": "4", "--log-interval": "1", "--eval-iters": "0",
                                                "--lr-warmup-iters": "1", "--lsh-scope": "inter-node"})),
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every expert-parallel rank is on one node" in result.stderr
    # Nothing is in scope: no row merged into another.
    errors = re.findall(r"lsh relative error: ([0-9.]+)", result.stdout)
    assert len(errors) == 4 and all(float(e) == 0 for e in errors)
