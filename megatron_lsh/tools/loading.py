"""A saved run's model on one process: every expert merged (expert parallel 1), LSH off unless
asked for, for conversion and evaluation. dist_checkpointing reshards the expert-parallel shards
by their global expert index."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import dist_checkpointing

from megatron_lsh.data.tokenizer import SENTENCEPIECE_TYPES, tokenizer_from_args
from megatron_lsh.moe.config import PAYLOAD_SETTINGS, settings_before_they_existed
from megatron_lsh.moe.controller import CompressionController
from megatron_lsh.training.arguments import flag_defaults
from megatron_lsh.training.checkpointing import (
    TOKENIZER_COPY,
    TOKENIZER_DIR_COPY,
    CheckpointError,
    checkpoint_to_load,
    vocabulary_rows,
)
from megatron_lsh.training.config import transformer_config_from_args
from megatron_lsh.training.gpt_task import GPT_TASK
from megatron_lsh.training.initialize import free_port, initialize_distributed
from megatron_lsh.training.megatron_lm_format import saved_arguments
from megatron_lsh.training.t5_task import T5_TASK, add_t5_args
from megatron_lsh.training.task import padded_vocab_size


@dataclass
class LoadedModel:
    model: torch.nn.Module
    args: argparse.Namespace
    task_name: str
    tokenizer: object
    path: str


def saved_run(load_dir: str):
    """(args as a dict, task name, checkpoint path) of the newest complete checkpoint."""
    path = checkpoint_to_load(load_dir)  # ours, or the one Megatron-LM's tracker names
    if path is None:
        raise CheckpointError(f"--load {load_dir}: no complete checkpoint (iter_*/ with a 'complete' marker, or "
                              "Megatron-LM's torch_dist checkpoint its tracker names)")
    common = dist_checkpointing.load_common_state_dict(path)
    if "args" not in common:
        raise CheckpointError(f"{path} was not written by megatron-lsh's pretraining loop")
    args = saved_arguments(common)
    # Checkpoints from before the task was recorded: T5 runs are the ones with an encoder; in
    # Megatron-LM's (which record no task, and set encoder_num_layers for GPT too), a decoder.
    t5 = args.get("decoder_num_layers") if "checkpoint_version" in common else args.get("encoder_num_layers")
    task = common.get("task") or ("T5-MoE" if t5 else "GPT-MoE")
    return args, task, path


def task_of_run(task_name: str):
    """The ModelTask a checkpoint's recorded task name stands for."""
    return {GPT_TASK.name: GPT_TASK, T5_TASK.name: T5_TASK}[task_name]


def tokenizer_model_path(load_dir: str, args: dict) -> str:
    """The tokenizer saved with the run (copied beside its checkpoints), else the one it named."""
    if args.get("tokenizer_type") == "HuggingFaceTokenizer":
        copy = os.path.join(load_dir, TOKENIZER_DIR_COPY)
        return copy if os.path.isdir(copy) else args.get("tokenizer_model")
    copy = os.path.join(load_dir, TOKENIZER_COPY)
    if args.get("tokenizer_type") not in SENTENCEPIECE_TYPES:  # its copy is a SentencePiece model's
        return args.get("tokenizer_model")
    return copy if os.path.isfile(copy) else args.get("tokenizer_model")


def load_for_inference(load_dir: str, lsh: bool = False, dtype=torch.float32,
                       lsh_overrides: Optional[dict] = None) -> LoadedModel:
    saved, task_name, path = saved_run(load_dir)
    task = task_of_run(task_name)
    # Flags added since the run was saved take their defaults, except the LSH settings that
    # did not exist then: such a run hashed without a bound or a target.
    args = argparse.Namespace(**{**flag_defaults(add_t5_args), **settings_before_they_existed(saved), **saved})
    # One process: the parallel layout of the run (its tensors are sharded by global names) goes.
    saved_tensor_parallel = saved.get("tensor_model_parallel_size", 1)
    args.expert_model_parallel_size = args.tensor_model_parallel_size = 1
    args.pipeline_model_parallel_size = args.expert_tensor_parallel_size = 1
    args.virtual_pipeline_model_parallel_size = None
    args.sequence_parallel = False
    args.lsh_enabled = lsh
    if not lsh:  # the exact MoE: no approximation on the way to the experts and back either
        vars(args).update({name: "bf16" for name in PAYLOAD_SETTINGS})
    args.lsh_gradient_study = None  # a training-time study; evaluation runs one path
    # One process has no other nodes: an inter-node run is evaluated as if every row crossed
    # one, its most compressed case.
    args.lsh_scope = "all"
    lsh_overrides = dict(lsh_overrides or {})
    if "lsh_error_bound" in lsh_overrides:  # the bound alone, without the run's controller
        lsh_overrides.setdefault("lsh_target_compression", None)
    vars(args).update(lsh_overrides)
    args.bf16 = dtype == torch.bfloat16
    args.tokenizer_model = tokenizer_model_path(load_dir, saved)
    for key, value in dict(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    initialize_distributed(expert_model_parallel_size=1, seed=args.seed)
    tokenizer = tokenizer_from_args(args)
    config = transformer_config_from_args(args, hidden_dropout=0.0, attention_dropout=0.0)
    vocab_size = vocabulary_rows(path) or padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                                             saved_tensor_parallel)
    model = task.build_model(args, config, vocab_size)
    state = dist_checkpointing.load({"model": model.sharded_state_dict(prefix="")}, path)
    model.load_state_dict(state["model"])
    thresholds = dist_checkpointing.load_common_state_dict(path).get("lsh_merge_thresholds")
    controller = CompressionController.for_model(model, config) if lsh and thresholds else None
    if controller is not None:
        controller.load_state_dict(thresholds)  # where the run's controller had brought them
    model.eval()
    return LoadedModel(model, args, task_name, tokenizer, path)
