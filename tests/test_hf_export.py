"""Export to Hugging Face: tiny models trained on 2 ranks (expert parallel 2), converted, and
loaded by transformers with no custom code."""

import re
import subprocess
import sys

import pytest

from tests.distributed import run_distributed
from tests.hf_workers import compare_with_transformers
from tests.launch import REPO, environment, model_flags, torchrun
from tests.test_pretrain_t5 import t5_flags

pytest.importorskip("transformers")


def convert(load, output):
    return subprocess.run(
        [sys.executable, "-m", "megatron_lsh.checkpoint.convert", "--load", str(load), "--output", str(output)],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def mixtral(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("mixtral")
    torchrun([*model_flags(corpus, **{"--train-iters": "4", "--eval-iters": "0", "--log-interval": "2",
                                      "--num-attention-heads": "4", "--save": str(work / "ckpt")}),
              "--hf-architecture", "mixtral", "--group-query-attention", "--num-query-groups", "2"])
    result = convert(work / "ckpt", work / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_distributed(compare_with_transformers, 1, str(work / "ckpt"), str(work / "hf"),
                           str(corpus["jsonl"]["valid"]))[0]


@pytest.fixture(scope="module")
def switch(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("switch")
    torchrun([*t5_flags(corpus, **{"--train-iters": "4", "--eval-iters": "0", "--log-interval": "2",
                                   "--moe-router-topk": None, "--moe-layer-freq": "2",
                                   "--save": str(work / "ckpt")}),
              "--hf-architecture", "switch_transformers"], script="pretrain_t5_moe.py")
    result = convert(work / "ckpt", work / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_distributed(compare_with_transformers, 1, str(work / "ckpt"), str(work / "hf"),
                           str(corpus["jsonl"]["valid"]))[0]


@pytest.mark.parametrize("export, architecture", [("mixtral", "MixtralForCausalLM"),
                                                  ("switch", "SwitchTransformersForConditionalGeneration")])
def test_exported_model_gives_the_megatron_logits(export, architecture, request):
    result = request.getfixturevalue(export)
    assert result["architecture"] == architecture
    assert result["missing_keys"] == [] and result["unexpected_keys"] == []
    assert result["logit_scale"] > 0.01  # a real comparison, not of zeros
    assert result["max_logit_difference"] < 1e-4, result


@pytest.mark.parametrize("export", ["mixtral", "switch"])
def test_exported_tokenizer_round_trips_text_with_the_training_ids(export, request):
    result = request.getfixturevalue(export)
    assert result["round_trips"]
    assert result["same_ids"] == 1.0
    assert result["special"][:2] == (1, 0)  # </s>, <pad>


def test_checkpoint_without_a_hugging_face_equivalent_names_the_flags(corpus, tmp_path):
    torchrun(model_flags(corpus, **{"--train-iters": "4", "--eval-iters": "0", "--log-interval": "2",
                                    "--save": str(tmp_path / "ckpt")}))
    result = convert(tmp_path / "ckpt", tmp_path / "hf")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: this checkpoint has no mixtral equivalent")
    for flag in ("--normalization RMSNorm", "--swiglu", "--disable-bias-linear",
                 "--untie-embeddings-and-output-weights", "--hf-architecture mixtral"):
        assert flag in error
    assert not (tmp_path / "hf").exists()


def test_evaluation_reports_perplexity_of_held_out_text(corpus, tmp_path):
    torchrun(model_flags(corpus, **{"--train-iters": "6", "--eval-iters": "0", "--log-interval": "3",
                                    "--save": str(tmp_path / "ckpt")}))
    outputs = {}
    for mode in ([], ["--lsh"]):
        result = subprocess.run(
            [sys.executable, "-m", "megatron_lsh.checkpoint.evaluate", "--load", str(tmp_path / "ckpt"),
             "--input", str(corpus["jsonl"]["valid"]), *mode],
            cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        match = re.search(r"loss ([0-9.]+), perplexity ([0-9.]+) over ([0-9,]+) tokens", result.stdout)
        assert match, result.stdout
        loss, perplexity, tokens = float(match[1]), float(match[2]), int(match[3].replace(",", ""))
        assert abs(perplexity - 2.718281828 ** loss) / perplexity < 1e-3
        assert 1 < perplexity < 300 and tokens > 1000
        outputs[bool(mode)] = loss
    assert outputs[True] != outputs[False]  # LSH on is the approximation, off the exact MoE
