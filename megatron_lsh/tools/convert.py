"""Convert a megatron-lsh checkpoint to a Hugging Face model directory.

    python -m megatron_lsh.tools.convert --load checkpoints/gpt-moe --output hf/gpt-moe

Merges the expert-parallel shards of the newest complete checkpoint and writes config.json,
safetensors weights and the tokenizer: a GPT-MoE as MixtralForCausalLM (MoE in every layer) or
Qwen3MoeForCausalLM (dense and MoE layers interleaved), a T5-MoE as
SwitchTransformersForConditionalGeneration, loadable with ``AutoModelForCausalLM`` /
``AutoModelForSeq2SeqLM.from_pretrained`` and no custom code. LSH is a training-time
approximation of the all-to-all; the export is the exact MoE. Runs on one process (CPU is fine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from megatron_lsh.data.tokenizer import HuggingFaceTokenizer, MegatronCoreTokenizer, NullTokenizer
from megatron_lsh.models.architectures import NotExportableError, exportable_architecture
from megatron_lsh.tools.hf_export import (
    mixtral_config,
    mixtral_state_dict,
    qwen3_moe_config,
    qwen3_moe_state_dict,
    save_safetensors,
    switch_config,
    switch_state_dict,
)
from megatron_lsh.tools.hf_tokenizer import save_hf_tokenizer
from megatron_lsh.tools.loading import load_for_inference, saved_run
from megatron_lsh.training.checkpointing import CheckpointError

MODEL_OF_TASK = {"GPT-MoE": "gpt", "T5-MoE": "t5"}
EXPORTERS = {
    "mixtral": (mixtral_state_dict, mixtral_config),
    "qwen3_moe": (qwen3_moe_state_dict, qwen3_moe_config),
    "switch_transformers": (switch_state_dict, switch_config),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_checkpoint(load_dir: str) -> str:
    """The architecture a checkpoint exports to; NotExportableError naming the flags otherwise."""
    args, task, _ = saved_run(load_dir)
    return exportable_architecture(args, MODEL_OF_TASK[task])


def convert(load_dir: str, output_dir: str, dtype: str = "fp32") -> str:
    architecture = check_checkpoint(load_dir)
    loaded = load_for_inference(load_dir)
    args, tokenizer = loaded.args, loaded.tokenizer
    # A NullTokenizer (a model imported without its tokenizer) has no text and no real special ids.
    has_tokenizer = not isinstance(tokenizer, NullTokenizer)
    if not has_tokenizer and architecture == "switch_transformers":
        raise NotExportableError(f"{load_dir} has no tokenizer, and a Switch Transformers config needs its pad and "
                                 "start ids; train with --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR")
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.endswith("_extra_state")}
    vocab = tokenizer.vocab_size
    state_dict_of, config_of = EXPORTERS[architecture]
    weights, config = state_dict_of(state, args, vocab), config_of(args, vocab, tokenizer if has_tokenizer else None)
    config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_safetensors(weights, output_dir, DTYPES[dtype])
    if not has_tokenizer:
        print(f"warning: {load_dir} holds no tokenizer (a NullTokenizer run: imported without one, or "
              f"mock data): {output_dir} has the model only; copy the tokenizer files of its model beside it",
              file=sys.stderr)
    elif isinstance(tokenizer, HuggingFaceTokenizer):  # the model's own, as it came
        tokenizer.save(output_dir)
    elif isinstance(tokenizer, MegatronCoreTokenizer) and tokenizer.hugging_face() is not None:
        tokenizer.hugging_face().save_pretrained(output_dir)  # GPT-2 BPE / BERT WordPiece, sentinels included
    elif args.tokenizer_type == "TikTokenizer":
        print(f"warning: a TikTokenizer vocabulary has no Hugging Face form here: {output_dir} has the model only; "
              "copy a matching tokenizer beside it", file=sys.stderr)
    else:
        save_hf_tokenizer(args.tokenizer_model, output_dir, model_max_length=args.max_position_embeddings)
    return architecture


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="Checkpoint directory (the --save of training).")
    parser.add_argument("--output", required=True, help="Hugging Face model directory to write.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    try:
        architecture = convert(args.load, args.output, args.dtype)
    except (CheckpointError, NotExportableError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {architecture} model to {args.output}")


if __name__ == "__main__":
    main()
