"""Export to Hugging Face: tiny models trained on 2 ranks (expert parallel 2), converted, and
loaded by transformers with no custom code."""

import json
import math
import re
import subprocess
import sys

import pytest

from tests.distributed import run_distributed
from tests.hf_workers import (
    command_line,
    compare_with_transformers,
    continuation_log_likelihoods,
    convert_then_compare,
    evaluation_against_plain_forwards,
)
from tests.launch import REPO, convert, environment, model_flags, run_ranks
from tests.test_pretrain_t5 import t5_flags

# Every test here runs several processes or trains end to end.
pytestmark = pytest.mark.slow

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mixtral(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("mixtral")
    run_ranks([*model_flags(corpus, **{"--train-iters": "4", "--eval-iters": "0", "--log-interval": "2",
                                       "--num-attention-heads": "4", "--save": str(work / "ckpt")}),
               "--hf-architecture", "mixtral", "--group-query-attention", "--num-query-groups", "2"])
    # The convert command line in a forked process (qwen3_moe_export runs it as a subprocess).
    return run_distributed(convert_then_compare, 1, str(work / "ckpt"), str(work / "hf"),
                           str(corpus["jsonl"]["valid"]))[0]


@pytest.fixture(scope="module")
def qwen3_moe_export(corpus, tmp_path_factory):
    """Dense and MoE layers interleaved (MoE in layers 0 and 2 of 4, the paper's layout), top-1,
    grouped queries: Qwen3-MoE, whose dense layers keep their own width."""
    work = tmp_path_factory.mktemp("qwen3_moe")
    run_ranks([*model_flags(corpus, **{"--train-iters": "4", "--eval-iters": "0", "--log-interval": "2",
                                       "--num-layers": "4", "--moe-layer-freq": "2", "--moe-router-topk": "1",
                                       "--ffn-hidden-size": "96", "--moe-ffn-hidden-size": "64",
                                       "--save": str(work / "ckpt")}),
               "--hf-architecture", "qwen3_moe", "--group-query-attention", "--num-query-groups", "2"])
    result = convert(work / "ckpt", work / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "qwen3_moe" in result.stdout
    return work


@pytest.fixture(scope="module")
def qwen3_moe(corpus, qwen3_moe_export):
    return run_distributed(compare_with_transformers, 1, str(qwen3_moe_export / "ckpt"),
                           str(qwen3_moe_export / "hf"), str(corpus["jsonl"]["valid"]))[0]


@pytest.fixture(scope="module")
def switch(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("switch")
    run_ranks([*t5_flags(corpus, **{"--train-iters": "4", "--eval-iters": "0", "--log-interval": "2",
                                    "--moe-router-topk": None, "--moe-layer-freq": "2",
                                    "--save": str(work / "ckpt")}),
               "--hf-architecture", "switch_transformers"], script="pretrain_t5_moe.py")
    # The convert command line in a forked process (qwen3_moe_export runs it as a subprocess).
    return run_distributed(convert_then_compare, 1, str(work / "ckpt"), str(work / "hf"),
                           str(corpus["jsonl"]["valid"]))[0]


@pytest.mark.parametrize("export, architecture", [("mixtral", "MixtralForCausalLM"),
                                                  ("qwen3_moe", "Qwen3MoeForCausalLM"),
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


def test_qwen3_moe_export_keeps_dense_layers_dense(qwen3_moe):
    assert qwen3_moe["mlp_only_layers"] == [1, 3]
    assert qwen3_moe["dense_mlp_width"] == 96 and qwen3_moe["expert_width"] == 64


def test_evaluation_reports_the_token_weighted_loss_of_every_window(qwen3_moe_export, tmp_path):
    """tools.evaluate's loss and perplexity against the cross-entropy of the same token
    windows computed apart: one plain forward per window, summed over tokens, divided once."""
    result = run_distributed(evaluation_against_plain_forwards, 1, str(qwen3_moe_export / "ckpt"), str(tmp_path))[0]
    evaluated = result["evaluate"]
    assert evaluated["tokens"] == result["reference_tokens"]
    assert abs(evaluated["loss"] - result["reference_loss"]) < 1e-4 * result["reference_loss"]
    assert abs(evaluated["perplexity"] - math.exp(result["reference_loss"])) < 1e-3 * evaluated["perplexity"]


def test_evaluation_cli_prints_the_loss_exact_and_with_lsh(corpus, qwen3_moe_export):
    outputs = {}
    for mode in ([], ["--lsh"]):
        argv = ["--load", str(qwen3_moe_export / "ckpt"), "--input", str(corpus["jsonl"]["valid"]), *mode]
        if mode:  # the same main() in a forked process
            code, stdout, stderr = run_distributed(command_line, 1, "megatron_lsh.tools.evaluate", argv)[0]
        else:
            result = subprocess.run([sys.executable, "-m", "megatron_lsh.tools.evaluate", *argv], cwd=REPO,
                                    env=environment(), capture_output=True, text=True, timeout=300)
            code, stdout, stderr = result.returncode, result.stdout, result.stderr
        assert code == 0, stderr[-3000:]
        match = re.search(r"loss ([0-9.]+), perplexity ([0-9.]+) over ([0-9,]+) tokens", stdout)
        assert match, stdout
        loss, perplexity, tokens = float(match[1]), float(match[2]), int(match[3].replace(",", ""))
        assert abs(perplexity - math.exp(loss)) / perplexity < 1e-3 and tokens > 1000
        outputs[bool(mode)] = loss
    assert outputs[True] != outputs[False]  # LSH on is the approximation, off the exact MoE


LM_EVAL_TASK = """
task: held_out_continuations
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def test_lm_evaluation_harness_scores_the_export_with_our_own_log_likelihoods(corpus, qwen3_moe_export, tmp_path):
    """lm_eval's own client (its Python API, the hf model) on a task defined here over local
    files: its log-likelihood of each continuation is the one megatron-lsh computes."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    documents = [json.loads(line)["text"] for line in open(corpus["jsonl"]["valid"])]
    pairs = []
    for text in documents[:6]:
        words = text.split()
        pairs.append({"context": " ".join(words[:4]), "continuation": " " + " ".join(words[4:8])})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(data=data))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={qwen3_moe_export / 'hf'},dtype=float32", tasks=["held_out_continuations"],
        task_manager=TaskManager(include_path=str(tmp_path)), device="cpu", batch_size=2, log_samples=True)
    samples = sorted(results["samples"]["held_out_continuations"], key=lambda sample: sample["doc_id"])
    theirs = [sample["resps"][0][0][0] for sample in samples]
    ours = run_distributed(continuation_log_likelihoods, 1, str(qwen3_moe_export / "ckpt"),
                           [(p["context"], p["continuation"]) for p in pairs])[0]
    assert len(theirs) == len(ours) == len(pairs)
    assert all(value < 0 for value in ours)
    assert theirs == pytest.approx(ours, abs=1e-3)
