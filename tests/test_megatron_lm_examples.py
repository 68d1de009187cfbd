"""Megatron-LM's own example scripts (examples/mixtral/train_mixtral_8x7b_distributed.sh,
examples/gpt3/train_gpt3_175b_distributed.sh, examples/t5/train_t5_220m_distributed.sh, at the
release that goes with megatron-core 0.16.1) run here with every flag kept: only sizes, parallel
sizes, iteration counts, paths and GPU-only backends changed to fit 2 CPU ranks, on data and
tokenizers made without our data tools; then each resumes from its own checkpoint."""

import pytest

from tests.launch import losses, run_ranks
from tests.megatron_lm_files import bert_sentence_data, gpt2_data, llama_data


def mixtral(files, checkpoint, iterations):
    """The Mixtral 8x7B script's arrays in its order; sizes: 32 layers -> 2, hidden 4096 -> 64, ..."""
    return [
        # MODEL_ARGS
        "--use-mcore-models", "--disable-bias-linear", "--seq-length", "64", "--max-position-embeddings", "256",
        "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "224", "--num-attention-heads", "4",
        "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
        "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
        "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2",
        "--no-masked-softmax-fusion", "--no-position-embedding", "--rotary-base", "1000000",
        # MOE_ARGS
        "--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
        "--overlap-param-gather", "--overlap-grad-reduce",
        # DATA_ARGS
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", files["tokenizer_model"],
        "--data-path", files["data_path"], "--split", "99990,8,2",
        # TRAINING_ARGS
        "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-4", "--train-iters", str(iterations),
        "--lr-decay-iters", "5", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5", "--weight-decay", "0.1",
        "--lr-warmup-iters", "1", "--clip-grad", "1.0", "--bf16",
        # MODEL_PARALLEL_ARGS (pipeline 4 -> 1, expert 8 -> 2)
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--sequence-parallel",
        # LOGGING_ARGS
        "--log-interval", "1", "--save-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
        "--save", checkpoint, "--load", checkpoint, "--tensorboard-dir", f"{checkpoint}/tensorboard",
        "--no-load-optim", "--no-load-rng",
    ]


def gpt3(files, checkpoint, iterations):
    """The GPT-3 175B script (dense: no experts), fp16 with a batch ramp-up; tensor 8 -> 2, pipeline 16 -> 1."""
    return [
        # GPT_MODEL_ARGS
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--max-position-embeddings", "64", "--attention-backend", "auto",
        # TRAINING_ARGS
        "--micro-batch-size", "1", "--global-batch-size", "4", "--rampup-batch-size", "2", "2", "8",
        "--train-iters", str(iterations), "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5",
        "--lr-decay-style", "cosine", "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001",
        "--lr-decay-iters", "8",
        # MODEL_PARALLEL_ARGS
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",
        # DATA_ARGS
        "--data-path", files["data_path"], "--vocab-file", files["vocab_file"], "--merge-file", files["merge_file"],
        "--split", "949,50,1",
        # EVAL_AND_LOGGING_ARGS
        "--log-interval", "1", "--save-interval", "2", "--eval-interval", "2", "--save", checkpoint,
        "--load", checkpoint, "--eval-iters", "1", "--tensorboard-dir", f"{checkpoint}/tensorboard",
    ]


def t5(files, checkpoint, iterations):
    """The T5 220M script (dense), BERT WordPiece with 100 sentinels; transformer_engine -> local, nccl -> gloo."""
    return [
        # T5_ARGS
        "--encoder-num-layers", "2", "--decoder-num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--kv-channels", "16", "--ffn-hidden-size", "256", "--encoder-seq-length", "64", "--decoder-seq-length", "16",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "0.0001",
        "--train-iters", str(iterations), "--lr-decay-iters", "8", "--lr-decay-style", "linear",
        "--min-lr", "0.00001", "--weight-decay", "1e-2", "--lr-warmup-fraction", ".01", "--clip-grad", "1.0",
        "--bf16", "--vocab-extra-ids", "100", "--init-method-std", "0.015", "--transformer-impl", "local",
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--attention-backend", "auto",
        # DATA_ARGS
        "--data-path", files["data_path"], "--vocab-file", files["vocab_file"], "--tokenizer-type", "BertWordPieceCase",
        "--split", "99982,9,9",
        # OUTPUT_ARGS
        "--log-interval", "1", "--tensorboard-dir", f"{checkpoint}/tensorboard", "--save-interval", "2",
        "--eval-interval", "2", "--eval-iters", "1",
        # the torchrun line
        "--distributed-backend", "gloo", "--save", checkpoint, "--load", checkpoint,
    ]


EXAMPLES = {
    "mixtral": (mixtral, llama_data, "pretrain_gpt_moe.py"),
    "gpt3": (gpt3, gpt2_data, "pretrain_gpt_moe.py"),
    "t5": (t5, bert_sentence_data, "pretrain_t5_moe.py"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_megatron_lm_example_script_runs_with_every_flag_and_resumes(name, tmp_path):
    flags_of, make_data, script = EXAMPLES[name]
    files = make_data(tmp_path)
    checkpoint = str(tmp_path / "checkpoints")
    first = run_ranks(flags_of(files, checkpoint, iterations=4), script=script)
    assert sorted(losses(first)) == [1, 2, 3, 4]
    second = run_ranks(flags_of(files, checkpoint, iterations=6), script=script)
    assert "resuming at iteration 4" in second, second[-2000:]
    assert sorted(losses(second)) == [5, 6]


@pytest.mark.slow
def test_a_run_on_gpt2_bpe_exports_with_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from megatron_lsh.data.tokenizer import build_tokenizer
    from tests.launch import convert
    from tests.megatron_lm_files import TEXT

    files = gpt2_data(tmp_path)
    run_ranks(["--hf-architecture", "qwen3_moe", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads",
               "4", "--seq-length", "64", "--micro-batch-size", "2", "--num-experts", "4",
               "--expert-model-parallel-size", "2", "--lr", "1e-3", "--train-iters", "2", "--eval-iters", "0",
               "--num-workers", "0",
               "--data-path", files["data_path"], "--vocab-file", files["vocab_file"], "--merge-file",
               files["merge_file"], "--tokenizer-type", "GPT2BPETokenizer", "--save", str(tmp_path / "run")])
    finished = convert(tmp_path / "run", tmp_path / "hf")
    assert finished.returncode == 0, finished.stderr[-3000:]
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=files["vocab_file"], merge_file=files["merge_file"])
    assert exported.encode(TEXT[5], add_special_tokens=False) == ours.tokenize(TEXT[5])
