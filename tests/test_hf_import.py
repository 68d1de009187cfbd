"""Import from Hugging Face: tiny models made by transformers from a config (no downloads; Mixtral,
Qwen3-MoE, Switch Transformers, and dense Qwen3 and Llama to upcycle) become
megatron-lsh checkpoints whose logits are transformers', export back to the same model, upcycle
a dense model to an MoE that starts as the dense one, and continue training at other layouts."""

import json
import re
import subprocess
import sys

import pytest

from tests.distributed import run_distributed
from tests.hf_workers import command_line, import_and_compare
from tests.launch import REPO, convert, environment, run_ranks

pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, tie_word_embeddings=False)


def save_tiny(kind, directory, tokenizer, **overrides):
    """A randomly initialised transformers model of ``kind`` and our test tokenizer in ``directory``
    (vocabulary: the tokenizer's 300 pieces)."""
    import torch
    import transformers

    from megatron_lsh.tools.hf_tokenizer import save_hf_tokenizer

    config_class, model_class, settings = {
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
            num_hidden_layers=4, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, mlp_only_layers=[1, 3], decoder_sparse_step=1, norm_topk_prob=True)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
            num_hidden_layers=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2, head_dim=16, intermediate_size=96)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, intermediate_size=96)),
        # T5's tied head (output scaled by d_model^-0.5); capacity past every token: dropless.
        "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration", dict(
            d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4,
            num_sparse_encoder_layers=1, num_sparse_decoder_layers=2, expert_capacity=1000, router_jitter_noise=0.0,
            dropout_rate=0.0, tie_word_embeddings=True)),
    }[kind]
    common = {} if kind == "switch_transformers" else TINY
    vocab = 340 if kind == "switch_transformers" else 300
    config = getattr(transformers, config_class)(vocab_size=vocab, **{**common, **settings, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # logits far from a fresh model's, whose loss is about ln(300) = 5.7
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory)
    save_hf_tokenizer(tokenizer, str(directory), model_max_length=128)
    return directory


@pytest.fixture(scope="module")
def imports(corpus, tmp_path_factory):
    """Per kind: the original's directory and what importing it gave."""
    work = tmp_path_factory.mktemp("imports")
    cases = {"qwen3_moe": None, "mixtral": None, "switch_transformers": None, "qwen3": {"num_experts": 4, "topk": 2},
             "llama": {"num_experts": 4, "topk": 2}}
    for kind in cases:
        overrides = {"tie_word_embeddings": True} if kind == "llama" else {}
        tokenizer = corpus["t5_tokenizer"] if kind == "switch_transformers" else corpus["tokenizer"]
        save_tiny(kind, work / kind, tokenizer, **overrides)
    [results] = run_distributed(import_and_compare, 1, [
        (str(work / kind), str(work / f"{kind}-ckpt"), str(work / f"{kind}-back"), upcycle)
        for kind, upcycle in cases.items()], timeout=900)
    return {kind: dict(result, hf_dir=work / kind, save=work / f"{kind}-ckpt") for kind, result in zip(cases, results)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "switch_transformers"])
def test_an_imported_moe_gives_transformers_logits_and_exports_back_to_the_same_model(imports, kind):
    result = imports[kind]
    assert result["import_difference"] < 1e-4 * max(1.0, result["logit_scale"])
    assert result["round_trip_difference"] < 1e-5
    assert result["back_architecture"] == {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                                           "switch_transformers": "SwitchTransformersForConditionalGeneration"}[kind]
    assert result["tokenizer"] == "HuggingFaceTokenizer" and result["same_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_an_upcycled_dense_model_starts_as_the_dense_model(imports, kind):
    """Every expert a copy of the dense MLP, top-2 weights summing to 1: the dense model's logits
    (Llama's tied embeddings untied into two equal tables)."""
    result = imports[kind]
    assert result["import_difference"] < 1e-4 * max(1.0, result["logit_scale"])
    assert "--num-experts" in result["flags"] and result["flags"][result["flags"].index("--num-experts") + 1] == "4"


def test_the_printed_flags_build_the_imported_model():
    from megatron_lsh.tools.import_hf import model_flags

    config = dict(model_type="qwen3_moe", hidden_act="silu", num_hidden_layers=4, hidden_size=64,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, intermediate_size=96, mlp_only_layers=[1, 3], norm_topk_prob=True,
                  max_position_embeddings=128, vocab_size=300,
                  rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    flags = model_flags(config, "hf")
    value = {flag: flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag.startswith("--")}
    assert value["--moe-layer-freq"] == "[1,0,1,0]" and value["--rotary-base"] == "1000000"
    assert value["--num-query-groups"] == "2" and value["--kv-channels"] == "16"
    assert value["--make-vocab-size-divisible-by"] == "300" and "--moe-router-pre-softmax" not in flags
    assert "--moe-router-pre-softmax" in model_flags({**config, "norm_topk_prob": False}, "hf")


def write_config(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


MIXTRAL = dict(model_type="mixtral", hidden_act="silu", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
               max_position_embeddings=128, vocab_size=300, rope_theta=1e6)


@pytest.mark.parametrize("fields, message", [
    (dict(MIXTRAL, model_type="gpt2"), "model_type 'gpt2' is not importable"),
    (dict(MIXTRAL, model_type="llama"),
     "llama is a dense model and megatron-lsh trains MoE models; pass --moe-upcycle"),
    (dict(MIXTRAL, hidden_act="gelu"), 'hidden_act="gelu" cannot be expressed'),
    (dict(MIXTRAL, sliding_window=4096), "sliding_window=4096 cannot be expressed"),
    (dict(MIXTRAL, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' (rope scaling) cannot be "
                                                                       "expressed"),
    (dict(MIXTRAL, attention_bias=True), "attention_bias=true cannot be expressed"),
    (dict(MIXTRAL, num_local_experts=None), "has no num_local_experts or num_experts"),
])
def test_a_model_that_does_not_fit_is_refused_naming_what(tmp_path, fields, message):
    from megatron_lsh.tools.import_hf import HFImportError, import_hf

    with pytest.raises(HFImportError, match=re.escape(message)):
        import_hf(str(write_config(tmp_path / "hf", **fields)), str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def test_a_directory_without_a_model_or_with_a_foreign_tokenizer_is_refused(tmp_path, corpus):
    from megatron_lsh.tools.hf_tokenizer import save_hf_tokenizer
    from megatron_lsh.tools.import_hf import HFImportError, import_hf

    with pytest.raises(HFImportError, match="no config.json there; not a Hugging Face model directory"):
        import_hf(str(tmp_path), str(tmp_path / "ckpt"))
    hf = write_config(tmp_path / "hf", **dict(MIXTRAL, vocab_size=200))
    save_hf_tokenizer(corpus["tokenizer"], str(hf), model_max_length=128)
    with pytest.raises(HFImportError, match="300 tokens, more than the model's vocab_size 200"):
        import_hf(str(hf), str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def run_import(*flags, fresh_interpreter=True):
    """(exit code, stdout, stderr) of the import command line: as a user runs it, or its main() in a
    forked process (seconds instead of a fresh interpreter's imports)."""
    if not fresh_interpreter:
        return run_distributed(command_line, 1, "megatron_lsh.tools.import_hf", list(flags))[0]
    result = subprocess.run([sys.executable, "-m", "megatron_lsh.tools.import_hf", *flags], cwd=REPO,
                            env=environment(), capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.slow
def test_missing_or_misshaped_weights_fail_in_one_line_and_write_nothing(corpus, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    hf = save_tiny("mixtral", tmp_path / "hf", corpus["tokenizer"])
    weights = load_file(hf / "model.safetensors")
    for change, message, fresh_interpreter in [
        (lambda w: w.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
         "weight model.layers.1.block_sparse_moe.experts.3.w2.weight is missing from its safetensors files", True),
        (lambda w: w.update({"model.norm.weight": w["model.norm.weight"][:32]}),
         "decoder.final_layernorm.weight comes out (32,) from the safetensors files, the model of config.json "
         "has (64,)",
         False),
    ]:
        broken = dict(weights)
        change(broken)
        save_file(broken, str(hf / "model.safetensors"))
        code, _, stderr = run_import("--hf-model", str(hf), "--save", str(tmp_path / "ckpt"),
                                     fresh_interpreter=fresh_interpreter)
        assert code != 0
        assert stderr.strip().splitlines()[-1] == f"error: --hf-model {hf}: {message}"
        assert not (tmp_path / "ckpt").exists()
    # Whole weights and no tokenizer: imported, with a warning, and no tokenizer flags printed.
    save_file(weights, str(hf / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (hf / name).unlink(missing_ok=True)
    code, stdout, stderr = run_import("--hf-model", str(hf), "--save", str(tmp_path / "ckpt"), fresh_interpreter=False)
    assert code == 0, stderr[-2000:]
    assert f"{hf} has no tokenizer" in stderr and "--tokenizer-type" not in stdout
    assert (tmp_path / "ckpt" / "iter_0000000" / "complete").exists()
    # ... and exported back: the model, no special ids made up, and a warning that the tokenizer is missing.
    exported = convert(tmp_path / "ckpt", tmp_path / "exported")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "Traceback" not in exported.stderr
    assert "holds no tokenizer" in exported.stderr
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    back = load_file(tmp_path / "exported" / "model.safetensors")
    assert torch.equal(back["model.layers.1.block_sparse_moe.experts.3.w2.weight"],
                       weights["model.layers.1.block_sparse_moe.experts.3.w2.weight"])


@pytest.mark.slow
def test_an_imported_model_continues_training_at_tp2_ep2_and_at_pp2_from_the_same_weights(imports, corpus, tmp_path):
    """The checkpoint's iteration-0 validation loss, on data preprocessed with the model's own
    tokenizer, is the same whichever layout loads it; then a step trains."""
    from megatron_lsh.data.preprocess import preprocess_jsonl

    result = imports["qwen3_moe"]
    data = {split: preprocess_jsonl([str(corpus["jsonl"][split])], str(tmp_path / split), "HuggingFaceTokenizer",
                                    str(result["hf_dir"]), progress=False)["text"]["prefix"]
            for split in ("train", "valid")}
    common = [*result["flags"], "--load", str(result["save"]), "--finetune", "--seq-length", "64",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-4",
              "--eval-iters", "2", "--eval-interval", "1", "--train-data-path", data["train"],
              "--valid-data-path", data["valid"], "--num-workers", "0", "--no-lsh", "--seed", "3"]
    outputs = {
        "tp2-ep2": run_ranks([*common, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--expert-model-parallel-size", "2"], nproc=4),
        "pp2": run_ranks([*common, "--pipeline-model-parallel-size", "2"], nproc=2),
    }
    first = {name: float(re.search(r"validation loss at iteration 0 \| lm loss value: (\S+)", out).group(1))
             for name, out in outputs.items()}
    assert first["pp2"] > 10  # the imported weights, not a fresh initialisation (about 5.7)
    assert abs(first["tp2-ep2"] - first["pp2"]) < 1e-4 * first["pp2"]
    assert all("iteration        1/       1" in out for out in outputs.values())


def test_the_hugging_face_tokenizer_reads_a_model_directory_and_names_a_wrong_one(tmp_path, corpus):
    from megatron_lsh.data.tokenizer import SentencePieceTokenizer, TokenizerError, build_tokenizer
    from megatron_lsh.tools.hf_tokenizer import save_hf_tokenizer

    with pytest.raises(TokenizerError, match=r"--tokenizer-model .*: not a Hugging Face tokenizer directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    with pytest.raises(TokenizerError, match="needs --tokenizer-model DIR"):
        build_tokenizer("HuggingFaceTokenizer", None)
    save_hf_tokenizer(corpus["tokenizer"], str(tmp_path / "hf"), model_max_length=128)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    reference = SentencePieceTokenizer(corpus["tokenizer"])
    text = "The king speaks of the crown.\nA fool dreams of the sea!"
    assert tokenizer.tokenize(text) == reference.tokenize(text)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (reference.vocab_size, reference.eos, reference.pad)
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
