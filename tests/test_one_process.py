"""The fast tier's end-to-end check: one process trains GPT-MoE and T5-MoE with LSH, resumes,
evaluates and converts, so that every layer of the package runs before a commit (the slow tier
runs the same on several ranks, with the parities and the exactness)."""

import json
from pathlib import Path

from tests.distributed import run_distributed
from tests.hf_workers import one_process_runs
from tests.launch import model_flags
from tests.test_pretrain_t5 import t5_flags

ONE_RANK = {"--expert-model-parallel-size": "1", "--global-batch-size": "4", "--log-interval": "1",
            "--eval-interval": "2", "--eval-iters": "1", "--timing-log-level": "1", "--lr-warmup-iters": "1"}


def test_one_process_trains_resumes_evaluates_and_converts(corpus, tmp_path):
    gpt = [*model_flags(corpus, **ONE_RANK, **{
        "--train-iters": "2", "--save": str(tmp_path / "gpt"), "--load": str(tmp_path / "gpt"),
        "--tensorboard-dir": str(tmp_path / "tb"), "--num-layers": "2", "--moe-layer-freq": "[1,0]"}),
        "--hf-architecture", "qwen3_moe", "--lsh-target-compression", "0.5"]
    t5 = t5_flags(corpus, **ONE_RANK, **{"--train-iters": "2", "--save": str(tmp_path / "t5"),
                                         "--load": str(tmp_path / "t5")})
    result = run_distributed(one_process_runs, 1, gpt, t5, str(tmp_path), str(corpus["jsonl"]["valid"]))[0]
    histories = result["histories"]
    for model in ("gpt", "t5"):
        first, resumed = histories[f"{model} first"], histories[f"{model} resumed"]
        trained = [row for row in first if "lm loss" in row]
        assert [row["iteration"] for row in trained] == [1, 2]
        assert all(0 < row["lsh compression rate"] <= 1 for row in trained)
        assert all(row["a2a share of step time"] >= 0 for row in trained)
        assert any("validation lm loss PPL" in row for row in first)
        # Resumed at the last iteration: nothing left to train, the final evaluation again.
        assert [row for row in resumed if "lm loss" in row] == []
        assert resumed[-1]["validation lm loss"] == first[-1]["validation lm loss"]
    evaluated = result["evaluated"]
    assert evaluated["tokens"] > 0 and 0 < evaluated["compression_rate"] <= 1
    config = json.loads((Path(tmp_path) / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["mlp_only_layers"] == [1]
    assert any(Path(tmp_path, "tb").iterdir())
